"""Evaluate edits that keep made-up neighbours: the edit prompt with its subject swapped for others.

    python scripts/swap_subject_guard.py --editor runs/cfq-lp2/best \
        --data ../shared/data/counterfact/val.json --skip 100 --limit 100 --k 4 --out runs/sg-lp2-k4

Each edit is ``editor.edit(prompt, target, keep=[...])`` (`mend.Editor.edit_many`) with ``k`` kept facts:
the prompt with the record's subject replaced by subjects of the project's own fact set
(``data/facts/train.json``), each with the unedited model's top next token as its answer. It asks whether
a neighbour can be made up from the edit request and its subject, where the keep-the-neighbour
experiment (`scripts/keep_probes.py`) was told the real one (docs/quality.md).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch

import mend
from mend.baselines import MendMethod
from mend.data import load_records
from mend.evaluate import evaluate

FACTS = Path(__file__).resolve().parents[1] / "data" / "facts" / "train.json"


class KeepingSwappedSubjects(MendMethod):
    """`MendMethod` whose edits keep their prompt with ``k`` other subjects in place of the record's."""

    def __init__(self, editor, records, fillers: list[str], k: int, seed: int = 0, name: str = "mend"):
        super().__init__(editor, name=name)
        self.subjects = {(r.prompt, r.target): r.subject for r in records}
        self.fillers, self.k, self.rng = fillers, k, random.Random(seed)

    @torch.no_grad()
    def swapped(self, prompt: str, subject: str) -> list[tuple[str, str]]:
        if not subject or subject not in prompt:
            return []
        pool = [f for f in self.fillers if f.casefold() != subject.casefold()]
        kept = []
        for filler in self.rng.sample(pool, self.k):
            text = prompt.replace(subject, filler, 1)
            ids = self.editor.tokenizer(text, return_tensors="pt").input_ids.to(self.editor.device)
            answer = self.editor.tokenizer.decode([int(self.editor.model(input_ids=ids).logits[0, -1].argmax())]).strip()
            if answer:
                kept.append((text, answer))
        return kept

    def apply(self, pairs) -> None:
        keep = [fact for prompt, target in pairs for fact in self.swapped(prompt, self.subjects.get((prompt, target), ""))]
        self._results.append(self.editor.edit_many(pairs, keep=keep or None))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--skip", type=int, default=0)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--k", type=int, default=4, help="made-up neighbours kept per edit")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    editor = mend.Editor.load(args.editor)
    fillers = sorted({record["subject"] for record in json.loads(FACTS.read_text())})
    records = load_records(args.data, limit=args.skip + args.limit)[args.skip :]
    report = evaluate({"mend": KeepingSwappedSubjects(editor, records, fillers, args.k)}, records, editor.model,
                      editor.tokenizer, mode="single", out_dir=args.out, wild_max_new_tokens=0)
    print(report.table())


if __name__ == "__main__":
    main()
