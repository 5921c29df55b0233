"""Meta-train a tiny editor in every process of a data-parallel launch; tests/test_trainer.py runs it as

    accelerate launch --num_processes 2 --cpu tests/dist_train_script.py OUT_DIR [overrides...]

Each process writes its final editor state to ``OUT_DIR/rank{N}.safetensors``; the main process also
writes the editor's initial state to ``OUT_DIR/initial.safetensors``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import tiny_model, tiny_records  # noqa: E402

from mend.config import load_config  # noqa: E402
from mend.networks import MendNetworks  # noqa: E402
from mend.targets import resolve_targets  # noqa: E402
from mend.trainer import train  # noqa: E402

STEPS = 4


def plain(state: dict) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def main(out: Path, overrides: list[str]) -> None:
    torch.set_num_threads(1)
    model, tokenizer = tiny_model("llama")  # seeded: the same weights in every process
    records = tiny_records()
    cfg = load_config([
        "model.device=cpu", "train.progress=false", f"train.out_dir={out / 'run'}", "editor.rank=8",
        "editor.init_lr=1.0", "model.edit_last_n_blocks=2", "train.batch_size=2", f"train.max_steps={STEPS}",
        "train.val_every=2", "train.log_every=1", "train.val_records=4", "train.patience=0",
        "train.lr=1e-2", "train.lr_lr=1e-2", f"train.prefix_cache_dir={out / 'prefix'}", *overrides,
    ])
    result = train(cfg, model=model, tokenizer=tokenizer, records=(records, records[:4]))
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    save_file(plain(result.networks.state_dict()), str(out / f"rank{rank}.safetensors"))
    if rank == 0:
        torch.manual_seed(cfg.train.seed)  # what train() does before building the networks
        initial = MendNetworks(resolve_targets(model, None, cfg.model.edit_last_n_blocks), cfg.editor)
        save_file(plain(initial.state_dict()), str(out / "initial.safetensors"))
    print(f"rank {rank} done: {result.progress.step} steps")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
