"""The meta-objective's losses from row slices equal the plain masked formulation (copies of every
kind's rows), values and gradients alike; `select_rows` is a view exactly when the mask is one run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mend.objective import EDIT, EQUIV, LOC, token_losses
from mend.scoring import select_rows


def masked_reference(post_logits, pre_loc_logits, kinds, target_ids, loc_is_answer, weight):
    """The losses as the objective computed them before: boolean copies of each kind's logits."""
    is_edit = (kinds == EDIT) | (kinds == EQUIV)
    edit_loss = F.cross_entropy(post_logits[is_edit], target_ids[is_edit])
    loc = post_logits[kinds == LOC]

    def kl(post, pre):
        log_p, log_q = F.log_softmax(pre, -1), F.log_softmax(post, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1).mean()

    if loc_is_answer is None:
        return edit_loss, kl(loc, pre_loc_logits)
    loss = kl(loc[loc_is_answer], pre_loc_logits[loc_is_answer])
    return edit_loss, loss + weight * kl(loc[~loc_is_answer], pre_loc_logits[~loc_is_answer])


@pytest.mark.parametrize("with_prompts", [False, True])
def test_token_losses_match_the_masked_formulation(with_prompts):
    torch.manual_seed(0)
    counts = (5, 4, 9)  # edit, equivalence, locality tokens, consecutive as in a meta-batch
    kinds = torch.cat([torch.full((n,), k) for k, n in zip((EDIT, EQUIV, LOC), counts)])
    vocab = 37
    logits = torch.randn(len(kinds), vocab, dtype=torch.float64, requires_grad=True)
    pre_loc = torch.randn(counts[2], vocab, dtype=torch.float64)
    targets = torch.randint(vocab, (len(kinds),))
    answer = torch.tensor([False, False, True, False, True, True, False, False, True]) if with_prompts else None

    edit_loss, loc_loss, hits, agree = token_losses(logits, pre_loc, kinds, targets, answer, loc_prompt_weight=0.7)
    ref_edit, ref_loc = masked_reference(logits, pre_loc, kinds, targets, answer, 0.7)
    torch.testing.assert_close(edit_loss, ref_edit.float())
    torch.testing.assert_close(loc_loss, ref_loc.float())

    grad = torch.autograd.grad(0.3 * edit_loss + loc_loss, logits)[0]
    ref_grad = torch.autograd.grad(0.3 * ref_edit + ref_loc, logits)[0]
    torch.testing.assert_close(grad, ref_grad.float().to(grad.dtype), rtol=1e-5, atol=1e-6)

    predicted = logits.argmax(-1)
    assert torch.equal(hits, (predicted == targets).float())
    loc_agree = predicted[kinds == LOC] == pre_loc.argmax(-1)
    assert torch.equal(agree, (loc_agree[answer] if with_prompts else loc_agree).float())


def test_select_rows_is_a_view_for_one_run_and_a_copy_otherwise():
    values = torch.arange(12.0).reshape(6, 2)
    run = torch.tensor([False, True, True, True, False, False])
    picked = select_rows(values, run)
    assert torch.equal(picked, values[run]) and picked.data_ptr() == values[1].data_ptr()
    scattered = torch.tensor([True, False, True, False, False, False])
    assert torch.equal(select_rows(values, scattered), values[scattered])
    assert select_rows(values, torch.zeros(6, dtype=torch.bool)).shape == (0, 2)
    with pytest.raises(ValueError, match="one entry per row"):
        select_rows(values, run[:4])
