"""Training-state checkpoints: everything a killed run needs to continue exactly, written atomically."""

from __future__ import annotations

import copy
from dataclasses import asdict

import pytest
import torch

import mend.train_state as train_state
from mend import CheckpointError
from mend.networks import MendNetworks
from mend.targets import resolve_targets
from mend.train_state import Progress, load_train_state, save_train_state
from tiny_models import tiny_model

FILES = ("networks.safetensors", "optimizer.safetensors", "state.yaml", "config.yaml")


def make_training(model):
    """Editor networks and their Adam optimiser (two parameter groups, as the trainer builds them)."""
    networks = MendNetworks(resolve_targets(model, None, 1), {"rank": 4})
    params = [p for n, p in networks.named_parameters() if n != "log_lrs"]
    optimizer = torch.optim.Adam([{"params": params, "lr": 1e-2}, {"params": [networks.log_lrs], "lr": 1e-3}])
    return networks, optimizer


def take_step(networks, optimizer) -> None:
    """One optimiser step on a loss touching every parameter; updates the running statistics too."""
    loss = 0.0
    for name, network in networks.networks.items():
        u_t, delta_t = network(torch.randn(5, network.d_in), torch.randn(5, network.d_out), 0)
        loss = loss + (u_t**2).sum() + (delta_t**3).sum()
    loss = loss + networks.log_lrs.sum() + sum((p**2).sum() for p in networks.parameters())
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.fixture
def trained():
    model, _ = tiny_model("llama")
    networks, optimizer = make_training(model)
    for _ in range(3):
        take_step(networks, optimizer)
    progress = Progress(step=3, skipped_steps=1, best_score=0.25, best_step=2, bad_validations=1,
                        history=[{"step": 2, "score": 0.25, "edit_acc": 0.5}])
    return model, networks, optimizer, progress


def test_round_trip_restores_networks_optimizer_rng_and_progress(tmp_path, trained):
    model, networks, optimizer, progress = trained
    save_train_state(tmp_path / "state", networks, optimizer, progress, "train:\n  seed: 0\n")
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == sorted(FILES)
    expected_draw = torch.rand(4)  # the draw a continuing run would make next

    torch.manual_seed(123)
    fresh_networks, fresh_optimizer = make_training(model)
    torch.rand(10)  # move the RNG on
    loaded = load_train_state(tmp_path / "state", fresh_networks, fresh_optimizer)

    assert asdict(loaded) == asdict(progress)
    assert torch.equal(torch.rand(4), expected_draw)
    for (name, saved), restored in zip(networks.state_dict().items(), fresh_networks.state_dict().values()):
        assert torch.equal(saved, restored), name
    saved_opt, restored_opt = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert saved_opt["param_groups"] == restored_opt["param_groups"]
    assert saved_opt["state"].keys() == restored_opt["state"].keys()
    for index, values in saved_opt["state"].items():
        assert set(values) >= {"step", "exp_avg", "exp_avg_sq"}
        for key, value in values.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(restored_opt["state"][index][key])), (index, key)


def test_a_restored_run_continues_exactly_like_the_original(tmp_path, trained):
    model, networks, optimizer, progress = trained
    save_train_state(tmp_path / "state", networks, optimizer, progress, "")
    fresh_networks, fresh_optimizer = make_training(model)
    load_train_state(tmp_path / "state", fresh_networks, fresh_optimizer)
    rng = torch.get_rng_state()
    take_step(networks, optimizer)
    torch.set_rng_state(rng)
    take_step(fresh_networks, fresh_optimizer)
    for (name, a), b in zip(networks.state_dict().items(), fresh_networks.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("missing", ["networks.safetensors", "optimizer.safetensors", "state.yaml"])
def test_a_state_dir_missing_a_file_is_a_checkpoint_error(tmp_path, trained, missing):
    model, networks, optimizer, progress = trained
    save_train_state(tmp_path / "state", networks, optimizer, progress, "")
    (tmp_path / "state" / missing).unlink()
    fresh_networks, fresh_optimizer = make_training(model)
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        load_train_state(tmp_path / "state", fresh_networks, fresh_optimizer)


def test_no_state_dir_or_another_editor_is_a_checkpoint_error(tmp_path, trained):
    model, networks, optimizer, progress = trained
    with pytest.raises(CheckpointError, match="no training state"):
        load_train_state(tmp_path / "nowhere", networks, optimizer)
    save_train_state(tmp_path / "state", networks, optimizer, progress, "")
    other = MendNetworks(resolve_targets(model, None, 1), {"rank": 4, "n_blocks": 1})  # a changed config
    other_optimizer = torch.optim.Adam(other.parameters())
    with pytest.raises(CheckpointError, match="does not fit"):
        load_train_state(tmp_path / "state", other, other_optimizer)


def test_a_failed_write_leaves_the_previous_state_and_no_partial_dir(tmp_path, trained, monkeypatch):
    model, networks, optimizer, progress = trained
    state_dir = tmp_path / "state"

    def fail(*args, **kwargs):
        raise OSError("disk full")

    # the first write fails half-way (tensors written, YAML not): no state dir, no staging left behind
    monkeypatch.setattr(train_state, "save_yaml", fail)
    with pytest.raises(OSError, match="disk full"):
        save_train_state(state_dir, networks, optimizer, progress, "")
    assert list(tmp_path.iterdir()) == []

    # a good write, then a failing one: the good one is still there, complete and loadable
    monkeypatch.undo()
    save_train_state(state_dir, networks, optimizer, progress, "")
    later = copy.deepcopy(progress)
    later.step = 99
    monkeypatch.setattr(train_state, "save_yaml", fail)
    with pytest.raises(OSError, match="disk full"):
        save_train_state(state_dir, networks, optimizer, later, "")
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["state"]
    assert sorted(p.name for p in state_dir.iterdir()) == sorted(FILES)
    fresh_networks, fresh_optimizer = make_training(model)
    assert load_train_state(state_dir, fresh_networks, fresh_optimizer).step == 3
