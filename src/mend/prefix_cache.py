"""The prefix cache: hidden states entering the lowest edited block, computed once per training row.

The base model is frozen during meta-training, so for every row a run uses (each edit prompt +
target, each paraphrase + target, each locality prompt + answer) the hidden states entering the lowest
edited block never change. `PrefixCache.build` computes them once; a step then gathers its rows'
states (`PrefixCache.gather`) and runs only the edited blocks, the final norm and the LM head at the
target positions (`mend.prefix_forward.starting_at_block`).

Storage: one safetensors file per key, ``hidden`` (n_tokens, d) in float32 (or bf16/fp16 on request),
``token_ids`` (n_tokens,) and ``offsets`` (n_rows + 1,): row i is ``hidden[offsets[i]:offsets[i+1]]``,
looked up by its token ids. The key hashes everything the states depend on: the weights and config
of the embeddings and blocks below the edited ones, the tokenizer, ``max_length``, the rows' token
ids (so the data), the first edited block and the storage dtype. A change of any of them is a new
key, so a stale cache is never read. The file is written atomically and reused by later runs; it is
held in memory, or memory-mapped from disk when it would not fit (``train.prefix_cache``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .batching import TokenBatch, encode_pairs, EditInputError
from .checkpoint import atomic_write_file
from .prefix_forward import BlockOutput, hidden_states_entering, probe_block_output
from .targets import find_blocks

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_NUMPY_VIEW = {torch.float32: np.float32, torch.bfloat16: np.int16, torch.float16: np.float16}
BUILD_TOKENS = 8192  # tokens per forward pass while building


class PrefixCacheError(RuntimeError):
    """The prefix cache cannot be used as configured (for instance it does not fit in memory)."""


def training_rows(records, *, validation_records=()) -> list[tuple[str, str]]:
    """Every (prompt, answer) row meta-training can use: edit prompts, paraphrases and locality probes
    of the training records (any of them may be drawn), and what validation uses of its records."""
    rows = []
    for r in records:
        rows.append((r.prompt, r.target))
        rows += [(p, r.target) for p in r.equivalents]
        rows += [(p.prompt, p.answer) for p in r.locality]
    for r in validation_records:
        rows += [(r.prompt, r.target), (r.equivalents[0], r.target)]
        rows += [(p.prompt, p.answer) for p in r.locality[:1]]
    return list(dict.fromkeys(rows))


def encode_rows(tokenizer, rows, max_length: int) -> list[tuple[int, ...]]:
    """Token ids of each row, exactly as `mend.batching.encode_pairs` lays them out; rows that cannot
    be encoded (too long, empty target) are left out: a step that draws one fails as it would uncached."""
    encoded = []
    for prompt, answer in rows:
        try:
            batch = encode_pairs(tokenizer, [prompt], [answer], max_length=max_length, padding_side="right")
        except EditInputError:
            continue
        encoded.append(tuple(batch.input_ids[0].tolist()))
    return list(dict.fromkeys(encoded))


def _hash_tensor(digest, tensor: torch.Tensor) -> None:
    data = tensor.detach().to("cpu").contiguous().reshape(-1)  # 1-D: a 0-dim tensor cannot be viewed as bytes
    digest.update(str((tuple(tensor.shape), str(data.dtype))).encode())
    digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")


def prefix_fingerprint(model, start: int) -> str:
    """Hash of what the hidden states entering block ``start`` depend on: the model's config and every
    parameter and buffer outside blocks ``start ..`` (embeddings, positions, lower blocks)."""
    prefix, blocks = find_blocks(model)
    upper = tuple(f"{prefix}.{i}." for i in range(start, len(blocks)))
    digest = hashlib.blake2b(digest_size=20)
    digest.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if not name.startswith(upper):
            digest.update(name.encode())
            _hash_tensor(digest, tensor)
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """Hash of a tokenizer's full definition (a fast tokenizer's JSON, else its vocabulary)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    elif hasattr(tokenizer, "get_vocab"):
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    else:  # a minimal tokenizer object: its type and how it encodes a probe text
        text = f"{type(tokenizer).__qualname__}|{len(tokenizer)}|{tokenizer('Probe text 123 é')['input_ids']}"
    return hashlib.blake2b(text.encode(), digest_size=16).hexdigest()


