"""Edit-time step calibration (``editor.edit_margin``): an edit's update is scaled to the least
multiple of the trained step at which the edited prompt's targets lead by the margin, and the
calibrated edit behaves like any other (exact revert, the update `compute_updates` reports)."""

from __future__ import annotations

import pytest
import torch

from mend import ConfigError, Editor, load_config
from mend.batching import encode_pairs
from mend.calibration import fact_margins, search_scale
from mend.scoring import target_logits
from tiny_models import tiny_model

EDIT = ("The mother tongue of Bob is", "xy")
GOAL = 0.02  # the tiny model's margin goes from -0.47 unedited to +0.07 after one step of init_lr 100


def counted(margin_of):
    """``margin_of`` as the search calls it, recording each scale it is asked about."""
    calls = []

    def margin_at(scale):
        calls.append(scale)
        return margin_of(scale)

    return margin_at, calls


def test_fact_margins_are_each_rows_least_lead_of_the_target_over_the_next_best_token():
    tokenizer = tiny_model("llama")[1]
    batch = encode_pairs(tokenizer, ["Hi", "Hello there"], ["ab", "c"])
    rows = batch.target_rows.tolist()  # row of each target token
    logits = torch.zeros(len(rows), 260)
    logits[torch.arange(len(rows)), batch.target_ids] = torch.tensor([3.0, 1.0, 2.0, 5.0][: len(rows)] + [4.0] * (len(rows) - 4))
    logits[:, 7] = 1.5  # the runner-up everywhere (no target id is 7 here)
    assert 7 not in batch.target_ids.tolist()
    want = [min(float(logits[i, batch.target_ids[i]]) - 1.5 for i in range(len(rows)) if rows[i] == row) for row in (0, 1)]
    torch.testing.assert_close(fact_margins(logits, batch), torch.tensor(want))


def test_the_search_finds_the_least_scale_that_reaches_the_goal_and_returns_only_a_measured_one():
    margin_at, calls = counted(lambda s: -2.0 + 8.0 * s ** 2)  # reaches 2.0 at s = 0.707
    found = search_scale(margin_at, 2.0, -2.0, max_scale=1.0, passes=12)
    assert found.scale in calls and found.margin == -2.0 + 8.0 * found.scale ** 2
    assert found.margin >= 2.0
    assert found.scale == pytest.approx(0.5 ** 0.5, abs=0.01)
    assert found.tries == len(calls) == 12 and found.reached
    few = search_scale(counted(lambda s: -2.0 + 8.0 * s ** 2)[0], 2.0, -2.0, max_scale=1.0, passes=4)
    assert few.margin >= 2.0 and found.scale <= few.scale < 1.0  # fewer passes: a coarser, still valid, scale


def test_a_step_too_short_is_lengthened_up_to_the_largest_allowed_and_no_further():
    longer = search_scale(lambda s: -2.0 + 2.0 * s, 1.0, -2.0, max_scale=2.0, passes=8)
    assert 1.0 < longer.scale <= 2.0 and longer.margin >= 1.0 and longer.scale == pytest.approx(1.5, abs=0.01)
    margin_at, calls = counted(lambda s: -2.0 + 2.0 * s)
    out_of_reach = search_scale(margin_at, 5.0, -2.0, max_scale=2.0, passes=8)
    assert (out_of_reach.scale, out_of_reach.margin, calls) == (2.0, 2.0, [1.0, 2.0])  # the best it measured
    assert not out_of_reach.reached
    held = search_scale(lambda s: -2.0 + 2.0 * s, 1.0, -2.0, max_scale=1.0, passes=8)
    assert (held.scale, held.margin, held.reached) == (1.0, 0.0, False)  # edit_max_scale 1: never past the step


