"""The evaluation harness: metrics on hand-built cases (CounterFact's scores exact under hand-set logits),
the three modes, exact revert, per-kind reporting, intervals, output files."""

from __future__ import annotations

import json
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import mend
from mend.baselines import EditMethod, NoEdit, build_methods
from mend.bootstrap import Bootstrap
from mend.data.records import EditRecord, Probe
from mend.eval_metrics import (
    COUNTERFACT,
    METRICS,
    Predictions,
    Probes,
    aggregate,
    metric_names,
    normalize_answer,
    parse_metric,
    predict,
    score,
    starts_with_answer,
)
from mend.evaluate import curve_points, curve_sample_indices, evaluate
from mend.report import CURVE_PLOT, EDITS_FILE, METRICS_PLOT, SUMMARY_FILE, TABLE_FILE

from tiny_models import CharTokenizer, tiny_model


# ----------------------------------------------------------------------------- a model whose argmax we set
class TableLM(nn.Module):
    """A causal LM whose next token depends only on the current one: ``next_char[c]``, else the
    next byte (c + 1). Its logits are a one-hot table lookup, so every argmax is known."""

    def __init__(self, next_char: dict[str, str], vocab: int = 260):
        super().__init__()
        table = torch.zeros(vocab, vocab)
        for i in range(vocab):
            table[i, min(i + 1, vocab - 1)] = 10.0
        for a, b in next_char.items():
            i, j = 3 + ord(a), 3 + ord(b)
            table[i].zero_()
            table[i, j] = 10.0
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(name_or_path="table-lm")

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


def _probes(prompt, answer, kind="reliability"):
    return Probes((prompt,), (answer,), (kind,))


def test_controlled_model_full_hit():
    model, tok = TableLM({"b": " ", " ": "c", "c": "d", "d": "."}), CharTokenizer()
    probes = _probes("ab", "cd")  # the answer continues the prompt as " cd"
    post = predict(model, tok, probes)
    assert post.texts[0].startswith(" cd.")
    scores = score(probes, post)
    assert (scores["reliability_tf_acc"], scores["reliability_tf_em"], scores["reliability_gen"]) == (1.0, 1.0, 1.0)


def test_controlled_model_partial_hit():
    model, tok = TableLM({"b": " ", " ": "c", "c": "d", "d": "."}), CharTokenizer()
    probes = _probes("ab", "ce")  # " " -> c and c -> d: two of three answer tokens are argmax
    scores = score(probes, predict(model, tok, probes))
    assert scores["reliability_tf_acc"] == pytest.approx(2 / 3)
    assert scores["reliability_tf_em"] == 0.0
    assert scores["reliability_gen"] == 0.0


def test_generation_needs_a_word_boundary():
    model, tok = TableLM({"b": " ", " ": "c", "c": "c"}), CharTokenizer()
    probes = _probes("ab", "cc")  # teacher-forced all right, but greedy runs on: " cccc"
    scores = score(probes, predict(model, tok, probes))
    assert scores["reliability_tf_em"] == 1.0
    assert scores["reliability_gen"] == 0.0


def test_locality_agreement_and_ground_truth_by_hand():
    probes = Probes(("p", "q"), ("a", "b"), ("reliability", "locality"))
    pre = Predictions(answer_ids=[[1], [5, 6, 8]], argmax=[[0], [5, 6, 7]], generated=[[0, 0, 0], [5, 6, 7, 1, 2]],
                      texts=["x", "y"])
    post = Predictions(answer_ids=[[1], [5, 6, 8]], argmax=[[1], [5, 9, 7]], generated=[[1, 0, 0], [5, 6, 7, 3, 3]],
                       texts=["a b", "zz"])
    scores = score(probes, post, pre)
    assert scores["locality_tf_acc"] == pytest.approx(2 / 3)  # 5 and 7 unchanged, 6 -> 9
    assert scores["locality_tf_em"] == 0.0
    assert scores["locality_gen"] == 1.0  # same greedy tokens over the answer's length (3)
    assert scores["locality_gt_tf_acc"] == pytest.approx(1 / 3)  # only 5 is the true answer token
    assert scores["locality_gt_gen"] == 0.0
    assert scores["reliability_tf_em"] == 1.0 and scores["reliability_gen"] == 1.0
    assert scores["generality_tf_acc"] is None and scores["portability_gen"] is None
    assert score(probes, post, post)["locality_tf_em"] == 1.0


