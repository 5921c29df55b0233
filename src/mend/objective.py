"""The MEND meta-training objective for one batch of edits (the MEND paper, Algorithm 1).

    1. capture u, delta of the edit examples (frozen base model; locality rows ride along for free
       pre-edit logits),
    2. the editor networks turn them into updates dW (differentiable in the editor's parameters),
    3. the edited model runs on edit, equivalence and locality rows, each row under its own edit
       (`mend.grouped_edit`: a batch of independent edits in one forward pass),
    4. L_edit = NLL of the target on edit and equivalence rows,
       L_loc  = KL(pre-edit || post-edit) next-token distributions on the locality answers,
       L = c_edit * L_edit + c_loc * L_loc.
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
from .scoring import autocast_for, kl_to_reference, mean_nll, target_logits, token_hits

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


def meta_objective(model, networks: MendNetworks, batch: MetaBatch, *, c_edit: float, c_loc: float,
                   bf16: bool = False) -> StepOutput:
    """Loss and metrics of one batch of independent edits; backward through it trains the editor."""
    device = batch.pre.input_ids.device
    with _from_prefix(model, batch, "pre"):
        own_loss = torch.arange(len(batch.pre), device=device)  # every fact its own loss: none divided by n_edits
        capture = capture_rank1(model, networks.targets, batch.pre, batch.pre_loss_rows(), own_loss, bf16=bf16)
    pre_kinds = token_kinds(batch.pre, [batch.n_edit, batch.n_loc])
    pre_loc_logits = capture.logits[pre_kinds == 1]  # (N_loc, V)

    edits = grouped_updates(networks, capture, batch.pre_groups, batch.n_groups)  # editor.aggregation
    with edits_by_row_group(model, networks.targets, edits, batch.post_groups), _from_prefix(model, batch, "post"), \
            autocast_for(device, bf16):
        post_logits = target_logits(model, batch.post)  # (N_post, V), each row under its own edit
    kinds = token_kinds(batch.post, [batch.n_edit, batch.n_equiv, batch.n_loc])
    target_ids = batch.post.target_ids
    is_edit = (kinds == EDIT) | (kinds == EQUIV)
    edit_loss = mean_nll(post_logits[is_edit], target_ids[is_edit])
    loc_logits = post_logits[kinds == LOC]
    loc_loss = kl_to_reference(loc_logits, pre_loc_logits)
    loss = c_edit * edit_loss + c_loc * loc_loss

    with torch.no_grad():
        hits = token_hits(post_logits, target_ids)
        agree = (loc_logits.argmax(-1) == pre_loc_logits.argmax(-1)).float()
        metrics = {
            "loss": loss.detach(),
            "edit_loss": edit_loss.detach(),
            "loc_loss": loc_loss.detach(),
            "pre_edit_loss": capture.loss,
            "edit_acc": hits[kinds == EDIT].mean(),
            "equiv_acc": hits[kinds == EQUIV].mean(),
            "loc_agree": agree.mean(),
        }
    return StepOutput(loss, metrics)
