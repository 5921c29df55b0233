"""Aggregation of several facts into one update per matrix: the maths on hand-built keys, the
meta-training form, and `Editor.edit_many` (each fact captured with its own loss, in chunks)."""

from __future__ import annotations

import pytest
import torch

import mend.editor
from mend import Editor
from mend.aggregate import MomentBasis, aggregate_facts, aggregate_grouped, grouped_updates, own_values
from mend.batching import encode_pairs
from mend.capture import capture_rank1
from mend.config import Aggregation
from mend.grouped_edit import pad_by_group
from mend.networks import update_from
from mend.grouped_edit import pad_by_group
from mend.scoring import mean_nll, target_logits
from test_grouped_edit import trained_looking_networks
from tiny_models import tiny_model

RIDGE, SUM = Aggregation.ridge, Aggregation.sum
LR = torch.tensor(0.3)


def dw(factors) -> torch.Tensor:
    return update_from(*factors).double()


def orthonormal(d: int) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, dtype=torch.float64))[0].float()  # (d, d), rows orthonormal


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


# ---------------------------------------------------------------- the solve
def test_sum_is_the_sum_of_every_facts_rank1_update():
    keys, deltas, facts = torch.randn(7, 16), torch.randn(7, 5), torch.tensor([0, 0, 0, 1, 1, 2, 2])
    factors = aggregate_facts(keys, deltas, LR, facts, aggregation=SUM, rho=torch.tensor(0.1))
    torch.testing.assert_close(dw(factors), sum(dw((keys[facts == i], deltas[facts == i], LR)) for i in range(3)))


@pytest.mark.parametrize("space", ["n", "d"])
def test_one_fact_with_a_vanishing_ridge_is_mends_own_update(space):
    keys, deltas = torch.randn(5, 16), torch.randn(5, 8)  # 5 independent keys in 16 dimensions
    factors = aggregate_facts(keys, deltas, LR, torch.zeros(5, dtype=torch.long), aggregation=RIDGE,
                              rho=torch.tensor(1e-10), space=space)
    torch.testing.assert_close(dw(factors), dw((keys, deltas, LR)), rtol=1e-4, atol=1e-5)


def test_the_ridge_shrinks_one_facts_update_towards_zero():
    keys, deltas = torch.randn(5, 16), torch.randn(5, 8)
    facts = torch.zeros(5, dtype=torch.long)
    norms = [float(dw(aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=torch.tensor(rho))).norm())
             for rho in (1e-6, 1e-1, 1e1, 1e3)]
    assert norms == sorted(norms, reverse=True) and norms[-1] < 1e-2 * norms[0]


def test_n_space_and_d_space_solves_are_the_same_update():
    keys, deltas, facts = torch.randn(9, 16), torch.randn(9, 8), torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 3])
    rho = torch.tensor(0.05)
    n_form = aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=rho, space="n")
    d_form = aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=rho, space="d")
    torch.testing.assert_close(dw(n_form), dw(d_form), rtol=1e-4, atol=1e-6)


def test_with_orthogonal_keys_each_fact_keeps_its_own_update():
    basis = orthonormal(16)
    mix = lambda n, rows: unit_rows(torch.randn(n, len(rows)) @ basis[rows])  # unit keys in span(basis[rows])
    own = [(mix(3, range(0, 4)), torch.randn(3, 6)), (mix(4, range(4, 9)), torch.randn(4, 6)),
           (mix(2, range(9, 16)), torch.randn(2, 6))]
    keys = torch.cat([k for k, _ in own])
    deltas = torch.cat([d for _, d in own])
    facts = torch.cat([torch.full((len(k),), i) for i, (k, _) in enumerate(own)])
    rho = torch.tensor(0.2)  # not small: the statement holds for any ridge (all keys have norm 1)
    together = dw(aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=rho))
    alone = [dw(aggregate_facts(k, d, LR, torch.zeros(len(k), dtype=torch.long), aggregation=RIDGE, rho=rho))
             for k, d in own]
    torch.testing.assert_close(together, sum(alone), rtol=1e-5, atol=1e-7)
    for (k, _), update in zip(own, alone):  # every fact's keys are mapped as its own update maps them
        torch.testing.assert_close(k.double() @ together.t(), k.double() @ update.t(), rtol=1e-5, atol=1e-7)
    # and with a vanishing ridge each fact's own update is MEND's
    vanishing = dw(aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=torch.tensor(1e-10)))
    torch.testing.assert_close(vanishing, sum(dw((k, d, LR)) for k, d in own), rtol=1e-4, atol=1e-6)


