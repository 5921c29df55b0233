"""One row of the quality study (docs/quality.md) from a training run and, optionally, its evaluation.

    python scripts/study_row.py --run runs/study/base --eval runs/study/base-eval --name "baseline"

Prints a markdown row: the best validation step and its edit / paraphrase / locality accuracy (val
records 0-99, teacher-forced, as training measures them), the evaluation's reliability, generality
and locality (teacher-forced), greedy reliability and generality, the mean largest relative update
norm, the minutes and steps trained.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a training run directory (log.jsonl)")
    parser.add_argument("--eval", help="a mend eval output directory (summary.json)")
    parser.add_argument("--name", required=True)
    parser.add_argument("--method", default="mend")
    args = parser.parse_args(argv)

    lines = [json.loads(line) for line in (Path(args.run) / "log.jsonl").read_text().splitlines() if line.strip()]
    train = [line for line in lines if line["split"] == "train"]
    val = [line for line in lines if line["split"] == "val"]
    if not val:
        raise SystemExit(f"{args.run} has no validation yet")
    best = max(val, key=lambda line: line["score"])
    minutes = train[-1]["elapsed_s"] / 60 if train else float("nan")
    cells = [args.name, str(best["step"]), f"{pct(best['edit_acc'])} / {pct(best['equiv_acc'])} / {pct(best['loc_agree'])}"]
    if args.eval:
        summary = json.loads((Path(args.eval) / "summary.json").read_text())["methods"][args.method]
        m = summary["metrics"]
        cells += [f"{pct(m['reliability_tf_acc'])} / {pct(m['generality_tf_acc'])} / {pct(m['locality_tf_acc'])}",
                  f"{pct(m['reliability_gen'])} / {pct(m['generality_gen'])}",
                  pct(summary.get("relative_update"))]
    else:
        cells += ["-", "-", "-"]
    cells += [f"{minutes:.1f}", str(max(line["step"] for line in lines))]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
