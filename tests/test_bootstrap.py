"""Bootstrap intervals over records, and comparing two runs (`mend eval --compare`)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from mend.bootstrap import Bootstrap, difference_interval, mean_interval, summarize
from mend.compare import compare_runs, format_comparison, load_run, significant
from mend.report import EDITS_FILE, SUMMARY_FILE


def coin_rows(n: int, p: float = 0.7, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"reliability_tf_acc": float(rng.random() < p)} for _ in range(n)]


def width(interval) -> float:
    return interval[1] - interval[0]


def test_interval_contains_the_mean_and_narrows_with_more_records():
    boot = Bootstrap(samples=1000, seed=0)
    widths = []
    for n in (20, 200, 2000):
        means, intervals = summarize(coin_rows(n), ["reliability_tf_acc"], boot)
        lo, hi = intervals["reliability_tf_acc"]
        assert lo <= means["reliability_tf_acc"] <= hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2] > 0
    assert widths[0] / widths[2] == pytest.approx(10, rel=0.3)  # width ~ 1/sqrt(n)


def test_interval_is_reproducible_and_depends_on_the_seed():
    rows = coin_rows(50)
    a = summarize(rows, ["reliability_tf_acc"], Bootstrap(200, seed=1))[1]
    assert a == summarize(rows, ["reliability_tf_acc"], Bootstrap(200, seed=1))[1]
    assert a != summarize(rows, ["reliability_tf_acc"], Bootstrap(200, seed=2))[1]


def test_missing_values_are_left_out_and_constant_values_have_a_point_interval():
    rows = [{"m": 1.0}, {"m": None}, {"m": 1.0}, {}]
    means, intervals = summarize(rows, ["m", "absent"], Bootstrap(100))
    assert means == {"m": 1.0, "absent": None}
    assert intervals == {"m": [1.0, 1.0], "absent": None}
    assert summarize(rows, ["m"], Bootstrap(0)) == ({"m": 1.0}, {"m": None})  # 0 samples: no interval


def test_wider_confidence_gives_a_wider_interval():
    values = torch.tensor([float(r["reliability_tf_acc"]) for r in coin_rows(100)], dtype=torch.float64)
    _, i90 = mean_interval(values, Bootstrap(1000, confidence=0.90))
    _, i99 = mean_interval(values, Bootstrap(1000, confidence=0.99))
    assert width(i99) > width(i90)


@pytest.mark.parametrize("kwargs, match", [({"samples": -1}, "samples"), ({"confidence": 1.0}, "confidence")])
def test_bad_bootstrap_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Bootstrap(**kwargs)


def test_paired_difference_is_narrower_than_unpaired():
    a = coin_rows(200, p=0.5, seed=3)
    b = [{"reliability_tf_acc": min(1.0, r["reliability_tf_acc"] + (i % 10 == 0))} for i, r in enumerate(a)]
    boot = Bootstrap(1000)
    d_paired, i_paired = difference_interval(a, b, "reliability_tf_acc", boot, paired=True)
    d_unpaired, i_unpaired = difference_interval(a, b, "reliability_tf_acc", boot, paired=False)
    assert d_paired == pytest.approx(d_unpaired) and d_paired > 0
    assert i_paired[0] <= d_paired <= i_paired[1]
    assert width(i_paired) < width(i_unpaired)
    assert significant(i_paired) and not significant(i_unpaired)


# ----------------------------------------------------------------------------- comparing two runs
def write_run(path, values: dict[str, list[float]], case_ids=None, method="mend"):
    """An evaluation output directory whose ``method`` rows carry ``values`` per metric."""
    path.mkdir(parents=True)
    n = len(next(iter(values.values())))
    case_ids = case_ids or [str(i) for i in range(n)]
    rows = [{"method": method, "index": i, "case_id": case_ids[i], "ms_per_edit": 100.0 + i,
             **{name: v[i] for name, v in values.items()}} for i in range(n)]
    (path / EDITS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = {"mode": "single", "data": "d.json", "model": "m", "settings": {"n_records": n},
               "methods": {method: {"metrics": {}}}}
    (path / SUMMARY_FILE).write_text(json.dumps(summary))
    return path


def test_compare_flags_what_is_not_significant(tmp_path):
    n = 40
    a = write_run(tmp_path / "a", {"reliability_tf_acc": [0.0] * n, "locality_tf_acc": [1.0] * n,
                                   "efficacy_score": [float(i % 2) for i in range(n)]})
    b = write_run(tmp_path / "b", {"reliability_tf_acc": [1.0] * n, "locality_tf_acc": [1.0] * n,
                                   "efficacy_score": [float(i % 2) for i in reversed(range(n))]},
                  case_ids=[str(i) for i in reversed(range(n))])  # same records, another order: still paired
    comparison = compare_runs(a, b, Bootstrap(500))
    assert comparison.paired == {"mend": True}
    diffs = comparison.differences["mend"]
    assert diffs["reliability_tf_acc"] == (1.0, [1.0, 1.0])
    assert diffs["locality_tf_acc"] == (0.0, [0.0, 0.0])
    assert diffs["efficacy_score"][0] == 0.0  # record i keeps its value: paired by case id
    text = format_comparison(comparison)
    line = {ln.split()[0]: ln for ln in text.splitlines() if ln.split()}
    assert "+100.0 [+100.0, +100.0]" in line["reliability_tf_acc"] and "n.s." not in line["reliability_tf_acc"]
    assert line["locality_tf_acc"].endswith("n.s.") and line["efficacy_score"].endswith("n.s.")
    assert "paired" in text and "ms/edit" in line


def test_compare_unpaired_when_records_differ(tmp_path):
    a = write_run(tmp_path / "a", {"reliability_tf_acc": [0.0, 1.0, 0.0, 1.0]})
    b = write_run(tmp_path / "b", {"reliability_tf_acc": [1.0, 1.0, 1.0]})
    comparison = compare_runs(a, b, Bootstrap(200))
    assert comparison.paired == {"mend": False}
    assert comparison.differences["mend"]["reliability_tf_acc"][0] == pytest.approx(0.5)


def test_compare_errors_name_the_problem(tmp_path):
    a = write_run(tmp_path / "a", {"reliability_tf_acc": [0.0]})
    b = write_run(tmp_path / "b", {"reliability_tf_acc": [1.0]}, method="ft")
    with pytest.raises(ValueError, match="no edit method in common"):
        compare_runs(a, b)
    with pytest.raises(FileNotFoundError, match="not an evaluation run directory"):
        load_run(tmp_path / "nowhere")
