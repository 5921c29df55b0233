"""Turning (prompt, target) text pairs into padded token batches with target masks.

The prompt and the target are tokenised separately and concatenated, so the target's tokens are
exactly the tokens the loss is taken on, whatever the tokenizer does at the boundary. Position ids
are computed from the attention mask, so left- and right-padded batches give identical logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class EditInputError(ValueError):
    """An edit request (prompt or target) is invalid; nothing was changed."""


@dataclass
class TokenBatch:
    """A padded batch of prompt + target sequences.

    Attributes:
        input_ids: (B, T) token ids.
        attention_mask: (B, T) 1 for real tokens, 0 for padding.
        position_ids: (B, T) positions counted over real tokens only.
        target_mask: (B, T) True at the target's tokens (the tokens the loss is on).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    target_mask: torch.Tensor

    @property
    def prediction_mask(self) -> torch.Tensor:
        """(B, T) True at positions whose next-token logits predict a target token."""
        mask = torch.zeros_like(self.target_mask)
        mask[:, :-1] = self.target_mask[:, 1:]
        return mask

    @property
    def target_ids(self) -> torch.Tensor:
        """(N,) the target tokens, in the row-major order of `prediction_mask`'s True entries."""
        return self.input_ids[:, 1:][self.target_mask[:, 1:]]

    @property
    def target_rows(self) -> torch.Tensor:
        """(N,) which batch row each target token belongs to."""
        rows = torch.arange(self.input_ids.shape[0], device=self.input_ids.device)
        return rows[:, None].expand_as(self.target_mask)[:, 1:][self.target_mask[:, 1:]]

    @property
    def last_needed(self) -> torch.Tensor:
        """(B, T) True at real tokens up to each row's last prediction position (the token before its
        last target token): the positions whose activations can influence the loss. The last target
        token itself, later positions and padding all get exactly zero gradient."""
        last = self.prediction_mask.long().flip(1).cumsum(1).flip(1) > 0  # a prediction at or after t
        return last & self.attention_mask.bool()

    def to(self, device) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.position_ids, self.target_mask)))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


def check_text(value, what: str) -> str:
    """Return ``value`` if it is a non-blank string, else raise EditInputError naming ``what``."""
    if not isinstance(value, str):
        raise EditInputError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    if not value.strip():
        raise EditInputError(f"{what} is empty or only whitespace: {value!r}")
    return value


def target_text(prompt: str, target: str) -> str:
    """The target as it continues the prompt: with a separating space unless one is there."""
    if prompt[-1:].isspace() or target[:1].isspace():
        return target
    return " " + target


def encode_pairs(tokenizer, prompts, targets, *, max_length: int = 128, padding_side=None, what=("prompt", "target")) -> TokenBatch:
    """Tokenise (prompt, target) pairs into a `TokenBatch`.

    Raises:
        EditInputError: non-string or blank text, a target that tokenises to nothing, or a pair longer
            than ``max_length`` tokens; the message names the offending item.
    """
    if isinstance(prompts, str) or isinstance(targets, str):
        raise EditInputError("encode_pairs takes lists of prompts and targets")
    if len(prompts) != len(targets):
        raise EditInputError(f"{len(prompts)} prompts but {len(targets)} targets")
    if len(prompts) == 0:
        raise EditInputError("no (prompt, target) pairs were given")
    rows = []
    for i, (prompt, target) in enumerate(zip(prompts, targets)):
        suffix = f" #{i}" if len(prompts) > 1 else ""
        check_text(prompt, what[0] + suffix)
        check_text(target, what[1] + suffix)
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        target_ids = tokenizer(target_text(prompt, target), add_special_tokens=False)["input_ids"]
        if len(target_ids) == 0:
            raise EditInputError(f"{what[1]}{suffix} {target!r} tokenises to nothing")
        if len(prompt_ids) == 0:
            raise EditInputError(f"{what[0]}{suffix} {prompt!r} tokenises to nothing")
        if len(prompt_ids) + len(target_ids) > max_length:
            raise EditInputError(
                f"{what[0]} + {what[1]}{suffix} is {len(prompt_ids) + len(target_ids)} tokens, over the limit of "
                f"{max_length} (model.max_length)"
            )
        rows.append((prompt_ids, target_ids))

    side = padding_side or getattr(tokenizer, "padding_side", "right") or "right"
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(p) + len(t) for p, t in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    target_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (prompt_ids, target_ids) in enumerate(rows):
        length = len(prompt_ids) + len(target_ids)
        start = width - length if side == "left" else 0
        input_ids[i, start : start + length] = torch.tensor(prompt_ids + target_ids)
        attention_mask[i, start : start + length] = 1
        target_mask[i, start + len(prompt_ids) : start + length] = True
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return TokenBatch(input_ids, attention_mask, position_ids, target_mask)


def concat_batches(batches, pad_id: int = 0, padding_side: str = "right") -> TokenBatch:
    """Stack batches of possibly different widths into one (re-padding on ``padding_side``)."""
    width = max(b.input_ids.shape[1] for b in batches)
    parts = []
    for b in batches:
        extra = width - b.input_ids.shape[1]
        pad = (extra, 0) if padding_side == "left" else (0, extra)
        parts.append(
            (
                torch.nn.functional.pad(b.input_ids, pad, value=pad_id),
                torch.nn.functional.pad(b.attention_mask, pad, value=0),
                torch.nn.functional.pad(b.position_ids, pad, value=0),
                torch.nn.functional.pad(b.target_mask, pad, value=False),
            )
        )
    return TokenBatch(*(torch.cat(column) for column in zip(*parts)))
