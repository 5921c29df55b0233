"""Meta-train a MEND editor.

    python scripts/train.py [--resume] [--config FILE] [overrides ...]
    python scripts/train.py data=counterfact editor=small train.max_steps=2000
    accelerate launch --num_processes 2 --cpu scripts/train.py train.max_steps=100   # data-parallel
"""

from mend.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["train", *__import__("sys").argv[1:]]))