def test_k_copies_of_a_fact_are_one_copy_with_the_ridge_divided_by_k():
    keys, deltas, k = torch.randn(4, 16), torch.randn(4, 8), 5
    one = torch.zeros(4, dtype=torch.long)
    copies = aggregate_facts(keys.repeat(k, 1), deltas.repeat(k, 1), LR, torch.arange(k).repeat_interleave(4),
                             aggregation=RIDGE, rho=torch.tensor(0.5))
    single = aggregate_facts(keys, deltas, LR, one, aggregation=RIDGE, rho=torch.tensor(0.5 / k))
    torch.testing.assert_close(dw(copies), dw(single), rtol=1e-4, atol=1e-6)
    summed = aggregate_facts(keys.repeat(k, 1), deltas.repeat(k, 1), LR, torch.arange(k).repeat_interleave(4),
                             aggregation=SUM, rho=torch.tensor(0.5))
    torch.testing.assert_close(dw(summed), k * dw((keys, deltas, LR)), rtol=1e-5, atol=1e-5)  # k times as far


def test_a_remembered_key_moment_keeps_the_update_off_earlier_keys():
    earlier = torch.randn(6, 16)
    keys, deltas = torch.randn(4, 16) + earlier[:4], torch.randn(4, 8)  # overlaps the earlier keys
    facts = torch.zeros(4, dtype=torch.long)
    free = dw(aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=torch.tensor(1e-3)))
    kept = dw(aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=torch.tensor(1e-3),
                              moment=100.0 * earlier.t() @ earlier))
    moved = lambda update: float((earlier.double() @ update.t()).norm())
    assert moved(kept) < 0.05 * moved(free)


