"""The learning-rate schedule and the facts per edit over a run. A staged run (`train.stages`): each stage
edits its own number of facts together, restarts the learning-rate schedule, and validation edits at the
last stage's size; without stages nothing changes. A schedule in minutes (`train.schedule_minutes`): the
cosine follows the run's training time, which a resumed run carries on from."""

from __future__ import annotations

import math

import pytest
import torch

import mend.trainer as trainer
from mend import stages
from mend.config import ConfigError, load_config
from mend.meta_batch import EditSampler
from mend.stages import StagedSampler
from mend.training_log import read_jsonl
from test_trainer import config, initial_networks, run
from tiny_models import tiny_model, tiny_records

STAGED = ["train.batch_size=1", "train.n_edits=2", "train.max_steps=8", "train.warmup_steps=2",
          "train.lr_decay=cosine", "train.stages=[{at: 5, n_edits: 4, warmup_steps: 1}]"]


def test_without_stages_a_run_is_one_segment_with_the_old_schedule(tmp_path):
    cfg = config(tmp_path, "train.max_steps=10", "train.warmup_steps=2", "train.lr_decay=cosine")
    assert stages.segments(cfg.train) == [stages.Segment(0, 10, 1, 2)]
    assert [trainer.learning_rate_factor(s, cfg) for s in range(2)] == [0.5, 1.0]
    assert trainer.learning_rate_factor(6, cfg) == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))


def test_each_stage_has_its_size_and_restarts_the_schedule(tmp_path):
    cfg = config(tmp_path, *STAGED)
    assert stages.segments(cfg.train) == [stages.Segment(0, 5, 2, 2), stages.Segment(5, 8, 4, 1)]
    assert [stages.segment_at(s, cfg.train).n_edits for s in range(8)] == [2] * 5 + [4] * 3
    assert stages.final_n_edits(cfg.train) == 4
    factors = [trainer.learning_rate_factor(s, cfg) for s in range(8)]
    assert factors[:2] == [0.5, 1.0] and factors[4] == pytest.approx(0.25)  # warm-up, then the first cosine
    assert factors[5:] == pytest.approx([1.0, 1.0, 0.5])  # the stage's own warm-up and cosine


def test_a_stage_s_lr_scale_scales_the_networks_rate_and_not_the_step_sizes(tmp_path):
    cfg = config(tmp_path, "train.batch_size=1", "train.n_edits=2", "train.max_steps=8", "train.warmup_steps=2",
                 "train.lr=1e-3", "train.lr_lr=1e-2", "train.stages=[{at: 5, n_edits: 4, lr_scale: 0.1}]")
    optimizer = torch.optim.Adam([{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.0},
                                  {"params": [torch.zeros(1, requires_grad=True)], "lr": 0.0}])
    trainer.set_learning_rates(optimizer, cfg, 3)  # first stage: both at their base rates
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-3, 1e-2])
    trainer.set_learning_rates(optimizer, cfg, 6)  # second stage: the networks' rate a tenth
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([1e-4, 1e-2])


def test_the_staged_sampler_draws_each_stage_s_size_and_equals_the_plain_sampler_without_stages(tmp_path):
    records = tiny_records()
    cfg = config(tmp_path, *STAGED)
    sampler = StagedSampler(records, cfg.train)
    assert [len(sampler.records_for_step(s)) for s in range(8)] == [2] * 5 + [4] * 3
    plain_cfg = config(tmp_path, "train.batch_size=1", "train.n_edits=2")
    plain, staged = EditSampler(records, 2, seed=plain_cfg.train.seed), StagedSampler(records, plain_cfg.train)
    for step in range(6):
        assert staged.records_for_step(step) == plain.records_for_step(step)
        chosen = plain.records_for_step(step)
        assert staged.choose(step, chosen, 2) == plain.choose(step, chosen, 2)


