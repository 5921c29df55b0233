"""Forward passes that start at a transformer block, from hidden states computed earlier.

The base model is frozen, so the hidden states that enter the lowest edited block depend only on the
input tokens. Meta-training computes them once (`mend.prefix_cache`) and runs only the blocks from
there on. This module does the two model-level halves of that:

- `hidden_states_entering(model, start, ...)` runs the model up to block ``start`` and stops there
  (a pre-hook records the block's input and aborts the forward);
- `starting_at_block(model, start, hidden)` runs the whole model's ``forward`` as usual, but with
  blocks ``0 .. start-1`` replaced by stand-ins that return ``hidden``.

Everything else the upper blocks need (the attention mask, position ids or rotary inputs, sliding
windows) is still computed by the model's own forward from ``input_ids``, ``attention_mask`` and
``position_ids``, so nothing here depends on the architecture beyond "a list of blocks, each called
with the hidden states first and returning them first" (`mend.targets.find_blocks`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from .targets import EditTarget, find_blocks


class _Stop(Exception):
    """Raised by a hook to end a forward pass once what it needs is recorded."""


@dataclass(frozen=True)
class BlockOutput:
    """How a block returns its hidden states: a bare tensor (``tuple_length`` 0) or the first item of
    a tuple of ``tuple_length`` items (GPT-Neo and GPT-J blocks return ``(hidden, attn_weights)``)."""

    tuple_length: int

    def wrap(self, hidden: torch.Tensor):
        return hidden if self.tuple_length == 0 else (hidden,) + (None,) * (self.tuple_length - 1)


def lowest_edited_block(targets: list[EditTarget]) -> int | None:
    """Index of the lowest block holding an edited matrix, or None when the prefix cannot be cached
    (an edited matrix outside the block list, or in block 0 where there is no prefix to skip)."""
    layers = [t.layer for t in targets]
    if not layers or min(layers) < 1:
        return None
    return min(layers)


def _hidden_from_call(args, kwargs) -> torch.Tensor:
    if args:
        return args[0]
    if "hidden_states" in kwargs:
        return kwargs["hidden_states"]
    raise TypeError("a transformer block was called without its hidden states as first argument or "
                    "'hidden_states' keyword; this model cannot start from cached hidden states")


def _run_until(model, input_ids, attention_mask, position_ids):
    try:
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    except _Stop:
        return
    raise RuntimeError("the forward pass finished without reaching the hooked block")


@torch.no_grad()
def hidden_states_entering(model, start: int, input_ids, attention_mask, position_ids) -> torch.Tensor:
    """(B, T, d) hidden states entering block ``start`` for a padded batch; the blocks from
    ``start`` on, the final norm and the LM head are not run."""
    _, blocks = find_blocks(model)
    captured = {}

    def pre_hook(module, args, kwargs):
        captured["hidden"] = _hidden_from_call(args, kwargs).detach()
        raise _Stop

    handle = blocks[start].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        _run_until(model, input_ids, attention_mask, position_ids)
    finally:
        handle.remove()
    return captured["hidden"]


@torch.no_grad()
def probe_block_output(model, start: int) -> BlockOutput:
    """Find how block ``start - 1`` returns its hidden states, with a two-token forward pass."""
    _, blocks = find_blocks(model)
    found = {}

    def hook(module, args, output):
        if isinstance(output, torch.Tensor):
            found["format"] = BlockOutput(0)
        elif isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
            found["format"] = BlockOutput(len(output))
        else:
            raise TypeError(f"block {start - 1} returned {type(output).__name__}; cannot stand in for it")
        raise _Stop

    device = next(model.parameters()).device
    ids = torch.zeros(1, 2, dtype=torch.long, device=device)
    handle = blocks[start - 1].register_forward_hook(hook)
    try:
        _run_until(model, ids, torch.ones_like(ids), torch.arange(2, device=device)[None])
    finally:
        handle.remove()
    return found["format"]


class _SkippedBlock(nn.Module):
    """Stands in for a block below the cached prefix: returns the cached hidden states as they are.

    Any other attribute the model's forward reads from the block (for example the attention type that
    picks a sliding-window mask) comes from the block it replaces."""

    def __init__(self, block: nn.Module, hidden: torch.Tensor, output: BlockOutput):
        super().__init__()
        object.__setattr__(self, "_replaced", block)  # not registered: the stand-in owns no parameters
        self.hidden = hidden  # a plain attribute, not a buffer: never saved, never moved
        self.output = output

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_replaced"), name)

    def forward(self, *args, **kwargs):
        return self.output.wrap(self.hidden)


@contextlib.contextmanager
def starting_at_block(model, start: int, hidden: torch.Tensor, output: BlockOutput):
    """Within the block, ``model(...)`` skips blocks ``0 .. start-1`` and feeds ``hidden`` (B, T, d)
    to block ``start``; the batch passed to the model must have the same (B, T) layout."""
    _, blocks = find_blocks(model)
    param = next(model.parameters())
    hidden = hidden.to(device=param.device, dtype=param.dtype)
    originals = [blocks[i] for i in range(start)]
    try:
        for i in range(start):
            blocks[i] = _SkippedBlock(originals[i], hidden, output)
        yield
    finally:
        for i, block in enumerate(originals):
            blocks[i] = block