def test_the_grouped_solve_with_a_moment_is_the_edit_time_d_space_solve():
    generic = torch.randn(40, 16)
    moment = 3.0 * generic.t() @ generic / 40  # a weighted preserved key moment (16, 16)
    keys, deltas = torch.randn(7, 16, requires_grad=True), torch.randn(7, 8)
    facts = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1])
    rho = torch.tensor(0.05, requires_grad=True)
    padded = [pad_by_group(x, groups, 2) for x in (keys, deltas)]
    padded_facts = pad_by_group((facts + 1).double()[:, None], groups, 2)[..., 0].long() - 1
    k_g, d_g, _ = aggregate_grouped(*padded, padded_facts, LR, aggregation=RIDGE, rho=rho,
                                    moment=MomentBasis.of(moment))
    for g in range(2):
        mine = groups == g
        n = int(mine.sum())
        flat = aggregate_facts(keys[mine], deltas[mine], LR, facts[mine] - facts[mine].min(), aggregation=RIDGE,
                               rho=rho, moment=moment)
        torch.testing.assert_close(dw((k_g[g, :n], d_g[g, :n], LR)), dw(flat), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(dw((k_g[g], d_g[g], LR)), dw(flat), rtol=1e-4, atol=1e-6)  # padding adds nothing
    (d_g.sum() + k_g.sum()).backward()
    assert keys.grad is not None and rho.grad is not None and rho.grad != 0


def test_a_preserved_moment_moves_generic_keys_less_than_the_plain_solve():
    generic = torch.randn(200, 16) * torch.linspace(3.0, 0.1, 16)  # generic text lives in the first directions
    keys, deltas = torch.randn(1, 16, dtype=torch.float64).float(), torch.randn(1, 8)
    one = torch.zeros(1, dtype=torch.long)[None]
    plain = aggregate_grouped(keys[None], deltas[None], one, LR, aggregation=RIDGE, rho=torch.tensor(1e-3))
    kept = aggregate_grouped(keys[None], deltas[None], one, LR, aggregation=RIDGE, rho=torch.tensor(1e-3),
                             moment=MomentBasis.of(10.0 * generic.t() @ generic / 200))
    moved = lambda f: float((generic.double() @ dw((f[0][0], f[1][0], LR)).t()).norm())
    own = lambda f: float((keys.double() @ dw((f[0][0], f[1][0], LR)).t()).norm())
    assert moved(kept) / own(kept) < 0.5 * moved(plain) / own(plain)


def test_own_values_are_each_facts_gram_times_its_deltas():
    keys, deltas, facts = torch.randn(6, 5), torch.randn(6, 3), torch.tensor([1, 0, 1, 2, 0, 1])
    values = own_values(keys, deltas, facts)
    for i in range(3):
        k, d = keys[facts == i].double(), deltas[facts == i].double()
        torch.testing.assert_close(values[facts == i], k @ k.t() @ d)


# ---------------------------------------------------------------- the meta-training form
def test_each_group_of_the_grouped_solve_is_its_own_flat_solve():
    keys, deltas = torch.randn(10, 16, requires_grad=True), torch.randn(10, 8)
    facts = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 4, 4])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 2, 2])
    rho = torch.tensor(0.05, requires_grad=True)
    padded = [pad_by_group(x, groups, 3) for x in (keys, deltas)]
    padded_facts = pad_by_group((facts + 1).double()[:, None], groups, 3)[..., 0].long() - 1
    k_g, d_g, _ = aggregate_grouped(*padded, padded_facts, LR, aggregation=RIDGE, rho=rho)
    for g in range(3):
        mine = groups == g
        n = int(mine.sum())
        flat = aggregate_facts(keys[mine], deltas[mine], LR, facts[mine] - facts[mine].min(), aggregation=RIDGE, rho=rho)
        torch.testing.assert_close(dw((k_g[g, :n], d_g[g, :n], LR)), dw(flat), rtol=1e-5, atol=1e-7)
        assert torch.equal(d_g[g, n:], torch.zeros_like(d_g[g, n:]))  # padding stays zero
    (d_g.sum() + k_g.sum()).backward()
    assert keys.grad is not None and rho.grad is not None and rho.grad != 0


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_grouped_updates_with_sum_pad_each_groups_transformed_factors(family):
    model, tokenizer = tiny_model(family)
    networks = trained_looking_networks(model)
    batch = encode_pairs(tokenizer, ["Bees make", "Snow is", "Fish live in"], ["glue", "hot", "trees"])
    groups = torch.tensor([0, 0, 1])
    capture = capture_rank1(model, networks.targets, batch, row_groups=torch.arange(3))
    mine = grouped_updates(networks, capture, groups, 2, aggregation="sum")
    position_groups = groups[capture.rows]
    theirs = {name: (pad_by_group(u_t, position_groups, 2), pad_by_group(delta_t, position_groups, 2), lr)
              for name, (u_t, delta_t, lr) in networks.transform_factors(capture.factors).items()}
    for name in theirs:
        for a, b in zip(mine[name], theirs[name]):
            torch.testing.assert_close(a, b)


def test_grouped_ridge_updates_are_differentiable_in_the_editor_and_its_ridges():
    model, tokenizer = tiny_model("llama")
    networks = trained_looking_networks(model)
    batch = encode_pairs(tokenizer, ["Bees make", "Snow is", "Fish live in"], ["glue", "hot", "trees"])
    capture = capture_rank1(model, networks.targets, batch, row_groups=torch.arange(3))
    edits = grouped_updates(networks, capture, torch.tensor([0, 0, 1]), 2, aggregation="ridge")
    sum(d.pow(2).sum() * lr for _, d, lr in edits.values()).backward()
    assert networks.log_ridges.grad is not None and networks.log_ridges.grad.abs().sum() > 0
    assert networks.log_lrs.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in networks.networks.parameters())


# ---------------------------------------------------------------- edit_many
FACTS = [("Bees make", "glue"), ("Snow is", "hot"), ("Fish live in", "trees"), ("The sky is", "green")]


