"""Training-state checkpoints for resuming a killed run: editor networks (with their normalisation
statistics), optimiser state, step counters and RNG state, as safetensors + YAML, written atomically."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import CheckpointError, atomic_write_dir, recover_dir, load_tensors, load_yaml, save_tensors, save_yaml

NETWORKS_FILE = "networks.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.yaml"
AVERAGE_FILE = "average.safetensors"  # the networks' weight average, for a run with train.ema_decay


@dataclass
class Progress:
    """Counters a resumed run continues from."""

    step: int = 0  # steps completed
    skipped_steps: int = 0  # steps whose gradients were not finite
    best_score: float = float("-inf")
    best_step: int = -1
    bad_validations: int = 0  # validations since the best one
    stopped_early: bool = False
    history: list = field(default_factory=list)  # validation metrics, one dict per validation
    trained_s: float = 0.0  # seconds of training (steps and validations) so far, over every resumption
    setup_s: float = 0.0  # seconds the first run spent before its first step (train.budget_includes_setup)

    def kept_step(self, keep: str) -> int:
        """The step whose weights ``best/`` holds under ``train.keep``: the best validation's, or the latest's."""
        if keep == "best":
            return self.best_step
        return self.history[-1]["step"] if self.history else -1


def _flatten_optimizer(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state_dict = optimizer.state_dict()
    tensors, plain_state = {}, {}
    for index, values in state_dict["state"].items():
        plain_state[int(index)] = {}
        for key, value in values.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value
            else:
                plain_state[int(index)][key] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "plain_state": plain_state}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(i): dict(v) for i, v in meta["plain_state"].items()}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_train_state(path, networks, optimizer, progress: Progress, config_yaml: str, average=None) -> None:
    """Write the whole training state to the directory ``path`` (replacing it atomically), with the
    `mend.averaging.WeightAverage` ``average`` where the run keeps one."""
    opt_tensors, opt_meta = _flatten_optimizer(optimizer)

    def write(staging):
        staging = Path(staging)
        save_tensors(networks.state_dict(), staging / NETWORKS_FILE)
        save_tensors({**opt_tensors, "__torch_rng__": torch.get_rng_state()}, staging / OPTIMIZER_FILE)
        save_yaml({"progress": asdict(progress), "optimizer": opt_meta}, staging / STATE_FILE)
        (staging / "config.yaml").write_text(config_yaml)
        if average is not None:
            save_tensors(average.state_dict(), staging / AVERAGE_FILE)

    atomic_write_dir(path, write)


def load_train_state(path, networks, optimizer, device="cpu", average=None) -> Progress:
    """Restore networks and optimiser (and the run's `mend.averaging.WeightAverage` ``average``, where
    it keeps one) in place from ``path``; return the saved progress.

    Every file is read and checked before anything is restored, so a broken state (CheckpointError)
    leaves the networks, the optimiser and the average as they were.
    """
    path = recover_dir(path)
    if not path.is_dir():
        raise CheckpointError(f"no training state to resume from at {path}")
    meta = load_yaml(path / STATE_FILE)
    for key in ("progress", "optimizer"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{path / STATE_FILE} lacks the mapping {key!r}")
    try:
        progress = Progress(**meta["progress"])
        optimizer_tensors = load_tensors(path / OPTIMIZER_FILE, device)
        rng_state = optimizer_tensors.pop("__torch_rng__").cpu()
        optimizer_state = _unflatten_optimizer(optimizer_tensors, meta["optimizer"])
    except (KeyError, TypeError, ValueError, AttributeError) as error:
        if isinstance(error, CheckpointError):
            raise
        raise CheckpointError(f"{path} is malformed: {type(error).__name__}: {error}") from None
    state = load_tensors(path / NETWORKS_FILE, device)
    expected = networks.state_dict()
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong_shape = [k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise CheckpointError(
            f"{path / NETWORKS_FILE} does not fit this run's editor (changed config?): missing {missing[:4]}, "
            f"unexpected {unexpected[:4]}, other shapes {wrong_shape[:4]}"
        )
    loaded_average = None
    if average is not None:
        if not (path / AVERAGE_FILE).is_file():
            raise CheckpointError(f"{path} has no {AVERAGE_FILE}: the run it holds kept no weight average")
        loaded_average = type(average)(networks, average.decay)  # checked here, committed below
        average_tensors = load_tensors(path / AVERAGE_FILE, device)  # a broken file: CheckpointError
        try:
            loaded_average.load_state_dict(average_tensors)
        except ValueError as error:
            raise CheckpointError(f"{path / AVERAGE_FILE}: {error}") from None
    backup = optimizer.state_dict()
    try:
        optimizer.load_state_dict(optimizer_state)
    except (KeyError, ValueError, TypeError) as error:
        optimizer.load_state_dict(backup)
        raise CheckpointError(f"{path / OPTIMIZER_FILE} does not fit this run's optimiser: {error}") from None
    networks.load_state_dict(state)
    if loaded_average is not None:
        average.averaged, average.updates = loaded_average.averaged, loaded_average.updates
    torch.set_rng_state(rng_state)
    return progress