def test_locality_needs_pre_edit_predictions():
    probes = Probes(("p", "q"), ("a", "b"), ("reliability", "locality"))
    post = Predictions([[1], [2]], [[1], [2]], [[1], [2]], ["a", "b"])
    with pytest.raises(ValueError, match="unedited"):
        score(probes, post)


# ----------------------------------------------------------------------------- CounterFact's scores
class LogitLM(nn.Module):
    """A causal LM whose next-token logits depend only on the current character: ``rows[c]`` maps
    next characters to logits (every other token 0); characters without a row predict byte + 1."""

    def __init__(self, rows: dict[str, dict[str, float]], vocab: int = 260):
        super().__init__()
        table = torch.zeros(vocab, vocab)
        for i in range(vocab):
            table[i, min(i + 1, vocab - 1)] = 10.0
        for c, logits in rows.items():
            table[3 + ord(c)].zero_()
            for nxt, value in logits.items():
                table[3 + ord(c), 3 + ord(nxt)] = value
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(name_or_path="logit-lm")

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V)


# after "b" or "y" comes " " (logit 5); after " " the answers: R (new) 3, Q (a neighbour's truth) 2, P (old) 1
CF_ROWS = {"b": {" ": 5.0}, "y": {" ": 5.0}, " ": {"R": 3.0, "Q": 2.0, "P": 1.0}}
V = 260


def _lp_space() -> float:
    return 5.0 - math.log(V - 1 + math.exp(5.0))  # log P(" " | "b"), by hand


def _lp_after_space(logit: float) -> float:
    return logit - math.log(V - 3 + math.exp(3.0) + math.exp(2.0) + math.exp(1.0))  # log P(x | " ")


def _p(logit: float) -> float:
    """P(" x") = exp(mean log-probability of its two tokens), CounterFact's per-answer probability."""
    return math.exp((_lp_space() + _lp_after_space(logit)) / 2)


def cf_record() -> EditRecord:
    return EditRecord("0", "ab", "R", ground_truth="P", rephrases=("xb",), locality=(Probe("xy", "Q", "neighborhood"),))


def test_counterfact_scores_are_exact():
    model, tok = LogitLM(CF_ROWS), CharTokenizer()
    probes = Probes.of(cf_record())
    assert probes.contrasts == ("P", "P", "R")  # old answer for edit and paraphrase, new target for neighbours
    pred = predict(model, tok, probes)
    assert pred.answer_logprob[0] == pytest.approx((_lp_space() + _lp_after_space(3.0)) / 2, abs=1e-6)
    scores = score(probes, pred, pred)
    assert scores["efficacy_score"] == 1.0 and scores["paraphrase_score"] == 1.0  # P(R) > P(P)
    assert scores["efficacy_magnitude"] == pytest.approx(_p(3.0) - _p(1.0), abs=1e-6)
    assert scores["paraphrase_magnitude"] == pytest.approx(_p(3.0) - _p(1.0), abs=1e-6)
    assert scores["neighborhood_score"] == 0.0  # the new target R beats the neighbour's truth Q
    assert scores["neighborhood_magnitude"] == pytest.approx(_p(2.0) - _p(3.0), abs=1e-6)


