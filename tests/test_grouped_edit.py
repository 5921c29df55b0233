"""Grouped edits: one forward pass in which each group of rows sees its own edit W + dW.

The reference for every row is the plain edited forward: capture that row's edit on its own, form
``W + dW`` with `edited_params` below, and run the model functionally with it.
"""

from __future__ import annotations

import pytest
import torch

from mend.batching import encode_pairs
from mend.capture import capture_rank1
from mend.grouped_edit import edits_by_row_group, pad_by_group
from mend.networks import MendNetworks
from mend.aggregate import grouped_updates
from mend.scoring import target_logits
from mend.targets import resolve_targets
from mend.targets import to_storage
from tiny_models import tiny_model


def edited_params(model, networks: MendNetworks, factors) -> dict[str, torch.Tensor]:
    """The reference edit: parameter replacements ``W + dW`` for the edited matrices, for
    ``torch.func.functional_call`` (differentiable in the networks)."""
    params = dict(model.named_parameters())
    updates = networks(factors)
    return {t.name: params[t.name] + to_storage(updates[t.name], t).to(params[t.name].dtype) for t in networks.targets}

PROMPTS = ["The Eiffel Tower is in", "Hi", "Bees make", "Snow is very", "Fish live in"]
TARGETS = ["Rome", "there, friend", "glue", "hot", "trees"]


def trained_looking_networks(model, *, init_lr: float = 0.5) -> MendNetworks:
    """Editor networks that are not the identity: random up-projections and running statistics
    gathered from a few random rows; in eval() mode so the statistics stay fixed."""
    targets = resolve_targets(model, None, 2)
    networks = MendNetworks(targets, {"rank": 8, "init_lr": init_lr})
    for block in (b for network in networks.networks.values() for b in network.blocks):
        torch.nn.init.normal_(block.up.weight, std=0.1)
        torch.nn.init.normal_(block.up.bias, std=0.1)
    with torch.no_grad():
        for network in networks.networks.values():
            network.train()
            network(torch.randn(16, network.d_in), torch.randn(16, network.d_out) * 1e-3, 0)
    networks.eval()
    return networks


def grouped_logits(model, networks, batch, groups: torch.Tensor) -> torch.Tensor:
    """(N, V) target logits of ``batch`` with each row under the edit of its group, in one pass."""
    n_groups = int(groups.max()) + 1
    capture = capture_rank1(model, networks.targets, batch, row_groups=groups)
    edits = grouped_updates(networks, capture, groups, n_groups, aggregation="sum")
    with torch.no_grad(), edits_by_row_group(model, networks.targets, edits, groups):
        return target_logits(model, batch)


