"""The MEND meta-training objective for one batch of edits (the MEND paper, Algorithm 1).

    1. capture u, delta of the edit examples (frozen base model; locality rows ride along for free
       pre-edit logits),
    2. the editor networks turn them into updates dW (differentiable in the editor's parameters),
    3. the edited model runs on edit, equivalence and locality rows, each row under its own edit
       (`mend.grouped_edit`: a batch of independent edits in one forward pass),
    4. L_edit = NLL of the target on edit and equivalence rows,
       L_loc  = KL(pre-edit || post-edit) next-token distributions on the locality answers, plus
                ``loc_prompt_weight`` times the same KL over the probe's other positions (its prompt)
                when the batch predicts every token of the probes (the original code's every position),
       L_norm = mean over edits of sum over matrices of ||dW||_F^2 / ||W||_F^2 (the update's size),
       L = c_edit * L_edit + c_loc * L_loc + c_norm * L_norm.

With preserved knowledge (``moments``), each edit's solve keeps the key moment C, as at edit time
(`mend.aggregate.aggregate_grouped`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .aggregate import grouped_updates
from .capture import capture_rank1
from .grouped_edit import edits_by_row_group
from .meta_batch import MetaBatch, token_kinds
from .networks import MendNetworks
from .prefix_forward import starting_at_block
from .scoring import autocast_for, kl_rows, mean_nll, select_rows, target_logits

EDIT, EQUIV, LOC = 0, 1, 2


@dataclass
class StepOutput:
    """The differentiable loss and detached metrics of one meta-step."""

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]


def _from_prefix(model, batch: MetaBatch, which: str):
    """Run only the blocks from the cached prefix on (``which`` is "pre" or "post"), when the batch has one."""
    if batch.prefix is None:
        return contextlib.nullcontext()
    return starting_at_block(model, batch.prefix.start, getattr(batch.prefix, which), batch.prefix.block_output)


def update_sizes(model, edits: dict) -> torch.Tensor:
    """(G,) sum over matrices of ||dW_g||_F^2 / ||W||_F^2 for every edit g, from the low-rank factors:
    ||lr D'^T K||_F^2 = lr^2 sum((K K^T) * (D' D'^T)), an (n, n) product per edit."""
    total = 0.0
    for name, (keys, deltas, lr) in edits.items():  # keys (G, n, d_in), deltas (G, n, d_out)
        key_gram = torch.bmm(keys, keys.transpose(1, 2))  # (G, n, n)
        delta_gram = torch.bmm(deltas, deltas.transpose(1, 2))  # (G, n, n)
        weight_sq = model.get_parameter(name).detach().float().pow(2).sum()
        total = total + lr.pow(2) * (key_gram * delta_gram).sum((1, 2)) / weight_sq
    return total


def token_losses(post_logits: torch.Tensor, pre_loc_logits: torch.Tensor, kinds: torch.Tensor,
                 target_ids: torch.Tensor, loc_is_answer: torch.Tensor | None,
                 loc_prompt_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The edit and locality losses of one meta-batch's edited logits, and their per-token metrics.

    Args:
        post_logits: (N_post, V) edited logits of the edit, equivalence and locality tokens (``kinds``
            EDIT, EQUIV, LOC, each kind's tokens consecutive).
        pre_loc_logits: (N_loc, V) the unedited model's logits of the locality tokens.
        loc_is_answer: (N_loc,) True at the probes' answer tokens, or None when only answers are predicted.

    Returns:
        edit_loss: mean NLL of the targets over edit and equivalence tokens;
        loc_loss: mean KL(pre || post) over the locality answers, plus ``loc_prompt_weight`` times the
            mean over the probes' other tokens;
        hits: (N_post,) 1.0 where the edited argmax is the target;
        agree: (N_answers,) 1.0 where a locality answer's argmax is the unedited one.

    Each kind's rows are a slice, not a boolean copy: the (N, V) tensors are the largest of a step,
    and every copy of one costs a write of it.
    """
    is_edit = (kinds == EDIT) | (kinds == EQUIV)
    edit_loss = mean_nll(select_rows(post_logits, is_edit), target_ids[is_edit])
    loc_kl = kl_rows(select_rows(post_logits, kinds == LOC), pre_loc_logits)  # (N_loc,)
    with torch.no_grad():
        predicted = post_logits.argmax(-1)  # (N_post,)
        hits = (predicted == target_ids).float()
        agree = (predicted[kinds == LOC] == pre_loc_logits.argmax(-1)).float()  # (N_loc,)
    if loc_is_answer is None:
        return edit_loss, loc_kl.mean(), hits, agree
    loc_loss = loc_kl[loc_is_answer].mean()  # every probe token is predicted: the answers' KL, then the prompts'
    if loc_prompt_weight > 0 and bool((~loc_is_answer).any()):
        loc_loss = loc_loss + loc_prompt_weight * loc_kl[~loc_is_answer].mean()
    return edit_loss, loc_loss, hits, agree[loc_is_answer]  # the metric: answers only


def meta_objective(model, networks: MendNetworks, batch: MetaBatch, *, c_edit: float, c_loc: float,
                   c_norm: float = 0.0, bf16: bool = False, moments: dict | None = None,
                   loc_prompt_weight: float = 0.0) -> StepOutput:
    """Loss and metrics of one batch of independent edits; backward through it trains the editor.

    ``loc_prompt_weight``: weight of the locality KL at the probes' prompt positions, relative to their
    answer tokens; used when ``batch.loc_is_answer`` is set (the batch predicts every probe token).

    ``moments``: name -> `mend.aggregate.MomentBasis` of the (weighted) preserved key moment of each
    matrix, kept in every edit's ridge solve."""
    device = batch.pre.input_ids.device
    with _from_prefix(model, batch, "pre"):
        own_loss = torch.arange(len(batch.pre), device=device)  # every fact its own loss: none divided by n_edits
        capture = capture_rank1(model, networks.targets, batch.pre, batch.pre_loss_rows(), own_loss, bf16=bf16)
    pre_kinds = token_kinds(batch.pre, [batch.n_edit, batch.n_loc])
    pre_loc_logits = select_rows(capture.logits, pre_kinds == 1)  # (N_loc, V)

    edits = grouped_updates(networks, capture, batch.pre_groups, batch.n_groups, moments=moments)  # editor.aggregation
    with edits_by_row_group(model, networks.targets, edits, batch.post_groups), _from_prefix(model, batch, "post"), \
            autocast_for(device, bf16):
        post_logits = target_logits(model, batch.post)  # (N_post, V), each row under its own edit
    kinds = token_kinds(batch.post, [batch.n_edit, batch.n_equiv, batch.n_loc])
    edit_loss, loc_loss, hits, agree = token_losses(post_logits, pre_loc_logits, kinds, batch.post.target_ids,
                                                    batch.loc_is_answer, loc_prompt_weight)
    with torch.set_grad_enabled(torch.is_grad_enabled() and c_norm > 0):  # else only a metric
        norm_loss = update_sizes(model, edits).mean()
    loss = c_edit * edit_loss + c_loc * loc_loss + (c_norm * norm_loss if c_norm > 0 else 0.0)

    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "edit_loss": edit_loss.detach(),
            "loc_loss": loc_loss.detach(),
            "update_size": norm_loss.detach().sqrt(),  # root of the mean summed squared relative norm
            "pre_edit_loss": capture.loss,
            "edit_acc": hits[kinds == EDIT].mean(),
            "equiv_acc": hits[kinds == EQUIV].mean(),
            "loc_agree": agree.mean(),
        }
    return StepOutput(loss, metrics)
