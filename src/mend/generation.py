"""Batched greedy decoding with a key/value cache and a stopping rule per row.

    ids = greedy_decode(model, tokenizer, ["The sky is", "Q: 2+2?\\nA:"], [3, 16], [None, stop])

Prompts are tokenised as `mend.batching.encode_pairs` does and left-padded; position ids count real
tokens only, so a row's tokens do not depend on what it is batched with (up to floating-point
rounding). After one pass over the prompts, each step feeds only the new tokens and reuses the
model's cache; a model that returns no cache is run on the whole sequence at every step instead.
Rows that are done keep being decoded (the batch keeps its shape) until every row is done, but their
extra tokens are not returned.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

# stop(ids) -> True once a row's generated ids (the newest last) complete its answer
StopRule = Callable[[list[int]], bool]


def _left_padded(tokenizer, prompts: Sequence[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input ids and attention mask of the prompts, padded on the left."""
    rows = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


@torch.no_grad()
def greedy_decode(model, tokenizer, prompts: Sequence[str], max_new_tokens: Sequence[int],
                  stops: Sequence[StopRule | None] | None = None, *, use_cache: bool = True) -> list[list[int]]:
    """Greedy (argmax) continuations of ``prompts``.

    Args:
        max_new_tokens: the most new tokens for each prompt (row i gets at most ``max_new_tokens[i]``).
        stops: per row, None (run to its cap) or a rule called with the row's new ids after each
            step; the row ends with the token that made it return True.
        use_cache: reuse the model's key/value cache (False: the whole sequence at every step).

    Returns:
        Per prompt, its new token ids.
    """
    if len(prompts) == 0:
        return []
    if len(max_new_tokens) != len(prompts) or (stops is not None and len(stops) != len(prompts)):
        raise ValueError(f"{len(prompts)} prompts need as many max_new_tokens and stops, got "
                         f"{len(max_new_tokens)} and {len(stops) if stops is not None else 'none'}")
    stops = list(stops) if stops is not None else [None] * len(prompts)
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_padded(tokenizer, prompts, device)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
    new: list[list[int]] = [[] for _ in prompts]
    done = [n <= 0 for n in max_new_tokens]
    past = None
    step_ids, step_positions = input_ids, position_ids
    for _ in range(max(max_new_tokens)):
        if all(done):
            break
        # 1. one forward: the whole prompt first, then only the newest token when the model keeps a cache
        out = model(input_ids=step_ids, attention_mask=attention_mask, position_ids=step_positions,
                    past_key_values=past, use_cache=use_cache, logits_to_keep=1)
        next_ids = out.logits[:, -1].argmax(-1)  # (B,)
        past = getattr(out, "past_key_values", None) if use_cache else None
        # 2. hand each unfinished row its token and ask its rule whether the answer is complete
        for i, token in enumerate(next_ids.tolist()):
            if done[i]:
                continue
            new[i].append(token)
            done[i] = len(new[i]) >= max_new_tokens[i] or (stops[i] is not None and stops[i](new[i]))
        # 3. extend the sequence by the new tokens
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)[:, None]], 1)
        if past is not None:
            step_ids, step_positions = next_ids[:, None], step_positions[:, -1:] + 1  # (B, 1)
        else:
            input_ids = torch.cat([input_ids, next_ids[:, None]], 1)
            step_ids = input_ids
            step_positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    return new


def greedy_continuations(model, tokenizer, prompts: Sequence[str], n_new: Sequence[int]) -> list[list[int]]:
    """Exactly ``n_new[i]`` greedy tokens after prompt i (no stopping rule)."""
    return greedy_decode(model, tokenizer, prompts, n_new)


def decode(tokenizer, ids: list[int]) -> str:
    """Decode generated ids, cut at the first EOS; ids the tokenizer cannot decode are dropped."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except (ValueError, IndexError, KeyError, TypeError):  # e.g. an id past a stub tokenizer's table
        decodable = []
        for i in ids:
            try:
                tokenizer.decode([i], skip_special_tokens=True)
                decodable.append(i)
            except (ValueError, IndexError, KeyError, TypeError):
                pass
        return tokenizer.decode(decodable, skip_special_tokens=True)
