"""Keep freed memory for reuse instead of handing it back to the operating system (glibc only).

Meta-training and editing allocate many short-lived tensors of tens of megabytes: a step's
vocabulary logits alone are ``[~250 positions, 49,152 tokens]`` in float32, about 49 MB, several
times over (logits, log-softmax, the KL's products, their gradients). glibc serves every block
above its mmap threshold (at most 32 MB by default) with a fresh ``mmap``, so each such tensor
costs page faults to zero its pages and a ``munmap`` when it is freed. On 2 CPU cores that kernel
work was a quarter of the CPU time of CounterFact meta-training (``docs/benchmarks.md``, "The allocator").

`keep_freed_memory` raises glibc's mmap and trim thresholds so that large blocks come from the heap
and go back to it: the next step reuses them without faulting. The cost is memory: freed blocks stay
with the process, so its resident size stays near its peak (model loading included) instead of
falling after it. It changes how memory is obtained, never what is computed.

Nothing happens at import. The command line (`mend ...`, `scripts/train.py`) calls it once at
start; Python users may call it themselves. ``MEND_MALLOC_TUNING=0`` turns it off, and it leaves
malloc alone where the user tuned it already (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``
or ``GLIBC_TUNABLES`` set).
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's <malloc.h>
M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30  # 1 GiB: above any tensor a step of the embedded models allocates
ENV_SWITCH = "MEND_MALLOC_TUNING"
USER_TUNING = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES")  # the user's own settings win


def _glibc():
    """The C library if it is glibc (it has ``mallopt`` and ``gnu_get_libc_version``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return None  # musl and others: their allocators take no such settings
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc


def keep_freed_memory(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Have glibc's malloc keep blocks up to ``threshold`` bytes in the heap; return whether it did.

    Returns False, changing nothing, where the C library is not glibc, where ``MEND_MALLOC_TUNING`` is
    ``0`` / ``false`` / ``off`` / ``no``, where the user set glibc's malloc variables themselves, or
    where glibc refuses the mmap threshold (older releases cap it at 32 MiB). Calling it again
    is harmless.
    """
    if not 0 < threshold < 2**31:
        raise ValueError(f"threshold must be a positive number of bytes below 2 GiB (mallopt takes an int), got {threshold}")
    if os.environ.get(ENV_SWITCH, "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    if any(name in os.environ for name in USER_TUNING):
        return False
    libc = _glibc()
    if libc is None:
        return False
    # the mmap threshold first: it is the one an old glibc refuses, and a refused call changes nothing;
    # the trim threshold (which glibc always takes, and which fixes the mmap threshold for good) only then
    if libc.mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        return False
    return libc.mallopt(M_TRIM_THRESHOLD, threshold) == 1