@pytest.mark.parametrize("stage, message", [
    ("{at: 0, n_edits: 4}", "train.stages[0].at must lie strictly between 0"),
    ("{at: 9, n_edits: 4}", "train.max_steps=8"),
    ("{at: 3, n_edits: 0}", "train.stages[0].n_edits must be >= 1"),
    ("{at: 3, n_edits: 2, warmup_steps: -1}", "train.stages[0].warmup_steps must be >= 0"),
    ("{at: 3, n_edits: 2, lr_scale: 0}", "train.stages[0].lr_scale must be a finite number > 0"),
])
def test_a_bad_stage_is_refused_by_name(stage, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(["train.max_steps=8", f"train.stages=[{stage}]"])


def test_stages_must_come_in_step_order():
    with pytest.raises(ConfigError, match=r"train.stages\[1\].at must lie strictly between 5"):
        load_config(["train.max_steps=8", "train.stages=[{at: 5, n_edits: 2}, {at: 4, n_edits: 3}]"])


def test_a_staged_run_trains_each_stage_at_its_size_and_validates_at_the_last(tmp_path, monkeypatch):
    sizes = {"train": [], "val": []}
    score = trainer.score_edits

    def recording(*args, **kwargs):
        n_edits = args[-1]
        sizes["val" if not args[1].training else "train"].append((len(args[3]), n_edits))
        return score(*args, **kwargs)

    monkeypatch.setattr(trainer, "score_edits", recording)
    result = run(tmp_path, *STAGED, "train.val_every=4", "train.val_records=4")
    assert result.progress.step == 8
    assert sizes["train"] == [(2, 2)] * 5 + [(4, 4)] * 3  # records and facts per edit of every step
    assert sizes["val"] and set(sizes["val"]) == {(4, 4)}  # 4 validation records in one edit of 4
    val_steps = [line["step"] for line in read_jsonl(tmp_path / "log.jsonl") if line["split"] == "val"]
    assert val_steps == [4, 8]


# ---------------------------------------------------------------- a schedule in minutes
TIMED = ["train.lr_decay=cosine", "train.schedule_minutes=10", "train.warmup_steps=2", "train.max_steps=1000"]


def test_a_schedule_in_minutes_warms_up_in_steps_then_follows_the_clock(tmp_path):
    cfg = config(tmp_path, *TIMED)
    assert [trainer.learning_rate_factor(s, cfg, minutes=9.0) for s in range(2)] == [0.5, 1.0]
    assert trainer.learning_rate_factor(500, cfg, minutes=0.0) == 1.0  # the step count no longer decays it
    assert trainer.learning_rate_factor(2, cfg, minutes=5.0) == pytest.approx(0.5)
    assert trainer.learning_rate_factor(3, cfg, minutes=10.0) == pytest.approx(0.0)
    assert trainer.learning_rate_factor(3, cfg, minutes=60.0) == pytest.approx(0.0)


@pytest.mark.parametrize("overrides, message", [
    (["train.schedule_minutes=0", "train.lr_decay=cosine"], "train.schedule_minutes must be > 0"),
    (["train.schedule_minutes=5"], "it needs train.lr_decay=cosine"),
    (["train.schedule_minutes=5", "train.lr_decay=cosine", "train.max_steps=8", "train.stages=[{at: 4, n_edits: 2}]"],
     "cannot be combined"),
])
def test_a_bad_schedule_in_minutes_is_refused_by_name(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides)


def test_a_run_past_its_schedule_minutes_trains_at_rate_zero_and_records_its_time(tmp_path):
    from mend.train_state import load_train_state

    result = run(tmp_path, "train.lr_decay=cosine", "train.schedule_minutes=1e-9", "train.max_steps=3",
                 "train.val_every=3")
    rates = [line["lr"] for line in read_jsonl(tmp_path / "log.jsonl") if line["split"] == "train"]
    assert rates and set(rates) == {0.0}  # every step came after the (tiny) budget: the cosine is spent
    assert result.progress.trained_s > 0
    cfg = config(tmp_path)
    networks = initial_networks(tiny_model("llama")[0], cfg)
    saved = load_train_state(tmp_path / "state", networks, trainer.make_optimizer(networks, cfg))
    assert saved.trained_s == pytest.approx(result.progress.trained_s)  # a resumed run's clock goes on from it


# ---------------------------------------------------------------- a budget for the whole command
def test_the_cosine_clock_stretches_training_time_over_what_the_setup_left():
    assert trainer.schedule_clock(120.0, 0.0, 10) == pytest.approx(2.0)  # no setup counted: plain minutes
    # 5 of 10 minutes went to the setup: 2.5 minutes of training is half the cosine, 5 minutes all of it
    assert trainer.schedule_clock(150.0, 300.0, 10) == pytest.approx(5.0)
    assert trainer.schedule_clock(300.0, 300.0, 10) == pytest.approx(10.0)
    assert trainer.schedule_clock(1.0, 600.0, 10) == math.inf  # nothing left: the cosine is spent


def test_a_budget_the_setup_used_up_is_refused_before_any_step(tmp_path):
    with pytest.raises(RuntimeError, match="budget_includes_setup.*train.max_minutes"):
        run(tmp_path, "train.budget_includes_setup=true", "train.max_minutes=1e-9", "train.max_steps=3")
    assert not (tmp_path / "state").exists()  # nothing was trained, nothing written as if it had been


def test_a_budget_with_the_setup_records_the_setup_and_a_resumed_run_keeps_the_first_runs(tmp_path):
    from mend.train_state import load_train_state

    budget = ["train.budget_includes_setup=true", "train.lr_decay=cosine", "train.schedule_minutes=60",
              "train.max_minutes=60", "train.val_every=3"]
    first = run(tmp_path, *budget, "train.max_steps=3")
    assert first.progress.setup_s > 0
    cfg = config(tmp_path)
    networks = initial_networks(tiny_model("llama")[0], cfg)
    saved = load_train_state(tmp_path / "state", networks, trainer.make_optimizer(networks, cfg))
    assert saved.setup_s == pytest.approx(first.progress.setup_s)
    resumed = run(tmp_path, *budget, "train.max_steps=6", resume=True)
    assert resumed.progress.step == 6
    assert resumed.progress.setup_s == pytest.approx(first.progress.setup_s)  # the cosine's span is the first run's


def test_without_the_setup_in_the_budget_no_setup_is_recorded(tmp_path):
    assert run(tmp_path, "train.max_steps=2", "train.val_every=2").progress.setup_s == 0.0