def test_a_step_that_does_not_help_is_still_applied_and_a_non_finite_margin_counts_as_the_worst():
    worse = search_scale(lambda s: -2.0 - s, 1.0, -2.0, max_scale=2.0, passes=4)
    assert (worse.scale, worse.reached) == (1.0, False)  # never 0: an edit is not silently dropped
    broken = search_scale(lambda s: float("nan") if s > 1 else 0.5, 1.0, -2.0, max_scale=2.0, passes=4)
    assert (broken.scale, broken.margin) == (1.0, 0.5)
    nan_inside = search_scale(lambda s: float("nan") if 0.2 < s < 1 else -1.0 + 5.0 * s, 1.0, -1.0, max_scale=1.0, passes=6)
    assert nan_inside.reached and nan_inside.margin >= 1.0 and nan_inside.scale <= 1.0


def test_a_model_that_already_says_the_target_with_the_margin_is_left_alone():
    margin_at, calls = counted(lambda s: 1.0 / 0.0)
    found = search_scale(margin_at, 1.0, 3.0, max_scale=2.0, passes=3)
    assert (found.scale, found.tries, calls, found.reached) == (0.0, 0, [], True)


def calibrated_editor(init_lr: float = 100.0, **settings) -> Editor:
    model, tokenizer = tiny_model("llama")
    return Editor.untrained(model, tokenizer, {"editor": {"init_lr": init_lr, **settings}})


def margin_now(editor, fact=EDIT) -> float:
    batch = encode_pairs(editor.tokenizer, [fact[0]], [fact[1]])
    with torch.no_grad():
        return float(fact_margins(target_logits(editor.model, batch), batch)[0])


def test_a_calibrated_edit_is_the_trained_update_scaled_to_just_reach_the_margin_and_reverts_exactly(unchanged):
    editor = calibrated_editor()
    full, _, _ = editor.compute_updates([EDIT])
    before = margin_now(editor)
    editor.edit(*EDIT)
    overshoot = margin_now(editor)
    editor.revert()
    assert before < GOAL < overshoot

    editor.configure(edit_margin=GOAL, edit_margin_passes=4)
    check = unchanged(editor.model)
    reported, _, _ = editor.compute_updates([EDIT])
    check()  # the search's tries are undone bit for bit
    result = editor.edit(*EDIT)
    scale = result.calibration.scale
    assert 0.0 < scale < 1.0 and result.calibration.reached
    assert result.calibration.margin_before == pytest.approx(before, abs=1e-5)
    for name in full:
        torch.testing.assert_close(reported[name], scale * full[name], rtol=1e-5, atol=1e-7)
    assert margin_now(editor) == pytest.approx(result.calibration.margin, abs=1e-5)
    assert GOAL <= margin_now(editor) < overshoot
    editor.revert()
    check()


def test_a_step_too_short_is_lengthened_on_the_model_up_to_edit_max_scale(unchanged):
    editor = calibrated_editor(init_lr=2.0)  # one step of 2 leaves the target behind (margin -0.3)
    check = unchanged(editor.model)
    editor.edit(*EDIT)
    assert margin_now(editor) < 0.0
    editor.revert()
    editor.configure(edit_margin=0.0, edit_max_scale=10.0)
    result = editor.edit(*EDIT)
    assert 1.0 < result.calibration.scale <= 10.0 and margin_now(editor) >= 0.0
    editor.revert()
    check()


def test_several_facts_take_one_scale_at_which_every_one_of_them_leads(unchanged):
    facts = [("Hi", "yo"), ("Anna lives in", "yo")]  # together, each goes from about -0.3 to +0.1
    editor = calibrated_editor(edit_margin=GOAL, edit_chunk=1)  # one capture and one try per fact
    check = unchanged(editor.model)
    result = editor.edit_many(facts)
    margins = [margin_now(editor, fact) for fact in facts]
    assert 0.0 < result.calibration.scale < 1.0 and min(margins) >= GOAL
    assert min(margins) == pytest.approx(result.calibration.margin, abs=1e-5)
    editor.revert()
    check()