def untrained(family="gpt2", **editor):
    model, tokenizer = tiny_model(family)
    return Editor.untrained(model, tokenizer, {"editor": {"init_lr": 0.5, **editor}})


def test_edit_many_captures_each_fact_with_its_own_loss():
    """No fact's gradient is divided by the number of facts: its factors are those of its own edit."""
    editor = untrained("llama", aggregation="sum")
    _, together, _ = editor.compute_updates(FACTS)
    offset = 0
    for fact in FACTS:
        _, alone, _ = editor.compute_updates([fact])
        for name, (k, d, _) in alone.items():
            n = len(k)
            torch.testing.assert_close(together[name][0][offset : offset + n], k, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(together[name][1][offset : offset + n], d, rtol=1e-5, atol=1e-6)
        offset += n
    assert offset == len(together[editor.targets[0].name][0])


def test_edit_many_with_sum_is_the_sum_of_each_facts_own_edit():
    editor = untrained("gpt2", aggregation="sum")
    updates, _, loss = editor.compute_updates(FACTS)
    alone = [editor.compute_updates([fact]) for fact in FACTS]
    for name, update in updates.items():
        torch.testing.assert_close(update, sum(a[0][name] for a in alone), rtol=1e-5, atol=1e-6)
    assert abs(loss - sum(a[2] for a in alone) / len(FACTS)) < 1e-5  # the mean of the facts' losses


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_one_fact_with_a_vanishing_ridge_is_todays_single_edit(family):
    ridge = untrained(family, ridge=1e-10)
    summed = ridge.variant(aggregation="sum")
    want, _, _ = summed.compute_updates([("Hi", "yo")])  # few positions: keys linearly independent
    got, _, _ = ridge.compute_updates([("Hi", "yo")])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-3, atol=1e-5)


def fact_nll(editor, fact) -> float:
    batch = encode_pairs(editor.tokenizer, [fact[0]], [fact[1]], max_length=editor.max_length)
    with torch.no_grad():
        return float(mean_nll(target_logits(editor.model, batch), batch.target_ids))


@pytest.mark.parametrize("k", [2, 5])
def test_k_copies_of_a_fact_move_it_at_least_as_far_as_one(k):
    editor = untrained("llama", init_lr=0.2)
    fact = FACTS[0]
    before = fact_nll(editor, fact)
    editor.edit(*fact)
    one = fact_nll(editor, fact)
    editor.revert()
    editor.edit_many([fact] * k)
    copies = fact_nll(editor, fact)
    assert one < before
    assert copies <= one + 1e-4


def test_hundreds_of_facts_are_captured_in_bounded_chunks(monkeypatch):
    editor = untrained("gpt2", edit_chunk=8)
    sizes = []

    def counting_capture(model, targets, batch, *args, **kwargs):
        sizes.append(len(batch))
        return capture(model, targets, batch, *args, **kwargs)

    capture = mend.editor.capture_rank1
    monkeypatch.setattr(mend.editor, "capture_rank1", counting_capture)
    pairs = [(f"Fact number {i} is", f"v{i}") for i in range(36)]
    result = editor.edit_many(pairs)
    assert sizes == [8, 8, 8, 8, 4]
    assert result.pairs == pairs and all(n > 0 for n in result.update_norms.values())


def test_chunked_capture_gives_the_update_of_one_pass():
    whole = untrained("llama", edit_chunk=16)
    chunked = whole.variant()
    chunked.networks.config.edit_chunk = 2  # shared networks: set it back below
    try:
        a, _, loss_a = chunked.compute_updates(FACTS)
    finally:
        chunked.networks.config.edit_chunk = 16
    b, _, loss_b = whole.compute_updates(FACTS)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-6)
    assert abs(loss_a - loss_b) < 1e-5


def test_an_unknown_aggregation_is_refused():
    model, tokenizer = tiny_model("gpt2")
    editor = Editor.untrained(model, tokenizer)
    with pytest.raises(ValueError, match="aggregation must be one of"):
        editor.variant(aggregation="mean")