def standalone_logits(model, networks, tokenizer, batch, rows: list[int]) -> torch.Tensor:
    """Target logits of ``batch`` with W + dW of the edit captured from ``rows`` alone."""
    alone = encode_pairs(tokenizer, [PROMPTS[i] for i in rows], [TARGETS[i] for i in rows])
    capture = capture_rank1(model, networks.targets, alone)
    with torch.no_grad():
        params = edited_params(model, networks, capture.factors)
        return target_logits(model, batch, params)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_each_row_sees_exactly_its_own_standalone_edit(family):
    model, tokenizer = tiny_model(family)
    networks = trained_looking_networks(model)
    batch = encode_pairs(tokenizer, PROMPTS, TARGETS)
    groups = torch.arange(len(PROMPTS))  # one edit per row
    grouped = grouped_logits(model, networks, batch, groups)
    with torch.no_grad():
        unedited = target_logits(model, batch)
    rows = batch.target_rows
    for row in range(len(PROMPTS)):
        reference = standalone_logits(model, networks, tokenizer, batch, [row])
        mine = rows == row
        assert (reference[mine] - unedited[mine]).abs().max() > 1e-3, "the edit must change this row's logits"
        torch.testing.assert_close(grouped[mine], reference[mine], rtol=1e-4, atol=1e-5)
        others = rows != row  # and another row's edit would not give these logits
        assert not torch.allclose(grouped[others], reference[others], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_groups_of_several_rows_share_one_edit(family):
    model, tokenizer = tiny_model(family)
    networks = trained_looking_networks(model)
    batch = encode_pairs(tokenizer, PROMPTS[:4], TARGETS[:4])
    groups = torch.tensor([0, 0, 1, 1])  # n_edits=2: two facts per edit
    grouped = grouped_logits(model, networks, batch, groups)
    rows = batch.target_rows
    for members in ([0, 1], [2, 3]):
        reference = standalone_logits(model, networks, tokenizer, batch, members)
        mine = (rows == members[0]) | (rows == members[1])
        torch.testing.assert_close(grouped[mine], reference[mine], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_interleaved_groups_of_unequal_size_each_see_their_own_edit(family):
    # the meta-batch layout puts a group's rows apart (edit rows, then paraphrases, then probes)
    model, tokenizer = tiny_model(family)
    networks = trained_looking_networks(model)
    batch = encode_pairs(tokenizer, PROMPTS, TARGETS)
    groups = torch.tensor([1, 0, 1, 2, 1])  # group 1 has three rows, spread out; group 0 and 2 one each
    grouped = grouped_logits(model, networks, batch, groups)
    rows = batch.target_rows
    for members in ([1], [0, 2, 4], [3]):
        reference = standalone_logits(model, networks, tokenizer, batch, members)
        mine = torch.isin(rows, torch.tensor(members))
        torch.testing.assert_close(grouped[mine], reference[mine], rtol=1e-4, atol=1e-5)


def test_a_single_group_equals_the_edited_parameters():
    model, tokenizer = tiny_model("llama")
    networks = trained_looking_networks(model)
    batch = encode_pairs(tokenizer, PROMPTS[:3], TARGETS[:3])
    grouped = grouped_logits(model, networks, batch, torch.zeros(3, dtype=torch.long))
    reference = standalone_logits(model, networks, tokenizer, batch, [0, 1, 2])
    torch.testing.assert_close(grouped, reference, rtol=1e-4, atol=1e-5)


def test_grouped_forward_is_differentiable_in_the_editor_and_leaves_the_model_alone(unchanged):
    model, tokenizer = tiny_model("llama")
    check = unchanged(model)
    networks = trained_looking_networks(model)
    batch = encode_pairs(tokenizer, PROMPTS[:2], TARGETS[:2])
    groups = torch.arange(2)
    capture = capture_rank1(model, networks.targets, batch, row_groups=groups)
    edits = grouped_updates(networks, capture, groups, 2, aggregation="sum")
    with edits_by_row_group(model, networks.targets, edits, groups):
        target_logits(model, batch).logsumexp(-1).sum().backward()
    assert networks.log_lrs.grad is not None and networks.log_lrs.grad.abs().sum() > 0
    check()
    assert all(p.grad is None for p in model.parameters())


# ---------------------------------------------------------------- pad_by_group
def test_pad_by_group_keeps_order_within_a_group_and_zero_pads():
    values = torch.arange(1.0, 11.0).reshape(5, 2)  # rows r0..r4
    groups = torch.tensor([1, 0, 1, 3, 1])  # group 2 is empty
    padded = pad_by_group(values, groups, 4)
    assert padded.shape == (4, 3, 2)
    torch.testing.assert_close(padded[0], torch.stack([values[1], torch.zeros(2), torch.zeros(2)]))
    torch.testing.assert_close(padded[1], values[[0, 2, 4]])
    torch.testing.assert_close(padded[2], torch.zeros(3, 2))
    torch.testing.assert_close(padded[3], torch.stack([values[3], torch.zeros(2), torch.zeros(2)]))


def test_pad_by_group_is_differentiable():
    values = torch.randn(4, 3, requires_grad=True)
    pad_by_group(values, torch.tensor([0, 1, 0, 1]), 2).sum().backward()
    torch.testing.assert_close(values.grad, torch.ones(4, 3))


# ---------------------------------------------------------------- hooks
def hook_counts(model, networks) -> list[int]:
    modules = dict(model.named_modules())
    return [len(modules[t.module_name]._forward_hooks) for t in networks.targets]


def test_hooks_are_removed_after_the_block_and_on_error():
    model, tokenizer = tiny_model("gpt2")
    networks = trained_looking_networks(model)
    batch = encode_pairs(tokenizer, PROMPTS[:2], TARGETS[:2])
    groups = torch.arange(2)
    capture = capture_rank1(model, networks.targets, batch, row_groups=groups)
    edits = grouped_updates(networks, capture, groups, 2, aggregation="sum")
    with torch.no_grad():
        before = target_logits(model, batch)
        with edits_by_row_group(model, networks.targets, edits, groups):
            assert hook_counts(model, networks) == [1] * len(networks.targets)
        assert hook_counts(model, networks) == [0] * len(networks.targets)
        with pytest.raises(RuntimeError, match="boom"):
            with edits_by_row_group(model, networks.targets, edits, groups):
                raise RuntimeError("boom")
        assert hook_counts(model, networks) == [0] * len(networks.targets)
        torch.testing.assert_close(target_logits(model, batch), before, rtol=0, atol=0)
