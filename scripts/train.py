"""Meta-train a MEND editor.

    python scripts/train.py [--resume] [--config FILE] [overrides ...]
    python scripts/train.py data=counterfact editor=small train.max_steps=2000
    python -m torch.distributed.run --nproc_per_node 2 scripts/train.py train.max_steps=100  # CPU data-parallel
    accelerate launch scripts/train.py ...                                                 # GPU data-parallel
"""

from mend.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *__import__("sys").argv[1:]]))
