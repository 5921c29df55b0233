"""Turning (prompt, target) text pairs into padded token batches with target masks.

A pair is tokenised as one text, ``prompt + " " + target``, so its tokens are the tokenizer's own
tokens for the whole sentence (tokenising `` target`` on its own would give a SentencePiece-style
tokenizer a stray "▁" token), and then split where its ids leave the prompt's: the target's tokens
are exactly the tokens the loss is taken on. Position ids are computed from the attention mask, so
left- and right-padded batches give identical logits.
"""

from __future__ import annotations

import unicodedata
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
    def positions_with_gradient(self) -> torch.Tensor:
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
    """Return ``value`` if it is a non-blank string without control characters, else raise
    EditInputError naming ``what``. Whitespace (tab, newline, ...) is not a control character here."""
    if not isinstance(value, str):
        raise EditInputError(f"{what} must be a string, got {type(value).__name__}: {value!r}")
    if not value.strip():
        raise EditInputError(f"{what} is empty or only whitespace: {value!r}")
    for position, char in enumerate(value):
        if unicodedata.category(char) == "Cc" and not char.isspace():
            raise EditInputError(f"{what} contains the control character {char!r} at position {position}: {value!r}")
    return value


def check_pairs(pairs, what: str = "pairs") -> list[tuple[str, str]]:
    """The one input check of an edit request: ``pairs`` as a list of (prompt, target) string tuples.

    Accepts any iterable of 2-tuples, 2-lists or ``{"prompt": ..., "target": ...}`` mappings.
    ``what`` names the argument in the messages (``keep`` for the facts an edit must leave alone).

    Raises:
        EditInputError: not an iterable of pairs, an empty one, a pair of the wrong length, or text
            that `check_text` refuses; the message names the pair by its index.
    """
    label = "" if what == "pairs" else f"{what} "
    if isinstance(pairs, (str, bytes, dict)) or not hasattr(pairs, "__iter__"):
        raise EditInputError(f"{what} must be a list of (prompt, target) tuples, got {type(pairs).__name__}: {pairs!r}")
    out = []
    for i, pair in enumerate(pairs):
        if isinstance(pair, dict):
            pair = (pair.get("prompt"), pair.get("target"))
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise EditInputError(f"{label}pair #{i} must be a (prompt, target) tuple, got {pair!r}")
        out.append((check_text(pair[0], f"{label}prompt #{i}"), check_text(pair[1], f"{label}target #{i}")))
    if not out:
        raise EditInputError(f"no (prompt, target) pairs were given{'' if what == 'pairs' else ' in ' + what}")
    return out


def target_text(prompt: str, target: str) -> str:
    """The target as it continues the prompt: with a separating space unless one is there."""
    if prompt[-1:].isspace() or target[:1].isspace():
        return target
    return " " + target


def split_tokens(tokenizer, prompt: str, target: str) -> tuple[list[int], list[int]]:
    """The ids of the joined text ``prompt + target_text(prompt, target)``, split into (prompt part,
    target part).

    The target part starts at the first token where the joined ids differ from the prompt's own ids,
    so a token that spans the boundary (a prompt's trailing space merged into the target's first word)
    belongs to the target. Special tokens a tokenizer appends at the end of every text (an EOS) are
    dropped: the loss is on the target's own tokens.
    """
    prompt_ids = _without_trailing_specials(tokenizer, tokenizer(prompt, add_special_tokens=True)["input_ids"])
    joined = prompt + target_text(prompt, target)
    joined_ids = _without_trailing_specials(tokenizer, tokenizer(joined, add_special_tokens=True)["input_ids"])
    shared = 0
    for a, b in zip(prompt_ids, joined_ids):
        if a != b:
            break
        shared += 1
    return joined_ids[:shared], joined_ids[shared:]


def _without_trailing_specials(tokenizer, ids) -> list[int]:
    ids = list(ids)
    special = set(getattr(tokenizer, "all_special_ids", None) or ())
    while ids and ids[-1] in special:
        ids.pop()
    return ids


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
        prompt_ids, target_ids = split_tokens(tokenizer, prompt, target)
        if len(target_ids) == 0:
            raise EditInputError(f"{what[1]}{suffix} {target!r} tokenises to nothing")
        if len(prompt_ids) == 0:
            raise EditInputError(f"{what[0]}{suffix} {prompt!r} tokenises to nothing before the {what[1]}")
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
