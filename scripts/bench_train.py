"""Seconds per edit example of MEND meta-training on the embedded default model, with and without the
prefix cache, in one run.

    python scripts/bench_train.py [--data FILE] [--steps 20] [--batch-sizes 10] [overrides ...]

Builds the prefix cache for every row of ``--data`` (timed: that is what a training run builds), then
times the training step (data encoding and gathering, capture pass, editor, edited forward, backward,
Adam) after warm-up steps, first on the full forward and then from the cache, with the default editor
config (src/mend/config.py) unless overridden (e.g. ``editor=cpu``). The last line reads

    train speed: uncached X s/example, cached Y s/example, speedup Zx, cache build B s for N rows

Never run it while another CPU-heavy job runs: two such processes slow each other down many times over.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from mend.config import load_config
from mend.data import load_records
from mend.meta_batch import EditSampler
from mend.models import load_base_model, resolve_device
from mend.networks import MendNetworks
from mend.prefix_cache import PrefixCache, training_rows
from mend.prefix_forward import lowest_edited_block
from mend.targets import resolve_targets
from mend.trainer import make_optimizer, training_step
from mend.allocator import keep_freed_memory


def time_steps(model, tokenizer, records, cfg, batch_size: int, steps: int, warmup: int = 3,
               prefix_cache=None, moments=None) -> float:
    """Median seconds per edit example over ``steps`` training steps of ``batch_size`` edits (each of
    ``cfg.train.n_edits`` facts); ``moments`` is the preserved knowledge the solves keep, as in training."""
    device = next(model.parameters()).device
    targets = resolve_targets(model, cfg.model.edit_params, cfg.model.edit_last_n_blocks)
    torch.manual_seed(0)
    networks = MendNetworks(targets, cfg.editor).to(device).train()
    optimizer = make_optimizer(networks, cfg)
    cfg.train.batch_size = batch_size
    sampler = EditSampler(records, batch_size * cfg.train.n_edits, seed=0)
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        training_step(model, tokenizer, networks, optimizer, sampler, step, cfg, device, prefix_cache=prefix_cache,
                      moments=moments)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times) / (batch_size * cfg.train.n_edits)


def load_for_bench(overrides) -> tuple:
    """(cfg, device, model, tokenizer, targets): the config with ``overrides`` (on the CPU unless they
    say otherwise), its base model frozen in eval mode, and the matrices it edits."""
    cfg = load_config(["model.device=cpu", *overrides])
    device = resolve_device(cfg.model.device)
    model, tokenizer = load_base_model(cfg.model.name, dtype=cfg.model.dtype, device=device)
    model.requires_grad_(False).eval()
    return cfg, device, model, tokenizer, resolve_targets(model, cfg.model.edit_params, cfg.model.edit_last_n_blocks)


def main():
    keep_freed_memory()  # as the command line does (mend/allocator.py); MEND_MALLOC_TUNING=0 measures without it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/facts/train.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-sizes", default="10")
    parser.add_argument("--run-steps", type=int, default=2500, help="run length for the amortised speedup")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. editor=cpu model.device=cuda")
    args = parser.parse_args()
    cfg, device, model, tokenizer, targets = load_for_bench(args.overrides)
    records = load_records(args.data)
    start = lowest_edited_block(targets)
    print(f"{cfg.model.name} on {device} ({torch.get_num_threads()} threads), editor rank {cfg.editor.rank}, "
          f"n_edits {cfg.train.n_edits}, edited blocks from {start}, bf16 {cfg.train.bf16 and device.type == 'cuda'}, "
          f"data {args.data} ({len(records)} records)")
    with tempfile.TemporaryDirectory() as directory:  # a fresh directory: the build is timed every time
        began = time.perf_counter()
        cache = PrefixCache.build_or_load(model, tokenizer, training_rows(records), start=start,
                                          max_length=cfg.model.max_length, dtype=cfg.train.prefix_cache_dtype,
                                          placement="memory", directory=directory)
        build = time.perf_counter() - began
        print(cache.info.describe())
        for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
            uncached = time_steps(model, tokenizer, records, cfg, batch_size, args.steps)
            cached = time_steps(model, tokenizer, records, cfg, batch_size, args.steps, prefix_cache=cache)
            per_step = batch_size * cfg.train.n_edits
            amortised = (args.run_steps * per_step * uncached) / (args.run_steps * per_step * cached + build)
            print(f"batch_size {batch_size:3d}: uncached {uncached:.4f} s/example ({uncached * per_step:.3f} s/step), "
                  f"cached {cached:.4f} s/example ({cached * per_step:.3f} s/step), speedup {uncached / cached:.2f}x; "
                  f"with the build amortised over a {args.run_steps}-step run {amortised:.2f}x")
    print(f"train speed: uncached {uncached:.4f} s/example, cached {cached:.4f} s/example, "
          f"speedup {uncached / cached:.2f}x, cache build {build:.1f} s for {len(cache)} rows")


if __name__ == "__main__":
    main()