def file_hash(path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.blake2b(json.dumps(parts, sort_keys=True).encode(), digest_size=16).hexdigest()


def available_memory_bytes() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # Linux without psutil
        with open("/proc/meminfo") as handle:
            fields = dict(line.split(":", 1) for line in handle)
        return int(fields["MemAvailable"].split()[0]) * 1024


@dataclass
class CacheInfo:
    """What a run prints about its cache."""

    path: Path
    n_rows: int
    n_tokens: int
    nbytes: int
    dtype: str
    placement: str  # "memory" | "disk (memory-mapped)"
    build_seconds: float | None  # None when loaded from an earlier run

    def describe(self) -> str:
        how = f"built in {self.build_seconds:.1f} s" if self.build_seconds is not None else "reused"
        return (f"prefix cache: {self.n_rows} rows, {self.n_tokens} tokens, {self.nbytes / 2**20:.1f} MiB "
                f"{self.dtype} in {self.placement}, {how} ({self.path})")


class PrefixCache:
    """Hidden states entering block ``start`` for a fixed set of token rows.

    Attributes:
        start: index of the first block that runs (the lowest edited block).
        block_output: how the replaced blocks return hidden states (`mend.prefix_forward.BlockOutput`).
        hidden: (n_tokens, d) the states of all rows, concatenated.
        offsets: (n_rows + 1,) row i is ``hidden[offsets[i]:offsets[i + 1]]``.
    """

    def __init__(self, start: int, block_output: BlockOutput, hidden: torch.Tensor, token_ids: torch.Tensor,
                 offsets: torch.Tensor, info: CacheInfo | None = None):
        self.start = start
        self.block_output = block_output
        self.hidden = hidden
        self.offsets = offsets.tolist()
        self.info = info
        ids = token_ids.tolist()
        self.index = {tuple(ids[a:b]): i for i, (a, b) in enumerate(zip(self.offsets, self.offsets[1:]))}

    def __len__(self) -> int:
        return len(self.index)

    def gather(self, batch: TokenBatch) -> torch.Tensor:
        """(B, T, d) the cached states of a batch's rows at their real tokens (zeros at padding).

        Raises:
            KeyError: a row that was not cached (its token ids are named).
        """
        return self.states(batch.input_ids, batch.attention_mask)

    def states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T, d) the cached states of rows ``input_ids`` (B, T) at the real tokens of
        ``attention_mask`` (B, T), any padding side (zeros at padding).

        Raises:
            KeyError: a row that was not cached (its token ids are named).
        """
        rows, width = input_ids.shape
        out = torch.zeros(rows, width, self.hidden.shape[1], dtype=self.hidden.dtype)
        mask = attention_mask.bool().cpu()
        input_ids = input_ids.cpu()
        for b in range(rows):
            key = tuple(input_ids[b][mask[b]].tolist())
            i = self.index.get(key)
            if i is None:
                raise KeyError(f"row {b} (token ids {list(key)[:12]}...) is not in the prefix cache")
            out[b, mask[b]] = self.hidden[self.offsets[i] : self.offsets[i + 1]]
        return out

    # ---- building and storage ----

    @classmethod
    def build_or_load(cls, model, tokenizer, rows: list[tuple[str, str]], *, start: int, max_length: int,
                      dtype: str = "float32", placement: str = "auto", directory, data_hashes=None,
                      build_here: bool = True, wait=None) -> "PrefixCache":
        """Load the cache for these rows from ``directory``, or build and write it there first.

        Args:
            rows: (prompt, answer) pairs (`training_rows`).
            placement: "memory", "disk" (memory-mapped) or "auto" (memory when it fits in half of the
                available memory, else disk).
            data_hashes: hashes of the data files the rows come from (part of the key).
            build_here: False on data-parallel processes other than the main one: they call ``wait()``
                (a barrier) while the main process builds, then load.
        """
        if dtype not in DTYPES:
            raise PrefixCacheError(f"train.prefix_cache_dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        token_rows = encode_rows(tokenizer, rows, max_length)
        if not token_rows:
            raise PrefixCacheError("no row could be encoded for the prefix cache")
        rows_digest = hashlib.blake2b(digest_size=16)
        for ids in sorted(token_rows):
            rows_digest.update(np.asarray(ids, dtype=np.int64).tobytes() + b"|")
        parts = {
            "format": 1,
            "model": prefix_fingerprint(model, start),
            "tokenizer": tokenizer_fingerprint(tokenizer),
            "data": sorted(data_hashes or []),
            "rows": rows_digest.hexdigest(),
            "max_length": int(max_length),
            "start_block": int(start),
            "dtype": dtype,
        }
        key = cache_key(parts)
        path = Path(directory) / f"prefix-{key}.safetensors"
        width = int(model.get_input_embeddings().embedding_dim)
        n_tokens = sum(len(ids) for ids in token_rows)
        nbytes = n_tokens * width * DTYPES[dtype].itemsize
        where = _placement(placement, nbytes)
        block_output = probe_block_output(model, start)
        build_seconds = None
        if not path.is_file():
            if build_here:
                log.info("building the prefix cache: %d rows, %d tokens, %.1f MiB %s", len(token_rows), n_tokens,
                         nbytes / 2**20, dtype)
                began = time.perf_counter()
                _write(path, _compute(model, start, token_rows, DTYPES[dtype]), token_rows, parts)
                build_seconds = time.perf_counter() - began
            if wait is not None:
                wait()
        elif wait is not None:
            wait()
        hidden, token_ids, offsets = _read(path, key, mmap=where == "disk")
        info = CacheInfo(path, len(offsets) - 1, int(offsets[-1]), nbytes, dtype,
                         "memory" if where == "memory" else "disk (memory-mapped)", build_seconds)
        return cls(start, block_output, hidden, token_ids, offsets, info)


def _placement(placement: str, nbytes: int) -> str:
    if placement not in ("auto", "memory", "disk"):
        raise PrefixCacheError(f"prefix cache placement must be auto, memory or disk, got {placement!r}")
    free = available_memory_bytes()
    if placement == "memory" and nbytes > free:
        raise PrefixCacheError(
            f"the prefix cache needs {nbytes / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB of memory is available; "
            f"set train.prefix_cache=disk (memory-mapped) or train.prefix_cache_dtype=bfloat16")
    if placement == "auto":
        return "memory" if nbytes <= free // 2 else "disk"
    return placement


def _compute(model, start: int, token_rows, dtype: torch.dtype) -> list[torch.Tensor]:
    """States entering block ``start`` for every row, computed in length-sorted, right-padded batches."""
    device = next(model.parameters()).device
    order = sorted(range(len(token_rows)), key=lambda i: len(token_rows[i]))
    states: list[torch.Tensor | None] = [None] * len(token_rows)
    i = 0
    while i < len(order):
        j = i + 1  # grow the chunk while (rows x widest row) stays within BUILD_TOKENS; rows are length-sorted
        while j < len(order) and (j - i + 1) * len(token_rows[order[j]]) <= BUILD_TOKENS:
            j += 1
        chunk = order[i:j]
        width = max(len(token_rows[j]) for j in chunk)
        input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
        attention_mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for row, j in enumerate(chunk):
            ids = token_rows[j]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
        hidden = hidden_states_entering(model, start, input_ids.to(device), attention_mask.to(device),
                                        position_ids.to(device))
        hidden = hidden.to("cpu", dtype)
        for row, j in enumerate(chunk):
            states[j] = hidden[row, : len(token_rows[j])].clone()
        i += len(chunk)
    return states


def _write(path: Path, states: list[torch.Tensor], token_rows, parts: dict) -> None:
    from safetensors.torch import save_file

    hidden = torch.cat(states)
    token_ids = torch.tensor([t for ids in token_rows for t in ids], dtype=torch.int64)
    offsets = torch.tensor([0] + [len(ids) for ids in token_rows], dtype=torch.int64).cumsum(0)
    metadata = {"key": cache_key(parts), "parts": json.dumps(parts)}
    atomic_write_file(path, lambda tmp: save_file({"hidden": hidden, "token_ids": token_ids, "offsets": offsets},
                                                  tmp, metadata=metadata))


def _read(path: Path, key: str, *, mmap: bool):
    """(hidden, token_ids, offsets) from a cache file; ``hidden`` memory-mapped when ``mmap``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("key") != key:
            raise PrefixCacheError(f"{path} holds a prefix cache for another key; delete it")
        token_ids = handle.get_tensor("token_ids")
        offsets = handle.get_tensor("offsets")
        if not mmap:
            return handle.get_tensor("hidden"), token_ids, offsets
    return _mmap_tensor(path, "hidden"), token_ids, offsets


def _mmap_tensor(path: Path, name: str) -> torch.Tensor:
    """A read-only memory-mapped view of one tensor of a safetensors file (no copy into memory)."""
    with open(path, "rb") as handle:
        header_length = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_length))
    entry = header[name]
    dtype = {v: k for k, v in _SAFETENSORS_DTYPES.items()}[entry["dtype"]]
    begin, end = entry["data_offsets"]
    count = (end - begin) // dtype.itemsize
    array = np.memmap(path, dtype=_NUMPY_VIEW[dtype], mode="r", offset=8 + header_length + begin, shape=(count,))
    with warnings.catch_warnings():  # torch warns that the mapping is read-only; it is only read
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.from_numpy(array)
    return flat.view(dtype).view(entry["shape"])
