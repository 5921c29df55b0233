"""Rank-1 capture: sum_t delta_t u_t^T is the gradient of the edit loss, from one frozen pass."""

from __future__ import annotations

import pytest
import torch

from mend.batching import encode_pairs
from mend.capture import ModuleRecorder, capture_rank1
from mend.scoring import target_logits
from mend.targets import as_out_in, find_blocks, resolve_targets
from tiny_models import tiny_model

PROMPTS = ["The Eiffel Tower is in", "Hi"]
TARGETS = ["Rome", "there, friend"]


def rank1_gradient(capture, target) -> torch.Tensor:
    """(d_out, d_in) sum_t delta_t u_t^T from a capture's factors."""
    u, delta = capture.factors[target.name]  # (N, d_in), (N, d_out)
    return delta.t() @ u


# ---------------------------------------------------------------- the invariant
@pytest.mark.parametrize("side", ["left", "right"])
def test_rank1_factors_sum_to_the_true_gradient(family, tiny, side, autograd_gradients):
    model, tokenizer = tiny
    targets = resolve_targets(model)
    batch = encode_pairs(tokenizer, PROMPTS, TARGETS, padding_side=side)
    capture = capture_rank1(model, targets, batch)
    loss, grads = autograd_gradients(model, [t.name for t in targets], batch)
    torch.testing.assert_close(capture.loss, loss)
    for target in targets:
        u, delta = capture.factors[target.name]
        assert u.dtype == delta.dtype == torch.float32
        assert u.shape[1] == target.d_in and delta.shape[1] == target.d_out and u.shape[0] == delta.shape[0]
        reference = as_out_in(grads[target.name], target)  # Conv1D stores (d_in, d_out): transpose
        assert reference.abs().max() > 0
        torch.testing.assert_close(rank1_gradient(capture, target), reference, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_the_invariant_holds_for_explicit_targets_outside_the_mlp(family, tiny, autograd_gradients):
    model, tokenizer = tiny
    names = {
        "gpt2": ["transformer.h.0.attn.c_attn.weight", "transformer.h.2.mlp.c_proj.weight"],
        "llama": ["model.layers.0.self_attn.v_proj.weight", "model.layers.2.mlp.up_proj.weight"],
        "gemma3": ["model.layers.0.self_attn.v_proj.weight", "model.layers.1.mlp.down_proj.weight"],
    }[family]
    targets = resolve_targets(model, names)
    batch = encode_pairs(tokenizer, PROMPTS, TARGETS)
    capture = capture_rank1(model, targets, batch)
    _, grads = autograd_gradients(model, names, batch)
    for target in targets:
        torch.testing.assert_close(rank1_gradient(capture, target), as_out_in(grads[target.name], target), rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_rows_restrict_the_loss_to_those_rows(family, tiny):
    model, tokenizer = tiny
    targets = resolve_targets(model)
    both = encode_pairs(tokenizer, PROMPTS, TARGETS)
    first_only = capture_rank1(model, targets, both, loss_rows=torch.tensor([True, False]))
    alone = capture_rank1(model, targets, encode_pairs(tokenizer, PROMPTS[:1], TARGETS[:1]))
    torch.testing.assert_close(first_only.loss, alone.loss)
    for target in targets:
        assert first_only.factors[target.name][0].shape == alone.factors[target.name][0].shape
        torch.testing.assert_close(rank1_gradient(first_only, target), rank1_gradient(alone, target), rtol=1e-4, atol=1e-7)
    # the logits still cover every row's targets (pre-edit logits of riding-along rows come for free)
    assert first_only.logits.shape[0] == both.target_ids.shape[0]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_capture_works_inside_no_grad(family, tiny):
    model, tokenizer = tiny
    targets = resolve_targets(model)
    batch = encode_pairs(tokenizer, PROMPTS, TARGETS)
    plain = capture_rank1(model, targets, batch)
    with torch.no_grad():
        inside = capture_rank1(model, targets, batch)
    for target in targets:
        assert rank1_gradient(inside, target).abs().max() > 0
        torch.testing.assert_close(rank1_gradient(inside, target), rank1_gradient(plain, target))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_capture_returns_the_pre_edit_target_logits(family, tiny):
    model, tokenizer = tiny
    batch = encode_pairs(tokenizer, PROMPTS, TARGETS)
    capture = capture_rank1(model, resolve_targets(model), batch)
    assert not capture.logits.requires_grad and not capture.loss.requires_grad
    torch.testing.assert_close(capture.logits, target_logits(model, batch))


# ---------------------------------------------------------------- the base model stays frozen
def test_capture_leaves_no_gradients_and_no_hooks(family, tiny):
    model, tokenizer = tiny
    capture_rank1(model, resolve_targets(model), encode_pairs(tokenizer, PROMPTS, TARGETS))
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


@pytest.mark.parametrize("family", ["gpt2", "llama", "gpt_neox", "gemma3"])
@pytest.mark.parametrize("lowest", [1, 2])
def test_backward_stops_at_the_lowest_edited_block(family, tiny, lowest):
    """No activation below the lowest edited block is part of the autograd graph, so the backward
    pass cannot reach those blocks (or the embeddings)."""
    model, tokenizer = tiny
    targets = resolve_targets(model, last_n_blocks=4 - lowest)
    assert min(t.layer for t in targets) == lowest
    _, blocks = find_blocks(model)
    needs_grad = {}

    def record(name):
        def hook(module, args, output):
            first = output[0] if isinstance(output, tuple) else output
            needs_grad[name] = first.requires_grad

        return hook

    watched = {"embeddings": model.get_input_embeddings(), **{f"block {i}": blocks[i] for i in range(4)}}
    handles = [module.register_forward_hook(record(name)) for name, module in watched.items()]
    try:
        capture_rank1(model, targets, encode_pairs(tokenizer, PROMPTS, TARGETS))
    finally:
        for handle in handles:
            handle.remove()
    below = ["embeddings"] + [f"block {i}" for i in range(lowest)]
    assert {name: needs_grad[name] for name in below} == {name: False for name in below}
    # the edited blocks' outputs do take part (so the check above can fail)
    assert all(needs_grad[f"block {i}"] for i in range(lowest, 4))


def test_the_recorder_removes_its_hooks_when_the_block_raises():
    model, _ = tiny_model("gpt2")
    with pytest.raises(KeyError):
        with ModuleRecorder(model, resolve_targets(model)):
            assert any(m._forward_hooks for m in model.modules())
            raise KeyError("boom")
    assert not any(m._forward_hooks for m in model.modules())


def test_a_module_called_twice_in_one_pass_is_refused():
    model, tokenizer = tiny_model("gpt2")
    batch = encode_pairs(tokenizer, PROMPTS, TARGETS)
    with pytest.raises(RuntimeError, match="called twice"):
        with ModuleRecorder(model, resolve_targets(model)):
            target_logits(model, batch)
            target_logits(model, batch)
