"""Preserved knowledge: the key second moment of text that edits must leave alone, computed once per
base model and cached.

For every edited matrix, ``C = E[u u^T]`` over the tokens of the preserved texts (d_in, d_in), ``u``
being the matrix's raw input (`mend.memory.key_moments`). Every ridge solve then adds
``editor.preserve_weight * C`` to its normal equation (`mend.aggregate`), which preconditions the
edit's keys by ``(C + lambda I)^-1`` as ROME and MEMIT do: directions that generic text uses much are
changed little. Meta-training with it (``train.preserve_records``) teaches the editor networks to edit
through that solve; the trained editor keeps C and solves with it at edit time too.

The texts are offline: the locality probes (prompt and answer) of training records, facts about other
subjects that the edits must spare. ``train.preserve_answer_weight`` adds, with that weight, the moment
at the positions that predict those probes' answers (`mend.memory.answer_key_moments`): the keys a
neighbouring fact reads its answer from, which a moment over whole texts weighs as one token in ten.
Each cache file is keyed on the model's weights and config, the tokenizer, the edited matrices,
``max_length`` and the texts (or probes).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import load_tensors, save_tensors
from .memory import answer_key_moments, check_moments, key_moments
from .prefix_cache import cache_key, prefix_fingerprint, tokenizer_fingerprint
from .targets import EditTarget, find_blocks


def locality_texts(records, limit: int | None = None) -> list[str]:
    """``"prompt answer"`` of every locality probe of the first ``limit`` records (all when None)."""
    return [f"{prompt} {answer}" for prompt, answer in locality_pairs(records, limit)]


def locality_pairs(records, limit: int | None = None) -> list[tuple[str, str]]:
    """(prompt, answer) of every locality probe of the first ``limit`` records (all when None)."""
    chosen = records if limit is None else records[:limit]
    return [(probe.prompt, probe.answer) for record in chosen for probe in record.locality]


def preserved_moments(model, targets: list[EditTarget], tokenizer, texts: list[str], *, max_length: int,
                      directory=None, say=print, prefix_cache=None) -> dict[str, torch.Tensor]:
    """name -> E[u u^T] (d_in, d_in) float32 of every target over every token of ``texts``, read from
    ``directory`` when a run with the same key computed it (None: compute, cache nothing). Computing
    starts from ``prefix_cache`` (a `mend.prefix_cache.PrefixCache`) for the texts it holds."""
    if not texts:
        raise ValueError("no texts to compute preserved knowledge from (the records have no locality probes)")
    return _cached(model, targets, tokenizer, max_length, directory, say, prefix="preserved",
                   content={"texts": list(texts)}, what=f"{len(texts)} texts",
                   compute=lambda: key_moments(model, targets, tokenizer, list(texts), max_length=max_length,
                                               prefix_cache=prefix_cache))


def answer_moments(model, targets: list[EditTarget], tokenizer, pairs: list[tuple[str, str]], *, max_length: int,
                   directory=None, say=print, prefix_cache=None) -> dict[str, torch.Tensor]:
    """name -> E[u u^T] (d_in, d_in) float32 of every target at the positions that predict the answers
    of (prompt, answer) ``pairs``, cached like `preserved_moments`."""
    if not pairs:
        raise ValueError("no (prompt, answer) pairs to compute the answer moment from (the records have no locality probes)")
    return _cached(model, targets, tokenizer, max_length, directory, say, prefix="preserved-answers",
                   content={"pairs": [list(p) for p in pairs]}, what=f"the answers of {len(pairs)} probes",
                   compute=lambda: answer_key_moments(model, targets, tokenizer, list(pairs), max_length=max_length,
                                                      prefix_cache=prefix_cache))


def _cached(model, targets, tokenizer, max_length, directory, say, *, prefix: str, content: dict, what: str, compute):
    parts = {"model": prefix_fingerprint(model, len(find_blocks(model)[1])), "tokenizer": tokenizer_fingerprint(tokenizer),
             "targets": [[t.name, t.d_in] for t in targets], "max_length": max_length,
             "texts": cache_key(content)}
    key = cache_key(parts)
    path = Path(directory) / f"{prefix}-{key}.safetensors" if directory is not None else None
    if path is not None and path.is_file():
        moments = check_moments(load_tensors(path), targets)
        say(f"preserved knowledge: read {path.name} ({what})")
        return moments
    moments = check_moments(compute(), targets)
    if path is not None:
        save_tensors(moments, path)
        say(f"preserved knowledge: computed from {what}, cached as {path}")
    return moments
