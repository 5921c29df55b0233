"""The editor API: an untrained edit is a gradient step; edits revert bit for bit; bad input and
bad updates change nothing."""

from __future__ import annotations

import math

import pytest
import torch

import mend.editor
from mend import EditFailedError, EditInputError, EditResult, Editor, load_config
from mend.batching import encode_pairs
from mend.targets import to_storage
from tiny_models import tiny_model

PROMPT, TARGET = "The Eiffel Tower is in", "Rome"
FACTS = [("The Eiffel Tower is in", "Rome"), ("Water boils at", "42 degrees"), ("The sky is", "green")]
STEP = 0.5  # init_lr large enough that the update dominates float rounding of the weights


def untrained(family="gpt2", **editor):
    model, tokenizer = tiny_model(family)
    return Editor.untrained(model, tokenizer, {"editor": editor} if editor else None)


def summing(family="gpt2", **editor):
    """An untrained editor that sums the facts' rank-1 updates (the MEND paper): one fact's edit is
    then exactly one gradient step (the ridge default tends to it, `tests/test_aggregate.py`)."""
    return untrained(family, aggregation="sum", **editor)


def weights(editor) -> dict[str, torch.Tensor]:
    """Copies of the edited matrices, by name."""
    params = dict(editor.model.named_parameters())
    return {t.name: params[t.name].detach().clone() for t in editor.targets}


# ---------------------------------------------------------------- identity editor == gradient step
def test_an_untrained_edit_is_one_gradient_step_of_init_lr(family, unchanged, autograd_gradients):
    editor = summing(family, init_lr=STEP)
    names = [t.name for t in editor.targets]
    batch = encode_pairs(editor.tokenizer, [PROMPT], [TARGET], max_length=editor.max_length)
    loss, grads = autograd_gradients(editor.model, names, batch)
    before = weights(editor)
    others_unchanged = unchanged(editor.model, ignore=names)

    result = editor.edit(PROMPT, TARGET)

    after = weights(editor)
    for name in names:
        assert grads[name].abs().max() > 0
        torch.testing.assert_close(after[name], before[name] - STEP * grads[name], rtol=1e-5, atol=1e-6)
    others_unchanged()
    assert math.isclose(result.loss, float(loss), rel_tol=1e-5)


def test_update_norms_are_init_lr_times_gradient_norms(autograd_gradients):
    editor = summing("llama")  # default init_lr
    names = [t.name for t in editor.targets]
    batch = encode_pairs(editor.tokenizer, [PROMPT], [TARGET], max_length=editor.max_length)
    _, grads = autograd_gradients(editor.model, names, batch)
    result = editor.edit(PROMPT, TARGET)
    init_lr = editor.networks.config.init_lr
    for name in names:
        assert math.isclose(result.update_norms[name], init_lr * float(grads[name].norm()), rel_tol=1e-4)


def test_edit_result_reports_what_the_edit_did():
    editor = untrained("gpt2")
    before = weights(editor)
    first = editor.edit(PROMPT, TARGET)
    second = editor.edit(*FACTS[1])
    assert isinstance(first, EditResult)
    assert (first.edit_id, second.edit_id) == (0, 1)
    assert first.pairs == [(PROMPT, TARGET)]
    assert first.changed == [t.name for t in editor.targets]
    assert set(first.update_norms) == set(first.changed)
    assert all(norm > 0 for norm in first.update_norms.values())
    assert isinstance(first.seconds, float) and 0 < first.seconds < 60
    assert math.isfinite(first.loss) and first.loss > 0
    assert editor.applied == [first, second]
    # the reported norms are the norms of what was added to the weights (first edit alone)
    editor.revert(second)
    for name, weight in weights(editor).items():
        assert math.isclose(float((weight - before[name]).norm()), first.update_norms[name], rel_tol=1e-3)


def test_edit_many_applies_all_pairs_in_one_batch(monkeypatch, autograd_gradients):
    editor = summing("llama", init_lr=STEP)
    names = [t.name for t in editor.targets]
    captured = []

    def counting_capture(model, targets, batch, *args, **kwargs):
        captured.append(len(batch))
        return capture(model, targets, batch, *args, **kwargs)

    capture = mend.editor.capture_rank1
    monkeypatch.setattr(mend.editor, "capture_rank1", counting_capture)
    steps = []  # each fact's own gradient: no fact's loss is divided by the number of facts
    for prompt, target in FACTS:
        batch = encode_pairs(editor.tokenizer, [prompt], [target], max_length=editor.max_length)
        steps.append(autograd_gradients(editor.model, names, batch)[1])
    before = weights(editor)

    result = editor.edit_many([FACTS[0], list(FACTS[1]), {"prompt": FACTS[2][0], "target": FACTS[2][1]}])

    assert captured == [3]  # one forward/backward over a batch of all three pairs
    assert result.pairs == FACTS
    for name, weight in weights(editor).items():
        want = before[name] - STEP * sum(step[name] for step in steps)
        torch.testing.assert_close(weight, want, rtol=1e-5, atol=1e-6)