# ---------------------------------------------------------------- fitting only the prediction positions
def test_fitting_some_positions_reproduces_each_facts_own_update_there_with_a_smaller_update():
    keys, deltas, facts = torch.randn(8, 32), torch.randn(8, 6), torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    fitted = torch.tensor([False, False, True, True, False, True, False, True])
    rho = torch.tensor(1e-9)
    everywhere = dw(aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=rho))
    only_there = dw(aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=rho, solve=fitted))
    k = keys.double()[fitted]
    torch.testing.assert_close(k @ only_there.t(), k @ everywhere.t(), rtol=1e-4, atol=1e-5)  # same shifts there
    assert float(only_there.norm()) < 0.9 * float(everywhere.norm())  # the smallest update that does it


@pytest.mark.parametrize("space", ["n", "d"])
def test_fitting_every_position_is_the_plain_solve(space):
    keys, deltas, facts = torch.randn(7, 16), torch.randn(7, 5), torch.tensor([0, 0, 1, 1, 1, 2, 2])
    rho = torch.tensor(0.05)
    plain = dw(aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=rho, space=space))
    masked = dw(aggregate_facts(keys, deltas, LR, facts, aggregation=RIDGE, rho=rho, space=space,
                                solve=torch.ones(7, dtype=torch.bool)))
    torch.testing.assert_close(masked, plain)


def test_the_grouped_solve_of_some_positions_is_the_flat_one():
    generic = torch.randn(40, 16)
    moment = 2.0 * generic.t() @ generic / 40
    keys, deltas = torch.randn(9, 16, requires_grad=True), torch.randn(9, 8)
    facts = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    groups = torch.tensor([0, 0, 0, 0, 0, 1, 1, 1, 1])
    fitted = torch.tensor([False, True, True, False, True, False, False, True, True])
    rho = torch.tensor(0.05, requires_grad=True)
    padded = [pad_by_group(x, groups, 2) for x in (keys, deltas)]
    padded_facts = pad_by_group((facts + 1).double()[:, None], groups, 2)[..., 0].long() - 1
    padded_fit = pad_by_group(fitted.double()[:, None], groups, 2)[..., 0] > 0
    for with_moment in (None, moment):
        basis = None if with_moment is None else MomentBasis.of(with_moment)
        k_g, d_g, _ = aggregate_grouped(*padded, padded_facts, LR, aggregation=RIDGE, rho=rho, moment=basis,
                                        solve=padded_fit)
        for g in range(2):
            mine = groups == g
            flat = aggregate_facts(keys[mine], deltas[mine], LR, facts[mine] - facts[mine].min(), aggregation=RIDGE,
                                   rho=rho, moment=with_moment, solve=fitted[mine])
            torch.testing.assert_close(dw((k_g[g], d_g[g], LR)), dw(flat), rtol=1e-4, atol=1e-6)
    (d_g.sum() + k_g.sum()).backward()
    assert keys.grad is not None and rho.grad is not None


def test_an_editor_fitting_predictions_edits_and_remembers_only_those_positions():
    editor = untrained("llama", init_lr=0.2, solve_keys="predictions", lifelong=True)
    fact = ("The capital of Freedonia is", " Fredville")
    batch = encode_pairs(editor.tokenizer, [fact[0]], [fact[1]], max_length=editor.max_length)
    n_predicting = int(batch.prediction_mask.sum())
    n_positions = int(batch.positions_with_gradient.sum())
    assert n_predicting < n_positions
    before = fact_nll(editor, fact)
    result = editor.edit(*fact)
    assert fact_nll(editor, fact) < before
    for name, (keys, _, _) in result._factors.items():
        assert keys.shape[0] == n_predicting
        remembered = result._memory.keys[name]  # (n, d_in) raw inputs the memory's moment is made of
        assert remembered.shape[0] == n_predicting
        torch.testing.assert_close(editor.memory.moment(name), remembered.t() @ remembered)


def test_an_unknown_solve_keys_value_is_refused():
    from mend.config import ConfigError, editor_config

    with pytest.raises(Exception, match="solve_keys|SolveKeys|everything"):
        editor_config({"solve_keys": "everything"})
