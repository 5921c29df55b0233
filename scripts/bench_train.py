"""Seconds per edit example of MEND meta-training on the embedded default model.

    python scripts/bench_train.py [--data FILE] [--steps 20] [--batch-sizes 1,10] [overrides ...]

Times the training step only (data encoding, capture pass, editor, edited forward, backward, Adam
step), after warm-up steps, with the default editor config (src/mend/config.py) unless overridden
(e.g. ``editor=cpu``). Never run it while another CPU-heavy job runs: two such processes slow
each other down many times over.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from mend.config import load_config
from mend.data import load_records
from mend.meta_batch import EditSampler
from mend.models import load_base_model, resolve_device
from mend.networks import MendNetworks
from mend.targets import resolve_targets
from mend.trainer import make_optimizer, training_step


def time_steps(model, tokenizer, records, cfg, batch_size: int, steps: int, warmup: int = 3) -> float:
    """Median seconds per edit example over ``steps`` training steps of ``batch_size`` edits."""
    device = next(model.parameters()).device
    targets = resolve_targets(model, cfg.model.edit_params, cfg.model.edit_last_n_blocks)
    networks = MendNetworks(targets, cfg.editor).to(device).train()
    optimizer = make_optimizer(networks, cfg)
    cfg.train.batch_size = batch_size
    sampler = EditSampler(records, batch_size * cfg.train.n_edits, seed=0)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        training_step(model, tokenizer, networks, optimizer, sampler, step, cfg, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) / (batch_size * cfg.train.n_edits)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/facts/train.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", default="1,10")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. editor=cpu model.device=cuda")
    args = parser.parse_args()
    cfg = load_config(["model.device=cpu", *args.overrides])
    device = resolve_device(cfg.model.device)
    model, tokenizer = load_base_model(cfg.model.name, dtype=cfg.model.dtype, device=device)
    records = load_records(args.data)
    print(f"{cfg.model.name} on {device} ({torch.get_num_threads()} threads), editor rank {cfg.editor.rank}, "
          f"n_edits {cfg.train.n_edits}, data {args.data}")
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        seconds = time_steps(model, tokenizer, records, cfg, batch_size, args.steps)
        print(f"batch_size {batch_size:3d}: {seconds:.3f} s per edit example ({seconds * batch_size:.2f} s per step)")


if __name__ == "__main__":
    main()
