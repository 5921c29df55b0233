"""Forward passes restricted to target positions, and the losses and accuracies computed on them."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.func import functional_call

from .batching import TokenBatch


def target_logits(model, batch: TokenBatch, params: dict | None = None) -> torch.Tensor:
    """Next-token logits at the positions that predict target tokens.

    Only those positions go through the output projection: a pre-hook on the model's output
    embeddings hands it the (N, H) hidden states at ``batch.prediction_mask`` instead of (B, T, H),
    which saves the (T, vocab) product for every other position. The hook works on every
    transformers 5.x, unlike a boolean ``logits_to_keep``, which older releases cannot index with.

    Args:
        params: replacement tensors by parameter name; the forward then runs through
            ``torch.func.functional_call`` and is differentiable in them.

    Returns:
        (N, V) logits, row i predicting ``batch.target_ids[i]``.
    """
    keep = batch.prediction_mask  # (B, T)
    kwargs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=batch.position_ids, use_cache=False)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    with _head_sees_only(head, keep):
        if params:
            logits = functional_call(model, params, args=(), kwargs=kwargs, strict=False, tie_weights=True).logits
        else:
            logits = model(**kwargs).logits
    if head is None:  # no output projection to hook: full (B, T, V) logits, then the kept rows
        logits = logits[keep]
    return logits


@contextlib.contextmanager
def _head_sees_only(head, keep: torch.Tensor):
    """While active, ``head`` is applied to ``hidden[keep]`` (N, H) instead of ``hidden`` (B, T, H)."""
    if head is None:
        yield
        return

    def select(module, args):
        hidden = args[0]  # (B, T, H)
        if hidden.shape[:2] != keep.shape:
            raise RuntimeError(f"the output projection got hidden states of shape {tuple(hidden.shape)}, "
                               f"expected (batch, tokens) = {tuple(keep.shape)} before the hidden size")
        return (hidden[keep], *args[1:])  # (N, H)

    handle = head.register_forward_pre_hook(select)
    try:
        yield
    finally:
        handle.remove()


def token_nll(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """(N,) negative log-likelihood of each target token; logits (N, V), target_ids (N,)."""
    return F.cross_entropy(logits.float(), target_ids, reduction="none")


def mean_nll(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Mean NLL over all target tokens (the edit loss)."""
    return token_nll(logits, target_ids).mean()


def per_row_mean(values: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """(B,) mean of a per-target-token quantity within each batch row."""
    rows = batch.target_rows
    n = len(batch)
    total = torch.zeros(n, device=values.device, dtype=values.dtype).index_add_(0, rows, values)
    count = torch.zeros(n, device=values.device, dtype=values.dtype).index_add_(0, rows, torch.ones_like(values))
    return total / count.clamp(min=1)


def select_rows(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``values[mask]``, as a view when the True entries of ``mask`` (N,) form one run.

    Boolean indexing writes a copy of an (N, V) logit tensor; the rows of one kind of a meta-batch
    are consecutive, so a slice selects them without one."""
    if mask.shape != values.shape[:1]:
        raise ValueError(f"the mask has shape {tuple(mask.shape)}, expected ({values.shape[0]},): one entry per row")
    where = torch.nonzero(mask).flatten()
    if len(where) == 0:
        return values[:0]
    first, last = where[[0, -1]].tolist()
    if last - first + 1 == len(where):
        return values[first:last + 1]
    return values[mask]


def kl_rows(logits: torch.Tensor, reference_logits: torch.Tensor) -> torch.Tensor:
    """(N,) KL(reference || edited) between the next-token distributions of each row; logits (N, V)."""
    log_p = F.log_softmax(reference_logits.float(), -1)
    log_q = F.log_softmax(logits.float(), -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def autocast_for(device, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast when asked for and on CUDA; nothing elsewhere."""
    device = torch.device(device)
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