def test_counterfact_scores_flip_when_the_old_answer_is_likelier():
    model, tok = LogitLM(CF_ROWS | {" ": {"R": 1.0, "Q": 2.0, "P": 3.0}}), CharTokenizer()
    probes = Probes.of(cf_record())
    scores = score(probes, predict(model, tok, probes), predict(model, tok, probes))
    assert scores["efficacy_score"] == 0.0 and scores["efficacy_magnitude"] == pytest.approx(_p(1.0) - _p(3.0), abs=1e-6)
    assert scores["neighborhood_score"] == 1.0


def test_efficacy_is_one_when_the_new_target_is_already_likelier():
    """The unedited model (method none) already prefers R to P: efficacy 1 before any edit."""
    model, tok = LogitLM(CF_ROWS), CharTokenizer()
    report = evaluate({"none": NoEdit()}, [cf_record()] * 3, model, tok, progress=False)
    means = report.methods["none"]["metrics"]
    assert means["efficacy_score"] == 1.0 and means["paraphrase_score"] == 1.0
    assert report.methods["none"]["intervals"]["efficacy_score"] == [1.0, 1.0]


def test_counterfact_scores_need_the_old_answer():
    record = EditRecord("0", "ab", "R", rephrases=("xb",))  # no ground_truth (e.g. KnowEdit's new facts)
    probes = Probes.of(record)
    scores = score(probes, predict(LogitLM(CF_ROWS), CharTokenizer(), probes))
    assert scores["efficacy_score"] is None and scores["paraphrase_magnitude"] is None
    assert scores["neighborhood_score"] is None  # no locality probe either


def test_metric_names_parse():
    assert parse_metric("locality_gt_tf_acc") == ("locality_gt", None, "tf_acc")
    assert parse_metric("portability[Subject_Aliasing]_wild_em") == ("portability", "Subject_Aliasing", "wild_em")
    assert parse_metric("efficacy_score") == ("counterfact", None, "efficacy_score")
    assert parse_metric("locality_wild_contains") is None  # agreement has no "contains"
    assert parse_metric("ms_per_edit") is None and parse_metric("case_id") is None
    assert all(parse_metric(m) is not None for m in METRICS) and set(COUNTERFACT) <= set(METRICS)


@pytest.mark.parametrize("text, answer, expected", [
    ("Rome, Italy", "Rome", True),
    ("  ROME!", "rome", True),
    ("Rome's", "Rome.", True),
    ("Romeo and", "Rome", False),
    ("New  York City", "new york", True),
    ("the U.S. Army", "the U.S.", True),
    ("Paris", "Rome", False),
    ("", "Rome", False),
    ("... and", "...", True),  # an answer of punctuation only is compared as written
])
def test_starts_with_answer(text, answer, expected):
    assert starts_with_answer(text, answer) is expected


def test_normalize_answer():
    assert normalize_answer("  Hello,   World!\n") == "hello world"
    assert normalize_answer("ÉCOLE") == "école"


def test_aggregate_skips_missing():
    rows = [{m: None for m in METRICS} | {"reliability_tf_acc": 1.0}, {m: None for m in METRICS} | {"reliability_tf_acc": 0.0}]
    rows[0]["generality_gen"] = 0.5
    means = aggregate(rows)
    assert means["reliability_tf_acc"] == 0.5 and means["generality_gen"] == 0.5 and means["locality_gen"] is None


# ----------------------------------------------------------------------------- the runner on a tiny llama
def _records(n=5, portability=False):
    return [
        EditRecord(
            case_id=str(i), prompt=f"Fact {i} is", target="Rome" if i % 2 else "Paris",
            rephrases=(f"Fact number {i} is", f"The {i}th fact:"),
            locality=(Probe("Water is", "wet"), Probe(f"Stone {i} is", "hard")),
            portability=(Probe(f"Its capital {i} is", "Rome"),) if portability else (),
        )
        for i in range(n)
    ]


