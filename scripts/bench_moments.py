"""Time the preserved knowledge of a recipe (`mend.preserved`) with and without the prefix cache.

    python scripts/bench_moments.py data=counterfact train=counterfact-quality model.device=cpu

Opens (or builds) the run's prefix cache, then computes the key moments of the first
``train.preserve_records`` training records' locality probes over whole texts and at their answer
positions twice: starting from the cache, and with the full forward. Prints both times and the
largest difference between the two results, relative to the largest entry. Nothing is written
except the prefix cache, when it is not built yet.
"""

from __future__ import annotations

import sys
import time

from mend.config import load_config
from mend.memory import answer_key_moments, key_moments
from mend.models import load_base_model
from mend.preserved import locality_pairs, locality_texts
from mend.targets import resolve_targets
from mend.trainer import _load_data, open_prefix_cache
from mend.allocator import keep_freed_memory


def main(argv=None) -> None:
    keep_freed_memory()  # as the command line does (mend/allocator.py); MEND_MALLOC_TUNING=0 measures without it
    cfg = load_config(list(sys.argv[1:] if argv is None else argv))
    model, tokenizer = load_base_model(cfg.model.name, dtype=cfg.model.dtype)
    train_records, val_records = _load_data(cfg)
    targets = resolve_targets(model, cfg.model.edit_params, cfg.model.edit_last_n_blocks)
    cache = open_prefix_cache(model, tokenizer, targets, train_records, val_records, cfg,
                              data_files=(cfg.data.train_path, cfg.data.val_path))
    n = cfg.train.preserve_records or len(train_records)
    texts, pairs = locality_texts(train_records, n), locality_pairs(train_records, n)
    results = {}
    for label, prefix_cache in (("from the prefix cache", cache), ("full forward", None)):
        start = time.perf_counter()
        whole = key_moments(model, targets, tokenizer, texts, max_length=cfg.model.max_length, prefix_cache=prefix_cache)
        middle = time.perf_counter()
        answers = answer_key_moments(model, targets, tokenizer, pairs, max_length=cfg.model.max_length,
                                     prefix_cache=prefix_cache)
        end = time.perf_counter()
        results[label] = (whole, answers)
        print(f"{label}: {len(texts)} texts {middle - start:.1f} s, the answers of {len(pairs)} probes "
              f"{end - middle:.1f} s, total {end - start:.1f} s", flush=True)
    (cached_whole, cached_answers), (full_whole, full_answers) = results.values()
    for what, cached, full in (("texts", cached_whole, full_whole), ("answers", cached_answers, full_answers)):
        worst = max(float((cached[k] - full[k]).abs().max() / full[k].abs().max()) for k in full)
        print(f"{what}: largest difference / largest entry {worst:.1e}")


if __name__ == "__main__":
    main()