def test_edits_leave_no_gradients_and_freeze_editor_statistics():
    editor = untrained("gpt2")
    editor.networks.train()  # even so, an edit must not move the running statistics
    state = {k: v.clone() for k, v in editor.networks.state_dict().items()}
    editor.edit(PROMPT, TARGET)
    assert all(p.grad is None and not p.requires_grad for p in editor.model.parameters())
    assert all(p.grad is None for p in editor.networks.parameters())
    assert all(torch.equal(v, state[k]) for k, v in editor.networks.state_dict().items())


def test_explicit_edit_params_limit_what_changes(unchanged):
    model, tokenizer = tiny_model("gpt2")
    names = ["transformer.h.0.attn.c_attn.weight", "transformer.h.3.mlp.c_proj.weight"]
    editor = Editor.untrained(model, tokenizer, {"model": {"edit_params": names}})
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    result = editor.edit(PROMPT, TARGET)
    assert result.changed == names
    assert [n for n, p in params.items() if not torch.equal(p, before[n])] == names


def test_untrained_accepts_a_loaded_config(tmp_path):
    model, tokenizer = tiny_model("gpt2")
    cfg = load_config(["editor.init_lr=0.25", "model.edit_last_n_blocks=1", "model.max_length=64"], config_dir=tmp_path)
    editor = Editor.untrained(model, tokenizer, cfg)
    assert [t.layer for t in editor.targets] == [3, 3]
    assert editor.max_length == 64
    assert math.isclose(float(editor.networks.step_sizes()[editor.targets[0].name].detach()), 0.25, rel_tol=1e-6)


# ---------------------------------------------------------------- exact revert
@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_revert_restores_every_weight_bit_for_bit(family, unchanged):
    editor = untrained(family, init_lr=STEP)
    original = unchanged(editor.model)
    for fact in FACTS:
        editor.edit(*fact)
    editor.edit_many(FACTS[:2])
    editor.revert()
    original()
    assert editor.applied == []
    editor.revert()  # nothing applied: a no-op
    original()


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_reverting_a_middle_edit_replays_the_others_exactly(family, unchanged):
    editor = untrained(family, init_lr=STEP)
    params = dict(editor.model.named_parameters())
    original = weights(editor)
    everything_else = unchanged(editor.model, ignore=original)
    results, updates = [], []
    for fact in FACTS:
        expected, _, _ = editor.compute_updates([fact])  # what this edit will add
        results.append(editor.edit(*fact))
        updates.append(expected)

    def replayed(kept):
        """original + the kept edits' updates, added in order in the storage layout."""
        state = {name: weight.clone() for name, weight in original.items()}
        for index in kept:
            for target in editor.targets:
                state[target.name].add_(to_storage(updates[index][target.name], target))
        return state

    def assert_state(kept):
        for name, want in replayed(kept).items():
            assert torch.equal(params[name], want), f"{name} differs after keeping edits {kept}"

    assert_state([0, 1, 2])
    editor.revert(results[1])
    assert_state([0, 2])
    assert editor.applied == [results[0], results[2]]
    editor.revert(results[0])
    assert_state([2])
    editor.revert(results[2])
    assert_state([])
    everything_else()


def test_reverting_an_edit_that_is_not_applied_is_refused(unchanged):
    editor = untrained("gpt2")
    result = editor.edit(PROMPT, TARGET)
    editor.revert(result)
    state = unchanged(editor.model)
    with pytest.raises(ValueError, match="not applied"):
        editor.revert(result)
    state()


def test_two_identical_edits_are_two_results_reverted_one_at_a_time(unchanged):
    """Results compare by identity: the same fact edited twice gives two distinguishable results,
    and a copy of a result is not an applied edit."""
    import copy

    editor = untrained("llama", init_lr=STEP)
    params = dict(editor.model.named_parameters())
    original = weights(editor)
    everything = unchanged(editor.model)
    first = editor.edit(PROMPT, TARGET)
    second_update, _, _ = editor.compute_updates([(PROMPT, TARGET)])  # what the second edit will add
    second = editor.edit(PROMPT, TARGET)
    assert first != second and first == first and len({first, second}) == 2
    with pytest.raises(ValueError, match="not applied"):
        editor.revert(copy.copy(second))
    editor.revert(first)
    assert editor.applied == [second] and editor.applied[0] is second
    for target in editor.targets:  # the originals plus the second edit's update alone
        want = original[target.name] + to_storage(second_update[target.name], target)
        assert torch.equal(params[target.name], want), target.name
    editor.revert(second)
    assert editor.applied == []
    everything()


