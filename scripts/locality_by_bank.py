"""Split an evaluation's figures by whether each record's locality prompt is in a neighbour bank.

    python scripts/locality_by_bank.py --edits runs/nb/cfq-w1/edits.jsonl \
        --data ../shared/data/counterfact/val.json --bank ../shared/data/counterfact/train.json --bank-records 10000

A bank built from training records (`mend.neighbours`, ``train.neighbour_records``) can hold the very
prompt a held-out record's locality probe asks, since CounterFact draws neighbours from a shared pool.
This prints R / G / L (teacher-forced token accuracy, in %) over the records whose locality prompt is
in the bank's records and over the others, so a gain can be told apart from a lookup.
"""

from __future__ import annotations

import argparse
import json

from mend.data import load_records


def mean(rows, key):
    values = [row[key] for row in rows if row.get(key) is not None]
    return 100 * sum(values) / len(values) if values else float("nan")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", required=True, help="edits.jsonl of a `mend eval` run")
    parser.add_argument("--data", required=True, help="the records that run evaluated")
    parser.add_argument("--bank", required=True, help="the records the bank was built from")
    parser.add_argument("--bank-records", type=int, required=True, help="how many of them (train.neighbour_records)")
    parser.add_argument("--method", default="mend")
    args = parser.parse_args(argv)

    banked = {probe.prompt for record in load_records(args.bank, limit=args.bank_records) for probe in record.locality}
    probes = {str(record.case_id): [probe.prompt for probe in record.locality] for record in load_records(args.data)}
    rows = [json.loads(line) for line in open(args.edits)]
    rows = [row for row in rows if row["method"] == args.method]
    groups = {"locality prompt in the bank": [], "not in the bank": []}
    for row in rows:
        inside = any(prompt in banked for prompt in probes[str(row["case_id"])])
        groups["locality prompt in the bank" if inside else "not in the bank"].append(row)
    for name, members in [("all", rows), *groups.items()]:
        print(f"{name:28s} n={len(members):4d}  R {mean(members, 'reliability_tf_acc'):5.1f}  "
              f"G {mean(members, 'generality_tf_acc'):5.1f}  L {mean(members, 'locality_tf_acc'):5.1f}")


if __name__ == "__main__":
    main()
