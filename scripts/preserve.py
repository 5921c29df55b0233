"""Make a lifelong editor from a trained one: remember preserved knowledge, save it loadable as lifelong.

    python scripts/preserve.py --editor runs/counterfact/best --data ../shared/data/counterfact/train.json \
        --limit 2000 --out runs/counterfact/lifelong

The preserved knowledge is the key second moment E[u u^T] of every edited matrix over generic text,
here the locality probes (prompt and answer) of ``--data``: facts the edits must leave alone. Every
later solve keeps it with weight ``editor.preserve_weight`` (`mend.memory`). The saved editor loads
remembering (`mend.Editor.load(out).remembers`), with an empty edit memory; its stateless variants
(`mend eval --methods mend`) keep the preserved knowledge too. ``--stateless`` saves it stateless.

``--answer-weight A`` adds A times the moment at the positions that predict the probes' answers
(`mend.memory.answer_key_moments`), as ``train.preserve_answer_weight`` does in meta-training:

    python scripts/preserve.py --editor runs/counterfact-quality/best --data ../shared/data/counterfact/train.json \
        --limit 2000 --answer-weight 1 --stateless --out runs/cfq-answers1
"""

from __future__ import annotations

import argparse

import yaml

import mend
from mend.data import load_records
from mend.preserved import locality_pairs, locality_texts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", required=True, help="a trained editor directory")
    parser.add_argument("--data", required=True, help="records whose locality probes are the preserved text")
    parser.add_argument("--limit", type=int, default=2000, help="records to read")
    parser.add_argument("--out", required=True, help="where to save the lifelong editor")
    parser.add_argument("--answer-weight", type=float, default=0.0,
                        help="weight of the probes' answer-position moment added to the preserved one")
    parser.add_argument("--stateless", action="store_true", help="save a stateless editor (no edit memory)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="edit-time settings saved with it (mend.Editor.configure), e.g. memory_weight=100 "
                             "solve_keys=predictions")
    args = parser.parse_args(argv)

    settings = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set takes KEY=VALUE, got {item!r}")
        settings[key] = yaml.safe_load(value)
    if args.answer_weight < 0:
        raise SystemExit(f"--answer-weight must be >= 0, got {args.answer_weight}")
    editor = mend.Editor.load(args.editor, lifelong=not args.stateless, device=args.device, settings=settings)
    records = load_records(args.data, limit=args.limit)
    texts = locality_texts(records)
    if not texts:
        raise SystemExit(f"{args.data} has no locality probes to preserve")
    answers = locality_pairs(records) if args.answer_weight > 0 else None
    editor.preserve(texts, answers=answers, answer_weight=args.answer_weight)
    editor.save(args.out)
    extra = f" and the answers of {len(answers)} probes (weight {args.answer_weight:g})" if answers else ""
    print(f"preserved the keys of {len(texts)} texts{extra}; wrote {args.out}")


if __name__ == "__main__":
    main()
