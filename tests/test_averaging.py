"""Polyak averaging of the editor networks (`mend.averaging`, ``train.ema_decay``): the average follows its
formula, lending it to the networks gives the live weights back exactly, a run validates and saves the
averaged editor while training the live one, and a resumed run keeps the same average."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from mend.averaging import WeightAverage
from mend.config import ConfigError, load_config

from test_trainer import run


def test_the_average_follows_its_decay_with_a_short_start():
    layer = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(layer.weight)
    average = WeightAverage(layer, decay=0.5)
    expected = torch.zeros(1, 2)
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0], start=1):
        with torch.no_grad():
            layer.weight.fill_(value)
        average.update(layer)
        decay = min(0.5, (1 + n) / (10 + n))
        expected = decay * expected + (1 - decay) * value
    torch.testing.assert_close(average.averaged["weight"], expected)


def test_the_average_is_lent_to_the_networks_and_the_live_weights_come_back_exactly_even_on_error():
    layer = torch.nn.Linear(3, 2)
    average = WeightAverage(layer, decay=0.9)
    live = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(1.0)
    average.update(layer)
    moved = {n: p.detach().clone() for n, p in layer.named_parameters()}
    with pytest.raises(RuntimeError, match="inside"):
        with average.applied(layer):
            for name, p in layer.named_parameters():
                torch.testing.assert_close(p, average.averaged[name])
                assert not torch.equal(p, moved[name]) and not torch.equal(p, live[name])
            raise RuntimeError("inside")
    for name, p in layer.named_parameters():
        assert torch.equal(p, moved[name])


def test_a_saved_average_that_does_not_fit_is_refused_and_changes_nothing():
    average = WeightAverage(torch.nn.Linear(3, 2), decay=0.9)
    before = {k: v.clone() for k, v in average.averaged.items()}
    other = WeightAverage(torch.nn.Linear(4, 2), decay=0.9).state_dict()
    with pytest.raises(ValueError, match="weight has shape"):
        average.load_state_dict(other)
    with pytest.raises(ValueError, match="missing"):
        average.load_state_dict({"updates": torch.tensor(1)})
    assert all(torch.equal(average.averaged[k], before[k]) for k in before)


@pytest.mark.parametrize("decay", [0, 1, 1.5, -0.1])
def test_a_decay_outside_zero_to_one_is_a_config_error(decay):
    with pytest.raises(ConfigError, match="train.ema_decay must lie strictly between 0 and 1"):
        load_config([f"train.ema_decay={decay}"])


def test_a_run_with_an_average_saves_the_averaged_editor_and_trains_the_live_one(tmp_path):
    result = run(tmp_path / "r", "train.max_steps=6", "train.val_every=6", "train.ema_decay=0.5")
    averaged = load_file(str(tmp_path / "r" / "state" / "average.safetensors"))
    live = load_file(str(tmp_path / "r" / "state" / "networks.safetensors"))
    best = load_file(str(tmp_path / "r" / "best" / "editor.safetensors"))  # the one validation is the best
    assert int(averaged["updates"]) == 6
    for name, _ in result.networks.named_parameters():
        torch.testing.assert_close(best[name], averaged[f"averaged.{name}"], rtol=0, atol=0, msg=name)
        assert not torch.equal(best[name], live[name]), name  # the average is not the last step's weights
    buffers = [name for name in result.networks.state_dict() if name not in dict(result.networks.named_parameters())]
    assert buffers and all(torch.equal(best[name], live[name]) for name in buffers)  # statistics stay live
    for name, p in result.networks.named_parameters():  # the run ends holding its live weights
        assert torch.equal(p.detach(), live[name]), name


def test_a_resumed_run_keeps_the_same_average(tmp_path):
    common = ["train.val_every=3", "train.ema_decay=0.6"]
    run(tmp_path / "a", *common, "train.max_steps=6")
    run(tmp_path / "b", *common, "train.max_steps=3")
    run(tmp_path / "b", *common, "train.max_steps=6", resume=True)
    a = load_file(str(tmp_path / "a" / "state" / "average.safetensors"))
    b = load_file(str(tmp_path / "b" / "state" / "average.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)


def test_a_state_without_an_average_cannot_resume_a_run_that_keeps_one(tmp_path):
    from mend.checkpoint import CheckpointError

    run(tmp_path / "r", "train.max_steps=3", "train.val_every=3", "train.ema_decay=0.6")
    (tmp_path / "r" / "state" / "average.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no average.safetensors"):
        run(tmp_path / "r", "train.max_steps=6", "train.val_every=3", "train.ema_decay=0.6", resume=True)


def test_a_new_stage_restarts_the_average_from_its_own_steps(tmp_path):
    run(tmp_path / "r", "train.max_steps=6", "train.val_every=3", "train.ema_decay=0.9",
        "train.stages=[{at: 4, n_edits: 2}]")
    averaged = load_file(str(tmp_path / "r" / "state" / "average.safetensors"))
    assert int(averaged["updates"]) == 2  # steps 4 and 5, the last stage's


def test_a_staged_run_saved_before_lr_scale_existed_still_resumes(tmp_path):
    import yaml

    common = ["train.val_every=3", "train.stages=[{at: 2, n_edits: 2}]"]
    run(tmp_path / "r", *common, "train.max_steps=3")
    saved_file = tmp_path / "r" / "state" / "config.yaml"
    saved = yaml.safe_load(saved_file.read_text())
    for stage in saved["train"]["stages"]:
        del stage["lr_scale"]  # as written before the setting was added
    saved_file.write_text(yaml.safe_dump(saved))
    assert run(tmp_path / "r", *common, "train.max_steps=6", resume=True).progress.step == 6
