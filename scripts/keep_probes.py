"""Evaluate an editor whose every edit is asked to keep its record's own locality probes.

    python scripts/keep_probes.py --editor runs/counterfact-quality/best \
        --data ../shared/data/counterfact/val.json --skip 100 --limit 100 --out runs/keep-probes

Each edit is ``editor.edit(prompt, target, keep=record's locality probes)`` (`mend.Editor.edit_many`),
then measured as `mend eval --methods mend` measures it. It is the upper bound of what naming the
facts to keep buys, a user who knows which neighbours matter; it is not the benchmark protocol, where
an edit is given only its prompt and target. ``--keep-weight`` overrides ``editor.keep_weight``.
"""

from __future__ import annotations

import argparse

import mend
from mend.baselines import MendMethod
from mend.data import load_records
from mend.evaluate import evaluate


class KeepingProbes(MendMethod):
    """`MendMethod` whose edits keep the locality probes of the records being edited."""

    def __init__(self, editor, records, name: str = "mend"):
        super().__init__(editor, name=name)
        self.probes = {(r.prompt, r.target): [(p.prompt, p.answer) for p in r.locality] for r in records}

    def apply(self, pairs) -> None:
        keep = [probe for pair in pairs for probe in self.probes.get(tuple(pair), [])]
        self._results.append(self.editor.edit_many(pairs, keep=keep))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--keep-weight", type=float, default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    settings = {} if args.keep_weight is None else {"keep_weight": args.keep_weight}
    editor = mend.Editor.load(args.editor, settings=settings)
    records = load_records(args.data, limit=args.skip + args.limit)[args.skip :]
    report = evaluate({"mend": KeepingProbes(editor, records)}, records, editor.model, editor.tokenizer,
                      mode="single", out_dir=args.out, wild_max_new_tokens=0)
    print(report.table())


if __name__ == "__main__":
    main()