@pytest.fixture
def setup():
    model, tok = tiny_model("llama")
    editor = mend.Editor.untrained(model, tok, {"editor": {"init_lr": 1.0}})
    methods = build_methods(["none", "mend", "ft", "ft-l"], editor, model, tok, {"ft_steps": 3, "ft_lr": 1e-2, "ftl_norm": 1e-3})
    return model, tok, methods


def _assert_clean(model):
    for name, param in model.named_parameters():
        assert param.grad is None, f"{name} has a .grad"
        assert not param.requires_grad, name


@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
def test_modes_revert_bitwise_and_none_is_the_reference(setup, mode, unchanged):
    model, tok, methods = setup
    check = unchanged(model)
    records = _records(5)
    report = evaluate(methods, records, model, tok, mode=mode, batch_size=2, curve_every=2, progress=False)
    check()
    _assert_clean(model)
    assert len(report.rows) == len(records) * len(methods)
    none_rows = [r for r in report.rows if r["method"] == "none"]
    for row in none_rows:
        assert row["locality_tf_acc"] == row["locality_tf_em"] == row["locality_gen"] == 1.0
    for row in report.rows:  # exact match implies token accuracy
        for kind in ("reliability", "generality", "locality", "locality_gt"):
            assert row[f"{kind}_tf_em"] <= row[f"{kind}_tf_acc"]
    # the edit methods did change the model while they were measured
    for name in ("mend", "ft"):
        edited = report.methods[name]["metrics"]
        assert edited != report.methods["none"]["metrics"], name
        assert report.methods[name]["ms_per_edit"] > 0
    assert report.methods["ft"]["metrics"]["reliability_tf_acc"] > report.methods["none"]["metrics"]["reliability_tf_acc"]


def test_each_measurement_records_the_largest_relative_change_of_an_edited_matrix(setup):
    model, tok, methods = setup
    records = _records(3)
    report = evaluate({k: methods[k] for k in ("none", "mend", "ft")}, records, model, tok, mode="sequential",
                      curve_every=3, wild_max_new_tokens=0, progress=False)
    rows = {name: [r for r in report.rows if r["method"] == name] for name in ("none", "mend", "ft")}
    assert all("relative_update" not in r for r in rows["none"])  # no matrices named, nothing measured
    assert all(r["relative_update"] > 0 for r in rows["mend"] + rows["ft"])
    # sequential: measured after the last edit, so every row sees the same accumulated change
    assert len({r["relative_update"] for r in rows["mend"]}) == 1
    assert report.methods["mend"]["relative_update"] == pytest.approx(rows["mend"][0]["relative_update"])
    assert "max ||dW||/||W||" in report.table()
    # WILD answers left out: no WILD metric, no WILD text
    assert all(r["wild_answer"] is None and r.get("reliability_wild_em") is None for r in report.rows)


def _knowedit_records(n=4):
    """Records with two portability kinds and two locality kinds (KnowEdit-like)."""
    return [
        EditRecord(
            case_id=str(i), prompt=f"Fact {i} is", target="Rome", ground_truth="Paris", rephrases=(f"Fact no {i} is",),
            portability=(Probe(f"Its river {i} is", "Tiber", "Reasoning"), Probe(f"Fact #{i} is", "Rome", "Subject_Aliasing")),
            locality=(Probe("Water is", "wet", "neighborhood"), Probe(f"Stone {i} is", "hard", "unrelated")),
        )
        for i in range(n)
    ]


