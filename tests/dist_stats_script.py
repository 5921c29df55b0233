"""Merge normalisation statistics across the processes of a data-parallel launch; tests/test_networks.py
runs it as

    python -m torch.distributed.run --nproc_per_node 2 tests/dist_stats_script.py OUT_DIR

Each process feeds its own rows (`rows_for`) to two `RunningNorm`s over a few steps, merging after
each step, and writes its final statistics to ``OUT_DIR/rank{N}.safetensors``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from mend.networks import RunningNorm, merge_across_processes

STEPS = 3
DIMS = {"u": 5, "delta": 3}


def rows_for(step: int, rank: int, name: str) -> torch.Tensor:
    """The rows process ``rank`` sees at ``step``: sizes and distributions differ by process."""
    generator = torch.Generator().manual_seed(1000 * step + 10 * rank + len(name))
    n = 4 + 3 * rank + step
    return torch.randn(n, DIMS[name], generator=generator, dtype=torch.float64) * (1 + rank) + 5 * rank - step


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    norms = nn.ModuleDict({name: RunningNorm(d) for name, d in DIMS.items()})
    for step in range(STEPS):
        for name, norm in norms.items():
            norm.update(rows_for(step, rank, name))
        merge_across_processes(norms)
    buffers = {name: tensor.contiguous() for name, tensor in norms.named_buffers()}  # fresh_* included
    save_file(buffers, str(out / f"rank{rank}.safetensors"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
