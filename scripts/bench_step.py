"""Seconds per meta-training step for several facts-per-edit sizes, from a run's own caches.

    python scripts/bench_step.py --n-edits 20,50,100 [--steps 3] [overrides ...]
    python scripts/bench_step.py --n-edits 20,50 data=counterfact train=counterfact-batch

Unlike `scripts/bench_train.py`, nothing is rebuilt: the prefix cache and the preserved moments are
opened exactly as `scripts/train.py` opens them for the same config (built on first use, then
reused from ``$MEND_CACHE_DIR``), so the figure is the step a real run takes: capture pass, editor,
ridge solve with the preserved moment, edited forward, backward, Adam. One edit of ``n`` facts per
step (``train.batch_size`` as configured). Prints, per size, the median step and seconds per fact.

Never run it while another CPU-heavy job runs: two such processes slow each other down many times over.
"""

from __future__ import annotations

import argparse

import torch
from bench_train import load_for_bench, time_steps  # scripts/ is on the path when this file runs as a script

from mend.config import load_config
from mend.trainer import _load_data, open_preserved, open_prefix_cache
from mend.allocator import keep_freed_memory


def main():
    keep_freed_memory()  # as the command line does (mend/allocator.py); MEND_MALLOC_TUNING=0 measures without it
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-edits", default="20,50", help="comma-separated facts per edit")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per size, after one warm-up step")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data=counterfact train=counterfact-batch")
    args = parser.parse_args()
    base, device, model, tokenizer, targets = load_for_bench(args.overrides)
    train_records, val_records = _load_data(base)
    cache = open_prefix_cache(model, tokenizer, targets, train_records, val_records, base, is_main=True,
                              wait=lambda: None, data_files=(base.data.train_path, base.data.val_path), say=print)
    _, moments = open_preserved(model, tokenizer, targets, train_records, base, device, say=print)
    print(f"{base.model.name} on {device} ({torch.get_num_threads()} threads), data {base.data.train_path}, "
          f"{base.train.batch_size} edit(s) per step")
    for n in (int(x) for x in args.n_edits.split(",")):
        cfg = load_config(["model.device=cpu", *args.overrides, f"train.n_edits={n}"])
        per_fact = time_steps(model, tokenizer, train_records, cfg, cfg.train.batch_size, args.steps, warmup=1,
                              prefix_cache=cache, moments=moments)
        per_step = per_fact * n * cfg.train.batch_size
        print(f"n_edits {n}: {per_step:.2f} s per step, {per_fact:.3f} s per fact", flush=True)


if __name__ == "__main__":
    main()
