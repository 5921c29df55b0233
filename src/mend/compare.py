"""Comparing two evaluation runs: each metric's difference (B - A) per method, with its bootstrap
interval, and a flag where the interval contains 0 (not significant).

    comparison = compare_runs("runs/eval-a", "runs/eval-b", Bootstrap(1000, seed=0))
    print(format_comparison(comparison))          # what `mend eval --compare RUN_A RUN_B` prints

A run is an output directory of `mend.evaluate.evaluate` (its ``edits.jsonl`` and ``summary.json``).
Methods and metrics present in both runs are compared. When a method scored the same records in
both runs (the same case ids, in any order), the difference is paired: the per-record differences
are resampled. Otherwise each run's records are resampled on their own (unpaired), which gives wider
intervals.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from .bootstrap import Bootstrap, difference_interval
from .eval_metrics import metric_names
from .report import EDITS_FILE, SUMMARY_FILE, format_columns, table_sections, value_cell


@dataclass
class Run:
    """An evaluation run read back from its directory."""

    path: Path
    summary: dict
    rows: list[dict]

    def method_rows(self, method: str) -> list[dict]:
        return [r for r in self.rows if r.get("method") == method]


@dataclass
class Comparison:
    """Per method: {metric: (difference B - A or None, [lo, hi] or None)}, and whether it was paired."""

    run_a: Run
    run_b: Run
    differences: dict[str, dict[str, tuple[float | None, list[float] | None]]]
    paired: dict[str, bool]
    bootstrap: Bootstrap


def load_run(path) -> Run:
    """Read ``summary.json`` and ``edits.jsonl`` from an evaluation output directory."""
    path = Path(path)
    files = [path / SUMMARY_FILE, path / EDITS_FILE]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not an evaluation run directory (mend eval --out DIR): "
                                f"missing {', '.join(missing)}")
    summary = json.loads(files[0].read_text(encoding="utf-8"))
    rows = [json.loads(line) for line in files[1].read_text(encoding="utf-8").splitlines() if line.strip()]
    return Run(path, summary, rows)


def _record_keys(rows: list[dict]) -> list[tuple[str, int]]:
    """(case_id, occurrence) per row, so a case measured twice stays two records."""
    seen: Counter = Counter()
    keys = []
    for row in rows:
        case = str(row.get("case_id", row.get("index")))
        keys.append((case, seen[case]))
        seen[case] += 1
    return keys


def _align(rows_a: list[dict], rows_b: list[dict]) -> tuple[list[dict], list[dict], bool]:
    """Both sides in one record order when they scored the same records (paired), else as they are."""
    keys_a, keys_b = _record_keys(rows_a), _record_keys(rows_b)
    if sorted(keys_a) != sorted(keys_b):
        return rows_a, rows_b, False
    by_key = dict(zip(keys_b, rows_b))
    return rows_a, [by_key[k] for k in keys_a], True


def compare_runs(run_a, run_b, bootstrap: Bootstrap | None = None) -> Comparison:
    """Each metric's difference B - A, per method present in both runs, with its interval."""
    bootstrap = Bootstrap() if bootstrap is None else bootstrap
    a = run_a if isinstance(run_a, Run) else load_run(run_a)
    b = run_b if isinstance(run_b, Run) else load_run(run_b)
    methods = [m for m in a.summary.get("methods", {}) if m in b.summary.get("methods", {})]
    if not methods:
        raise ValueError(f"{a.path} and {b.path} have no edit method in common: "
                         f"{sorted(a.summary.get('methods', {}))} vs {sorted(b.summary.get('methods', {}))}")
    differences, paired = {}, {}
    for method in methods:
        rows_a, rows_b, paired[method] = _align(a.method_rows(method), b.method_rows(method))
        names = [n for n in metric_names(rows_a) if n in set(metric_names(rows_b))] + ["ms_per_edit"]
        differences[method] = {}
        for name in names:
            diff, interval = difference_interval(rows_a, rows_b, name, bootstrap, paired[method])
            differences[method][name] = (diff, None if interval is None else list(interval))
    return Comparison(a, b, differences, paired, bootstrap)


def significant(interval) -> bool | None:
    """Whether an interval excludes 0 (None without an interval)."""
    if interval is None:
        return None
    return interval[0] > 0 or interval[1] < 0


def _diff_cell(diff, interval, percent: bool = True) -> str:
    """"+3.2 [+1.0, +5.1]", with " n.s." when the interval contains 0."""
    text = value_cell(diff, interval, percent, signed=True)
    if diff is not None and interval is not None and not significant(interval):
        text += " n.s."
    return text


def format_comparison(comparison: Comparison) -> str:
    """The differences as a table: one row per metric (percentage points), one column per method."""
    methods = list(comparison.differences)
    diffs = comparison.differences
    present = {n for m in methods for n, (d, _) in diffs[m].items() if d is not None and n != "ms_per_edit"}
    blocks = []
    for title, names in table_sections(present):
        blocks.append((title, [[n] + [_diff_cell(*diffs[m].get(n, (None, None))) for m in methods] for n in names]))
    blocks.append((None, [["ms/edit"] + [_diff_cell(*diffs[m].get("ms_per_edit", (None, None)), percent=False)
                                         for m in methods]]))
    boot = comparison.bootstrap
    pairing = ", ".join(f"{m}: {'paired' if comparison.paired[m] else 'unpaired'}" for m in methods)
    head = [f"B - A  (A = {comparison.run_a.path}, B = {comparison.run_b.path})",
            f"differences in percentage points with [{100 * boot.confidence:g}% bootstrap interval] over records "
            f"({boot.samples} resamples, seed {boot.seed}; {pairing}); n.s. = the interval contains 0"]
    for side, run in (("A", comparison.run_a), ("B", comparison.run_b)):
        s = run.summary
        head.append(f"{side}: mode={s.get('mode')} edits={s.get('settings', {}).get('n_records')} "
                    f"data={s.get('data')} model={s.get('model')} editor={s.get('editor_checkpoint')}")
    return "\n".join(head + format_columns(["metric"] + methods, blocks))
