"""Start a checkpoint save and stop in the middle of it, for tests/test_checkpoint.py to SIGKILL:

    python tests/kill_during_save_script.py KIND POINT DIRECTORY

KIND is ``editor`` (`Editor.save` to DIRECTORY/ckpt) or ``train_state`` (`save_train_state` to
DIRECTORY/state), of a checkpoint that differs from the one the test saved there before. POINT is
where the save stops: ``writing`` (the first file of the new checkpoint written, the rest not yet) or
``swapping`` (the old directory moved aside, the new one not yet moved in). There the script creates
DIRECTORY/ready and sleeps until it is killed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import mend.checkpoint  # noqa: E402
from tiny_models import tiny_model  # noqa: E402


def stop_here(directory: Path) -> None:
    (directory / "ready").touch()
    time.sleep(120)
    sys.exit("not killed")


def main(kind: str, point: str, directory: Path) -> None:
    from mend import Editor
    from mend.train_state import Progress, save_train_state

    target = directory / ("ckpt" if kind == "editor" else "state")
    if point == "writing":
        real_save_file = mend.checkpoint.save_file

        def save_file_then_stop(tensors, path):
            real_save_file(tensors, path)
            stop_here(directory)

        mend.checkpoint.save_file = save_file_then_stop
    elif point == "swapping":
        real_replace = os.replace

        def replace_but_stop_before_moving_in(src, dst):
            if Path(dst) == target and Path(src).is_dir():
                stop_here(directory)
            return real_replace(src, dst)

        os.replace = replace_but_stop_before_moving_in
    else:
        raise SystemExit(f"unknown point {point!r}")

    editor = Editor.untrained(*tiny_model("llama"), {"editor": {"rank": 4}})
    with torch.no_grad():
        for parameter in editor.networks.parameters():
            parameter.add_(1.0)  # not what the test saved
    if kind == "editor":
        editor.save(target)
    else:
        optimizer = torch.optim.Adam(editor.networks.parameters())
        save_train_state(target, editor.networks, optimizer, Progress(step=99), "train: {max_steps: 99}\n")
    sys.exit("the save finished without stopping")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], Path(sys.argv[3]))