# ---------------------------------------------------------------- temporary edits
def test_edited_applies_inside_the_block_and_restores_after(unchanged):
    editor = untrained("llama")
    original = unchanged(editor.model)
    before = weights(editor)
    with editor.edited(PROMPT, TARGET) as result:
        assert result.changed == [t.name for t in editor.targets]
        assert all(not torch.equal(w, before[n]) for n, w in weights(editor).items())
        assert editor.applied == [result]
    original()
    assert editor.applied == []


def test_edited_restores_when_the_block_raises(unchanged):
    editor = untrained("gpt2")
    editor.edit(*FACTS[1])  # an earlier, lasting edit
    with_first_edit = unchanged(editor.model)
    with pytest.raises(ZeroDivisionError):
        with editor.edited(PROMPT, TARGET):
            1 / 0
    with_first_edit()
    assert len(editor.applied) == 1


# ---------------------------------------------------------------- bad input changes nothing
BAD_EDITS = [
    (("", "Rome"), "prompt .*empty"),
    (("   \t", "Rome"), "prompt .*empty"),
    ((PROMPT, ""), "target .*empty"),
    ((PROMPT, "\n "), "target .*empty"),
    ((None, "Rome"), "prompt .*must be a string"),
    ((PROMPT, 3), "target .*must be a string"),
    ((b"bytes", "Rome"), "prompt .*must be a string"),
    (("x" * 70, "Rome"), "over the limit of 64"),
]
BAD_PAIRS = [
    ("The Eiffel Tower is in Rome", "list of .*pairs|tuple"),
    ((PROMPT, TARGET), "pair #0 must be a \\(prompt, target\\) tuple"),
    ([(PROMPT,)], "pair #0 must be a \\(prompt, target\\) tuple"),
    ([(PROMPT, TARGET, "extra")], "pair #0 must be a \\(prompt, target\\) tuple"),
    ([], "no \\(prompt, target\\) pairs"),
    (None, "list of \\(prompt, target\\)"),
    (42, "list of \\(prompt, target\\)"),
    ([FACTS[0], ("", "Rome")], "prompt #1 .*empty"),
    ([{"prompt": PROMPT}], "target #0 must be a string"),
]


@pytest.mark.parametrize("args, match", BAD_EDITS, ids=[repr(a)[:30] for a, _ in BAD_EDITS])
def test_bad_edit_input_raises_and_changes_nothing(args, match, unchanged):
    model, tokenizer = tiny_model("gpt2")
    editor = Editor.untrained(model, tokenizer, {"model": {"max_length": 64}})
    editor.edit(*FACTS[1])
    state = unchanged(model)
    with pytest.raises(EditInputError, match=match):
        editor.edit(*args)
    state()
    assert len(editor.applied) == 1


@pytest.mark.parametrize("pairs, match", BAD_PAIRS, ids=[repr(p)[:30] for p, _ in BAD_PAIRS])
def test_bad_pairs_raise_and_change_nothing(pairs, match, unchanged):
    editor = untrained("llama")
    editor.edit(*FACTS[1])
    state = unchanged(editor.model)
    with pytest.raises(EditInputError, match=match):
        editor.edit_many(pairs)
    state()
    assert len(editor.applied) == 1


# ---------------------------------------------------------------- non-finite updates change nothing
def _nan_up_weight(editor):
    next(iter(editor.networks.networks.values())).blocks[0].up.weight.fill_(float("nan"))


def _inf_step_size(editor):
    editor.networks.log_lrs.fill_(float("inf"))


def _one_nan_step_size(editor):
    editor.networks.log_lrs[-1] = float("nan")


@pytest.mark.parametrize("break_editor", [_nan_up_weight, _inf_step_size, _one_nan_step_size])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_non_finite_update_raises_and_changes_nothing(family, break_editor, unchanged):
    editor = untrained(family)
    editor.edit(*FACTS[1])
    state = unchanged(editor.model)
    with torch.no_grad():
        break_editor(editor)
    with pytest.raises(EditFailedError, match="NaN or inf"):
        editor.edit(PROMPT, TARGET)
    state()
    assert len(editor.applied) == 1