def test_per_kind_metrics_ceiling_and_intervals(setup):
    model, tok, methods = setup
    report = evaluate({"none": methods["none"], "ft": methods["ft"]}, _knowedit_records(), model, tok,
                      progress=False, bootstrap=Bootstrap(100))
    assert report.settings["probe_kinds"] == {"portability": ["Reasoning", "Subject_Aliasing"],
                                              "locality": ["neighborhood", "unrelated"]}
    none, ft = report.methods["none"], report.methods["ft"]
    for kind in ("Reasoning", "Subject_Aliasing"):
        assert ft["metrics"][f"portability[{kind}]_tf_acc"] is not None
    for kind in ("neighborhood", "unrelated"):
        assert none["metrics"][f"locality[{kind}]_tf_acc"] == 1.0 and none["metrics"][f"locality[{kind}]_wild_em"] == 1.0
    # the ceiling is the unedited model's accuracy on the locality answers, the same beside every method
    for protocol in ("tf_acc", "gen", "wild_em", "wild_contains"):
        assert ft["metrics"][f"locality_ceiling_{protocol}"] == none["metrics"][f"locality_gt_{protocol}"]
    # an interval beside every metric that has a value, around it
    for stats in (none, ft):
        for name, value in stats["metrics"].items():
            if value is not None:
                lo, hi = stats["intervals"][name]
                assert lo - 1e-12 <= value <= hi + 1e-12, name
        assert stats["ms_per_edit_interval"] is not None
    table = report.table()
    assert "locality[unrelated]_tf_acc" in table and "portability[Reasoning]_gen" in table
    assert "95% bootstrap interval" in table and "probe kinds: portability: Reasoning, Subject_Aliasing" in table
    row = next(line for line in table.splitlines() if line.startswith("locality_tf_acc "))
    assert "100.0 [100.0, 100.0]" in row  # none: full agreement, interval beside it


def test_one_kind_is_not_split(setup):
    model, tok, methods = setup
    report = evaluate({"none": methods["none"]}, _records(2), model, tok, progress=False, bootstrap=Bootstrap(0))
    assert not any("[" in name for name in report.methods["none"]["metrics"])
    assert report.methods["none"]["intervals"]["reliability_tf_acc"] is None  # 0 resamples: no intervals
    assert "bootstrap" not in report.table()


class Spy(EditMethod):
    """Records the calls the runner makes."""

    name = "spy"

    def __init__(self, fail_at: int | None = None, inner: EditMethod | None = None):
        self.calls, self.fail_at, self.inner = [], fail_at, inner

    def apply(self, pairs):
        self.calls.append(("apply", len(pairs)))
        if self.inner is not None:
            self.inner.apply(pairs)
        if self.fail_at is not None and sum(c[0] == "apply" for c in self.calls) == self.fail_at:
            raise RuntimeError("boom")

    def revert(self):
        self.calls.append(("revert", 0))
        if self.inner is not None:
            self.inner.revert()


def _applies(spy):
    return [n for kind, n in spy.calls if kind == "apply"]


def test_call_pattern_of_each_mode():
    model, tok = tiny_model("llama")
    records = _records(5)
    spy = Spy()
    evaluate([spy], records, model, tok, mode="single", progress=False)
    assert spy.calls[:4] == [("apply", 1), ("revert", 0), ("apply", 1), ("revert", 0)]
    spy = Spy()
    evaluate([spy], records, model, tok, mode="batch", batch_size=2, progress=False)
    assert _applies(spy) == [2, 2, 1]
    assert spy.calls[:2] == [("apply", 2), ("revert", 0)]
    spy = Spy()
    evaluate([spy], records, model, tok, mode="sequential", curve_every=2, progress=False)
    assert spy.calls[:5] == [("apply", 1)] * 5 and spy.calls[5] == ("revert", 0)


def test_a_failing_method_leaves_the_model_restored(setup, unchanged):
    model, tok, methods = setup
    check = unchanged(model)
    spy = Spy(fail_at=3, inner=methods["ft"])
    with pytest.raises(RuntimeError, match="boom"):
        evaluate({"ft": spy}, _records(5), model, tok, mode="sequential", progress=False)
    check()
    _assert_clean(model)


class RefusesSome:
    """Wraps a method; refuses (as `EditFailedError`, nothing applied) the applies numbered in ``refuse``."""

    def __init__(self, inner, refuse):
        self.inner, self.refuse, self.n = inner, set(refuse), 0
        self.targets = inner.editor.targets

    def apply(self, pairs):
        self.n += 1
        if self.n in self.refuse:
            raise mend.EditFailedError("the update for x contains NaN or inf; the model was not changed")
        self.inner.apply(pairs)

    def revert(self):
        self.inner.revert()


