"""Evaluate the mean of several editors' updates, one edit at a time (a quality-study experiment).

    python scripts/ensemble_eval.py runs/cfq-lp2/best runs/cfq-lp1-hard1/best \
        --data ../shared/data/counterfact/val.json --skip 100 --limit 100 --out runs/ens-lp2-hard1

Every editor computes its update on the unedited model (`mend.Editor.compute_updates`); the first
editor's model takes their mean and is measured as `mend eval --methods mend` measures an edit, then
restored bit for bit. It asks whether editors trained apart break different neighbours, so that
averaging them spares more of them at the same reliability (docs/quality.md).
"""

from __future__ import annotations

import argparse

import torch

import mend
from mend.baselines import EditMethod
from mend.data import load_records
from mend.evaluate import evaluate


class MeanOfEditors(EditMethod):
    """An edit that applies the mean of the editors' updates to the first editor's model."""

    name = "mend"

    def __init__(self, editors: list[mend.Editor]):
        self.editors = editors
        self._saved: dict[str, torch.Tensor] | None = None
        self._params = dict(editors[0].model.named_parameters())

    @torch.no_grad()
    def apply(self, pairs) -> None:
        updates = [editor.compute_updates(pairs)[0] for editor in self.editors]  # name -> dW (d_out, d_in)
        self._saved = {name: self._params[name].detach().clone() for name in updates[0]}
        for name in updates[0]:
            mean = sum(u[name] for u in updates) / len(updates)
            self._params[name].add_(mean.to(self._params[name].dtype))

    @torch.no_grad()
    def revert(self) -> None:
        for name, weight in (self._saved or {}).items():
            self._params[name].copy_(weight)
        self._saved = None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("editors", nargs="+", help="saved editor directories for the same base model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    editors = [mend.Editor.load(path) for path in args.editors]
    records = load_records(args.data, limit=args.skip + args.limit)[args.skip :]
    report = evaluate({"mend": MeanOfEditors(editors)}, records, editors[0].model, editors[0].tokenizer,
                      mode="single", out_dir=args.out, wild_max_new_tokens=0)
    print(report.table())


if __name__ == "__main__":
    main()