def test_a_lifelong_editor_refuses_to_calibrate_and_changes_nothing(unchanged):
    editor = calibrated_editor()
    lifelong = editor.variant(lifelong=True)  # shares the networks, and so their settings
    editor.configure(edit_margin=GOAL)
    check = unchanged(editor.model)
    with pytest.raises(ValueError, match="edit_margin needs a stateless editor"):
        lifelong.edit(*EDIT)
    check()
    assert lifelong.memory.n_edits == 0 and lifelong.applied == []
    editor.configure(edit_margin=None)
    lifelong.edit(*EDIT)  # without the margin it edits as before


def test_a_search_that_fails_leaves_the_weights_exactly_as_they_were(unchanged, monkeypatch):
    editor = calibrated_editor(edit_margin=GOAL)
    check = unchanged(editor.model)
    calls = []

    def failing(model, batch, params=None):
        calls.append(1)
        if len(calls) == 2:  # the capture's pass, then the search's first try, with the update in place
            raise RuntimeError("out of memory")
        return target_logits(model, batch, params)

    monkeypatch.setattr("mend.editor.target_logits", failing)
    monkeypatch.setattr("mend.capture.target_logits", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        editor.edit(*EDIT)
    check()
    assert editor.applied == []


@pytest.mark.parametrize("override, named", [
    ("editor.edit_margin=-1", "edit_margin must be a finite number >= 0"),
    ("editor.edit_margin=inf", "edit_margin must be a finite number >= 0"),
    ("editor.edit_margin_passes=0", "edit_margin_passes must be >= 1"),
    ("editor.edit_max_scale=0.5", "edit_max_scale must be a finite number >= 1"),
    ("editor.edit_max_scale=inf", "edit_max_scale must be a finite number >= 1"),
])
def test_a_bad_margin_setting_is_refused_by_name(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config([override])


def test_the_margin_settings_are_saved_with_the_editor(tmp_path):
    editor = calibrated_editor()
    editor.configure(edit_margin=2.5, edit_max_scale=1.5)
    editor.save(tmp_path / "editor")
    loaded = Editor.load(tmp_path / "editor", *tiny_model("llama"))
    assert (loaded.networks.config.edit_margin, loaded.networks.config.edit_max_scale) == (2.5, 1.5)
    plain = Editor.load(tmp_path / "editor", *tiny_model("llama"), settings={"edit_margin": None})
    assert plain.edit(*EDIT).calibration is None


def test_mend_eval_records_each_calibrated_edits_scale_and_their_mean():
    from mend.baselines import build_methods
    from mend.data.records import EditRecord, Probe
    from mend.evaluate import evaluate

    editor = calibrated_editor(edit_margin=GOAL)
    records = [EditRecord(case_id=str(i), prompt=EDIT[0], target=EDIT[1], rephrases=(f"Bob {i} speaks",),
                          locality=(Probe("Water is", "wet"),)) for i in range(2)]
    methods = build_methods(["mend"], editor, editor.model, editor.tokenizer, {})
    report = evaluate(methods, records, editor.model, editor.tokenizer, mode="single", wild_max_new_tokens=0, progress=False)
    scales = [row["calibrated_scale"] for row in report.rows]
    assert len(scales) == 2 and all(0.0 < s < 1.0 for s in scales)
    assert report.methods["mend"]["calibrated_scale"] == pytest.approx(sum(scales) / 2)
    assert "calibrated scale" in report.table()
    records[1] = EditRecord(case_id="1", prompt="Hi", target="yo", rephrases=("Hello",), locality=(Probe("Water is", "wet"),))
    sequential = evaluate(methods, records, editor.model, editor.tokenizer, mode="sequential", curve_every=2,
                          wild_max_new_tokens=0, progress=False)
    by_record = [row["calibrated_scale"] for row in sequential.rows]
    assert by_record[0] == pytest.approx(scales[0]) and by_record[1] != by_record[0]  # each row: its own edit's scale
    editor.configure(edit_margin=None)
    plain = evaluate(methods, records, editor.model, editor.tokenizer, mode="single", wild_max_new_tokens=0, progress=False)
    assert all("calibrated_scale" not in row for row in plain.rows) and "calibrated_scale" not in plain.methods["mend"]
    assert "calibrated scale" not in plain.table()