@pytest.mark.parametrize("mode", ["single", "batch", "sequential"])
def test_a_refused_edit_is_recorded_and_the_run_goes_on(setup, mode, unchanged):
    model, tok, methods = setup
    check = unchanged(model)
    report = evaluate({"mend": RefusesSome(methods["mend"], refuse={2}), "plain": methods["mend"],
                       "none": methods["none"]}, _records(5),
                      model, tok, mode=mode, batch_size=2, curve_every=2, wild_max_new_tokens=0, progress=False)
    check()
    rows = [r for r in report.rows if r["method"] == "mend"]
    assert len(rows) == 5  # every record measured, the refused one included
    refused = [r["index"] for r in rows if r["refused"]]
    assert refused == ([1] if mode in ("single", "sequential") else [2, 3])  # the second apply
    assert report.methods["mend"]["n_refused"] == len(refused) and report.methods["plain"]["n_refused"] == 0
    assert "refused edits" in report.table()
    plain = {r["index"]: r for r in report.rows if r["method"] == "plain"}
    none = {r["index"]: r for r in report.rows if r["method"] == "none"}
    if mode == "single":  # the refused record scores as the unedited model; the others as a plain run
        metrics = metric_names(report.rows)
        assert rows[1]["locality_tf_acc"] == 1.0
        assert all(rows[1][m] == none[1][m] for m in metrics)
        assert any(plain[1][m] != none[1][m] for m in metrics)  # the plain edit of that record did change it
        assert all(rows[i][m] == plain[i][m] for i in (0, 2, 3, 4) for m in metrics)
    if mode == "sequential":
        assert [p["n_refused"] for p in report.curves["mend"]] == [1, 1, 1]


def test_sequential_curve(setup):
    model, tok, methods = setup
    report = evaluate({"mend": methods["mend"]}, _records(5), model, tok, mode="sequential", curve_every=2,
                      curve_sample=2, progress=False)
    points = report.curves["mend"]
    assert [p["n_edits"] for p in points] == [2, 4, 5]
    assert all(p["intervals"]["reliability_tf_acc"] is not None for p in points)
    assert [p["n_measured"] for p in points] == [1, 1, 2]  # sample = records 0 and 4
    assert all(r["n_applied"] == 5 for r in report.rows)
    assert curve_points(5, 2) == [2, 4, 5] and curve_points(4, 2) == [2, 4] and curve_points(3, 10) == [3]
    assert curve_sample_indices(10, None) == list(range(10)) and curve_sample_indices(10, 3) == [0, 4, 9]


def test_output_files(setup, tmp_path):
    pytest.importorskip("matplotlib")
    model, tok, methods = setup
    records = _records(3, portability=True)
    meta = {"data": "data/cf.json", "editor_checkpoint": "runs/x/best", "note": "hello"}
    report = evaluate(methods, records, model, tok, mode="single", out_dir=tmp_path, progress=False, meta=meta)
    lines = (tmp_path / EDITS_FILE).read_text().splitlines()
    assert len(lines) == len(records) * len(methods)
    row = json.loads(lines[0])
    assert {"method", "case_id", "prompt", "target", "generated", "wild_answer", "ms_per_edit"} <= set(row)
    assert set(METRICS) <= set(row)
    assert row["portability_tf_acc"] is not None
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert summary["mode"] == "single" and summary["data"] == "data/cf.json"
    assert summary["editor_checkpoint"] == "runs/x/best" and summary["mend_version"] == mend.__version__
    assert summary["model"] and summary["extra"] == {"note": "hello"}
    assert set(summary["methods"]) == {"none", "mend", "ft", "ft-l"}
    assert summary["methods"]["ft"]["settings"]["steps"] == 3 and "ms_per_edit" in summary["methods"]["ft"]
    assert set(summary["methods"]["ft"]["intervals"]) == set(summary["methods"]["ft"]["metrics"])
    assert summary["settings"]["wild"]["max_new_tokens"] > 0 and summary["settings"]["bootstrap"]["samples"] == 1000
    table = (tmp_path / TABLE_FILE).read_text()
    assert "ms/edit" in table and "ft-l" in table and "reliability_gen" in table
    assert (tmp_path / METRICS_PLOT).stat().st_size > 0 and not (tmp_path / CURVE_PLOT).exists()
    assert report.files["summary"] == tmp_path / SUMMARY_FILE
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


def test_sequential_writes_curve_plot(setup, tmp_path):
    pytest.importorskip("matplotlib")
    model, tok, methods = setup
    evaluate({"none": methods["none"]}, _records(3), model, tok, mode="sequential", curve_every=1, out_dir=tmp_path,
             progress=False)
    assert (tmp_path / CURVE_PLOT).stat().st_size > 0
    assert len(json.loads((tmp_path / SUMMARY_FILE).read_text())["curves"]["none"]) == 3


def test_plots_skipped_without_matplotlib(setup, tmp_path, monkeypatch):
    model, tok, methods = setup
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    with pytest.warns(UserWarning, match="matplotlib"):
        evaluate({"none": methods["none"]}, _records(2), model, tok, out_dir=tmp_path, progress=False)
    assert (tmp_path / SUMMARY_FILE).exists() and not (tmp_path / METRICS_PLOT).exists()


def test_printed_table(setup, capsys):
    model, tok, methods = setup
    evaluate({"none": methods["none"]}, _records(2), model, tok, progress=True)
    out = capsys.readouterr().out
    assert "ms/edit" in out and "locality_tf_acc" in out


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "parallel"}, "mode must be one of single, batch, sequential"),
    ({"batch_size": 0}, "batch_size"),
    ({"curve_every": 0}, "curve_every"),
    ({"curve_sample": 0}, "curve_sample"),
    ({"wild_max_new_tokens": -1}, "wild_max_new_tokens"),
    ({"wild_template": "no placeholder"}, "exactly once"),
])
def test_bad_arguments(setup, kwargs, match):
    model, tok, methods = setup
    with pytest.raises(ValueError, match=match):
        evaluate(methods, _records(1), model, tok, progress=False, **kwargs)


def test_bad_records_and_methods(setup):
    model, tok, methods = setup
    with pytest.raises(ValueError, match="no records"):
        evaluate(methods, [], model, tok, progress=False)
    with pytest.raises(TypeError, match="record #0"):
        evaluate(methods, [{"prompt": "a", "target": "b"}], model, tok, progress=False)
    with pytest.raises(ValueError, match="share a name"):
        evaluate([methods["ft"], methods["ft"]], _records(1), model, tok, progress=False)


def test_a_method_that_never_changes_the_model_is_scored_on_the_pre_edit_pass(monkeypatch):
    import mend.evaluate as harness

    model, tok = tiny_model("llama")
    records = _records(4)
    calls = []
    real_predict = harness.predict

    def counting_predict(*args, **kwargs):
        calls.append(1)
        return real_predict(*args, **kwargs)

    monkeypatch.setattr(harness, "predict", counting_predict)
    report = evaluate([NoEdit()], records, model, tok, mode="single", progress=False)
    assert len(calls) == len(records)  # the pre-edit pass only
    calls.clear()
    measured = evaluate([Spy()], records, model, tok, mode="single", progress=False)  # a no-op that says it edits
    assert len(calls) == 2 * len(records)
    for reused, predicted in zip(report.rows, measured.rows):
        assert {k: v for k, v in reused.items() if k not in ("method", "ms_per_edit")} == \
               {k: v for k, v in predicted.items() if k not in ("method", "ms_per_edit")}
