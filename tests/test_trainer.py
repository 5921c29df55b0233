"""Meta-training on a tiny Llama: the editor learns, the base model is never touched, the run writes
its outputs, bad steps are skipped, a resumed run equals an uninterrupted one, and data-parallel
processes end with identical editors."""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

import mend.trainer as trainer
from mend import Editor
from mend.config import load_config
from mend.networks import MendNetworks
from mend.objective import StepOutput
from mend.targets import resolve_targets
from mend.train_state import load_train_state
from mend.training_log import read_jsonl
from tiny_models import tiny_model, tiny_records

TESTS = Path(__file__).resolve().parent

# A tiny editor that learns quickly: the step size starts large enough for edits to move the loss.
BASE = [
    "model.device=cpu", "train.progress=false", "model.edit_last_n_blocks=2", "editor.rank=8", "editor.init_lr=1.0",
    "train.batch_size=2", "train.n_edits=1", "train.lr=1e-3", "train.lr_lr=1e-2", "train.val_records=4",
    "train.patience=0",
]


def config(out_dir, *overrides):
    return load_config([*BASE, f"train.out_dir={out_dir}", f"train.prefix_cache_dir={Path(out_dir).parent / 'prefix'}",
                        *overrides])


def run(out_dir, *overrides, resume=False, model=None, tokenizer=None):
    if model is None:
        model, tokenizer = tiny_model("llama")
    records = tiny_records()
    return trainer.train(config(out_dir, *overrides), resume=resume, model=model, tokenizer=tokenizer,
                         records=(records, records[:4]))


def initial_networks(model, cfg) -> MendNetworks:
    """The editor a run starts from (the trainer seeds with train.seed, then builds the networks)."""
    torch.manual_seed(cfg.train.seed)
    return MendNetworks(resolve_targets(model, cfg.model.edit_params, cfg.model.edit_last_n_blocks), cfg.editor)


def parameters(networks) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in networks.named_parameters()}


def trainer_optimizer(networks) -> torch.optim.Adam:
    """An optimiser with the trainer's parameter groups (networks, then step sizes), to load state into."""
    return torch.optim.Adam([{"params": [p for n, p in networks.named_parameters()
                                         if n not in ("log_lrs", "log_ridges")]},
                             {"params": [networks.log_lrs, networks.log_ridges]}])


def steps(log, split) -> list[int]:
    return [line["step"] for line in log if line["split"] == split]


# ---------------------------------------------------------------- one 60-step run, several claims
@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """A 60-step run on the 8 tiny facts: (result, model, tokenizer, base-model snapshot, out_dir)."""
    out_dir = tmp_path_factory.mktemp("learned")
    model, tokenizer = tiny_model("llama")
    before = {name: t.clone() for name, t in model.state_dict().items()}
    result = run(out_dir, "train.max_steps=60", "train.log_every=20", "train.val_every=30",
                 model=model, tokenizer=tokenizer)
    return result, model, tokenizer, before, out_dir


def test_training_changes_the_editor_and_lowers_the_loss(learned):
    result, model, _, _, out_dir = learned
    start = parameters(initial_networks(model, config(out_dir)))
    trained = parameters(result.networks)
    changed = [name for name in start if not torch.equal(start[name], trained[name])]
    assert "log_lrs" in changed and any(".blocks." in name for name in changed)
    assert all(torch.isfinite(p).all() for p in trained.values())

    losses = [line["loss"] for line in read_jsonl(out_dir / "log.jsonl") if line["split"] == "train"]
    assert len(losses) == 3  # steps 20, 40, 60
    assert losses[-1] < losses[0] - 0.05, losses
    assert losses == sorted(losses, reverse=True), losses
    assert result.progress.step == 60 and result.progress.skipped_steps == 0
    assert result.examples_per_second > 0


def test_training_never_touches_the_base_model(learned):
    _, model, _, before, _ = learned
    after = model.state_dict()
    changed = [name for name, tensor in before.items() if not torch.equal(after[name], tensor)]
    assert not changed, f"base model tensors changed: {changed}"
    assert all(p.grad is None for p in model.parameters())
    assert not any(p.requires_grad for p in model.parameters())


def test_a_run_writes_config_log_best_state_and_curves(learned):
    result, model, tokenizer, _, out_dir = learned
    assert result.run_dir == out_dir and result.best_dir == out_dir / "best"

    saved = OmegaConf.load(out_dir / "config.yaml")
    assert saved.train.max_steps == 60 and saved.editor.rank == 8 and saved.train.out_dir == str(out_dir)

    log = read_jsonl(out_dir / "log.jsonl")
    assert steps(log, "train") == [20, 40, 60]
    assert steps(log, "val") == [30, 60]
    for line in log:
        assert set(trainer.METRICS) <= set(line)
        assert all(math.isfinite(line[key]) for key in trainer.METRICS)
    assert {"skipped", "lr_mean"} <= set(log[0])
    assert "score" in next(line for line in log if line["split"] == "val")

    editor = Editor.load(out_dir / "best", model, tokenizer)
    assert [t.name for t in editor.targets] == [t.name for t in result.networks.targets]
    edit = editor.edit("Paris is the capital of", "Rome")
    assert edit.changed and all(math.isfinite(norm) for norm in edit.update_norms.values())
    editor.revert()

    cfg = config(out_dir, "train.max_steps=60")
    fresh = initial_networks(model, cfg)
    progress = load_train_state(out_dir / "state", fresh, trainer_optimizer(fresh))
    assert progress.step == 60 and [h["step"] for h in progress.history] == [30, 60]
    for name, tensor in result.networks.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name

    png = out_dir / "training_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------- non-finite gradients
def poison(monkeypatch, which) -> None:
    """Make the training objective's loss NaN on the training calls whose index is in ``which``."""
    calls = []

    def objective(*args, **kwargs):
        out = trainer_objective(*args, **kwargs)
        if not torch.is_grad_enabled():  # validation
            return out
        calls.append(None)
        if len(calls) - 1 in which:
            return StepOutput(out.loss * float("nan"), out.metrics)
        return out

    trainer_objective = trainer.meta_objective
    monkeypatch.setattr(trainer, "meta_objective", objective)


def test_a_step_with_non_finite_gradients_is_skipped_and_counted(tmp_path, monkeypatch):
    poison(monkeypatch, {1})
    result = run(tmp_path, "train.max_steps=3", "train.log_every=3", "train.val_every=3")
    assert result.progress.step == 3 and result.progress.skipped_steps == 1
    assert [line["skipped"] for line in read_jsonl(tmp_path / "log.jsonl") if line["split"] == "train"] == [1]
    assert all(torch.isfinite(t).all() for t in result.networks.state_dict().values())


def test_skipped_steps_do_not_move_the_editor(tmp_path, monkeypatch):
    poison(monkeypatch, {0, 1})
    model, tokenizer = tiny_model("llama")
    result = run(tmp_path, "train.max_steps=2", "train.val_every=2", model=model, tokenizer=tokenizer)
    assert result.progress.skipped_steps == 2
    start = parameters(initial_networks(model, config(tmp_path)))
    for name, tensor in parameters(result.networks).items():
        assert torch.equal(tensor, start[name]), name


# ---------------------------------------------------------------- resume
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    common = ["train.log_every=2", "train.val_every=4"]
    model, tokenizer = tiny_model("llama")
    uninterrupted = run(tmp_path / "a", *common, "train.max_steps=8", model=model, tokenizer=tokenizer)

    first = run(tmp_path / "b", *common, "train.max_steps=4", model=model, tokenizer=tokenizer)
    assert first.progress.step == 4
    resumed = run(tmp_path / "b", *common, "train.max_steps=8", resume=True, model=model, tokenizer=tokenizer)
    assert resumed.progress.step == 8

    a = load_file(str(tmp_path / "a" / "state" / "networks.safetensors"))
    b = load_file(str(tmp_path / "b" / "state" / "networks.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)

    log_a, log_b = read_jsonl(tmp_path / "a" / "log.jsonl"), read_jsonl(tmp_path / "b" / "log.jsonl")
    assert steps(log_b, "train") == steps(log_a, "train") == [2, 4, 6, 8]  # no step logged twice
    assert steps(log_b, "val") == steps(log_a, "val") == [4, 8]
    for line_a, line_b in zip(log_a, log_b):
        assert line_a["split"] == line_b["split"] and line_a["step"] == line_b["step"]
        assert line_b["loss"] == pytest.approx(line_a["loss"], abs=1e-6)
    assert len(resumed.progress.history) == len(uninterrupted.progress.history) == 2
    for mine, theirs in zip(resumed.progress.history, uninterrupted.progress.history):
        assert mine == pytest.approx(theirs, abs=1e-6)


# ---------------------------------------------------------------- the prefix cache
def test_a_run_from_the_prefix_cache_ends_where_a_full_forward_run_does(tmp_path, capsys):
    common = ["train.log_every=2", "train.val_every=4", "train.max_steps=8"]
    model, tokenizer = tiny_model("llama")
    cached = run(tmp_path / "cached", *common, model=model, tokenizer=tokenizer)
    printed = capsys.readouterr().out
    assert "prefix cache: 24 rows" in printed and "built in" in printed and "block 2 and above" in printed
    full = run(tmp_path / "full", *common, "train.prefix_cache=none", model=model, tokenizer=tokenizer)
    assert "prefix cache" not in capsys.readouterr().out
    a = load_file(str(tmp_path / "cached" / "state" / "networks.safetensors"))
    b = load_file(str(tmp_path / "full" / "state" / "networks.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    for mine, theirs in zip(cached.progress.history, full.progress.history):
        assert mine == pytest.approx(theirs, abs=1e-4)
    # a second run reuses the cache file instead of building it again
    run(tmp_path / "again", *common, model=model, tokenizer=tokenizer)
    assert "reused" in capsys.readouterr().out


def test_edits_with_nothing_below_them_fall_back_to_the_full_forward_and_say_so_once(tmp_path, capsys):
    run(tmp_path, "train.max_steps=2", "train.val_every=2", "model.edit_last_n_blocks=4")
    printed = capsys.readouterr().out
    assert printed.count("prefix cache: not used") == 1


# ---------------------------------------------------------------- early stopping
def test_early_stopping_ends_the_run_when_validation_stops_improving(tmp_path):
    # lr 0: the editor never changes, so no validation beats the first one
    result = run(tmp_path, "train.lr=0", "train.lr_lr=0", "train.patience=1", "train.val_every=2",
                 "train.max_steps=50", "train.log_every=2")
    assert result.progress.stopped_early
    assert result.progress.step == 4 and result.progress.best_step == 2
    assert steps(read_jsonl(tmp_path / "log.jsonl"), "val") == [2, 4]
    fresh = MendNetworks(result.networks.targets, result.networks.config)
    assert load_train_state(tmp_path / "state", fresh, trainer_optimizer(fresh)).stopped_early


@pytest.mark.parametrize("keep, kept_step", [("best", 2), ("last", 6)])
def test_best_holds_the_top_scoring_or_the_latest_validation_as_train_keep_says(tmp_path, monkeypatch, keep, kept_step):
    scores = iter([0.9, 0.5, 0.1])  # every validation scores lower than the one before
    monkeypatch.setattr(trainer, "validation_score", lambda metrics: next(scores))
    result = run(tmp_path, f"train.keep={keep}", "train.val_every=2", "train.max_steps=6", "train.log_every=2")
    assert result.progress.best_step == 2 and result.progress.kept_step(keep) == kept_step
    kept = load_file(str(tmp_path / "best" / "editor.safetensors"))
    last = load_file(str(tmp_path / "state" / "networks.safetensors"))  # the weights at step 6
    same = all(torch.equal(kept[name], last[name]) for name in last)
    assert same == (keep == "last")


def test_the_edit_margin_is_saved_with_the_editor_and_leaves_training_exactly_as_it_was(tmp_path):
    plain = run(tmp_path / "plain", "train.max_steps=3", "train.val_every=3")
    margin = run(tmp_path / "margin", "train.max_steps=3", "train.val_every=3", "editor.edit_margin=8")
    trained = [load_file(str(r.best_dir / "editor.safetensors")) for r in (plain, margin)]
    assert trained[0].keys() == trained[1].keys()
    assert all(torch.equal(trained[0][name], trained[1][name]) for name in trained[0])
    model, tokenizer = tiny_model("llama")
    assert Editor.load(margin.best_dir, model, tokenizer).networks.config.edit_margin == 8.0
    assert Editor.load(plain.best_dir, model, tokenizer).networks.config.edit_margin is None


# ---------------------------------------------------------------- the quality levers
@pytest.mark.parametrize("solve_keys", ["all", "predictions"])
def test_a_run_with_preserved_knowledge_saves_it_and_edits_through_the_same_solve(tmp_path, capsys, solve_keys):
    from mend.aggregate import grouped_updates
    from mend.batching import encode_pairs
    from mend.capture import capture_rank1

    model, tokenizer = tiny_model("llama")
    common = ["train.max_steps=4", "train.val_every=2", "train.preserve_records=6", "editor.preserve_weight=50",
              f"editor.solve_keys={solve_keys}"]
    result = run(tmp_path / "a", *common, model=model, tokenizer=tokenizer)
    assert "preserved knowledge: computed from 6 texts" in capsys.readouterr().out
    editor = Editor.load(result.best_dir, model, tokenizer)
    assert sorted(editor.preserved) == sorted(t.name for t in editor.targets)
    run(tmp_path / "b", *common, model=model, tokenizer=tokenizer)  # a second run reads the cached moments
    assert "preserved knowledge: read" in capsys.readouterr().out

    # the meta-training solve (n-space, eigenbasis) and the edit-time solve (d-space) give one update
    _, bases = trainer.open_preserved(model, tokenizer, editor.targets, tiny_records(), config(tmp_path / "a", *common), "cpu")
    batch = encode_pairs(tokenizer, ["Bees make"], ["glue"])
    networks = editor.networks.eval()  # frozen statistics, as at edit time
    capture = capture_rank1(model, networks.targets, batch, row_groups=torch.arange(1))
    trained = grouped_updates(networks, capture, torch.zeros(1, dtype=torch.long), 1, moments=bases)
    at_edit, _, _ = editor.compute_updates([("Bees make", "glue")])
    for name, (keys, deltas, lr) in trained.items():
        torch.testing.assert_close(-lr * deltas[0].t() @ keys[0], at_edit[name], rtol=1e-3, atol=1e-6, msg=name)


@pytest.mark.parametrize("in_training, at_edit", [(2.0, 0.0), (0.0, 3.0), (1.0, 2.0)])
def test_answer_moments_enter_the_training_solve_and_the_saved_editor_as_configured(tmp_path, capsys, in_training,
                                                                                    at_edit):
    from mend.memory import answer_key_moments, key_moments
    from mend.preserved import locality_pairs, locality_texts

    model, tokenizer = tiny_model("llama")
    common = ["train.max_steps=2", "train.val_every=2", "train.preserve_records=6", "editor.preserve_weight=50",
              f"train.preserve_answer_weight={in_training}", f"train.edit_answer_weight={at_edit}"]
    result = run(tmp_path / "a", *common, model=model, tokenizer=tokenizer)
    assert "preserved knowledge: computed from the answers of 6 probes" in capsys.readouterr().out
    cfg = config(tmp_path / "a", *common)
    records = tiny_records()  # the run's training records (`run`)
    plain = key_moments(model, result.networks.targets, tokenizer, locality_texts(records, 6),
                        max_length=cfg.model.max_length)
    answers = answer_key_moments(model, result.networks.targets, tokenizer, locality_pairs(records, 6),
                                 max_length=cfg.model.max_length)
    editor = Editor.load(result.best_dir, model, tokenizer)
    _, bases = trainer.open_preserved(model, tokenizer, editor.targets, records, cfg, "cpu")
    for name, moment in editor.preserved.items():  # saved for edit time: both weights
        torch.testing.assert_close(moment, plain[name] + (in_training + at_edit) * answers[name], rtol=1e-4, atol=1e-6)
        basis = bases[name]  # meta-training and validation solve: the training weight only
        solved = (basis.basis.double() * basis.eigenvalues) @ basis.basis.double().t()
        torch.testing.assert_close(solved, 50.0 * (plain[name] + in_training * answers[name]).double(),
                                   rtol=1e-3, atol=1e-4)
    run(tmp_path / "b", *common, model=model, tokenizer=tokenizer)  # a second run reads both cached moments
    out = capsys.readouterr().out
    assert "preserved knowledge: read preserved-answers-" in out and "(6 texts)" in out


def test_learning_rates_warm_up_then_follow_a_cosine_to_zero(tmp_path):
    cfg = config(tmp_path, "train.max_steps=10", "train.warmup_steps=2", "train.lr_decay=cosine")
    factors = [trainer.learning_rate_factor(step, cfg) for step in range(10)]
    assert factors[:2] == [0.5, 1.0]
    assert factors[2] == 1.0 and factors[2:] == sorted(factors[2:], reverse=True) and factors[-1] < 0.05
    flat = config(tmp_path, "train.max_steps=10")
    assert {trainer.learning_rate_factor(step, flat) for step in range(10)} == {1.0}


def test_a_run_stops_and_validates_once_its_minutes_are_spent(tmp_path, capsys):
    result = run(tmp_path, "train.max_steps=50", "train.val_every=20", "train.max_minutes=1e-6")
    assert result.progress.step == 1 and result.progress.best_step == 1
    assert steps(read_jsonl(tmp_path / "log.jsonl"), "val") == [1]
    assert "train.max_minutes=1e-06 reached at step 1" in capsys.readouterr().out


def test_several_locality_probes_and_an_update_penalty_train(tmp_path):
    result = run(tmp_path, "train.max_steps=4", "train.val_every=4", "train.log_every=2", "train.loc_probes=3",
                 "train.c_norm=10")
    log = [line for line in read_jsonl(tmp_path / "log.jsonl") if line["split"] == "train"]
    assert all(line["update_size"] > 0 and math.isfinite(line["loss"]) for line in log)
    assert result.progress.skipped_steps == 0


def _objective_pair(weight: float):
    """The objective of one batch of tiny edits, on answer-only and whole-sequence locality rows."""
    from mend.meta_batch import build_meta_batch
    from mend.objective import meta_objective

    model, tokenizer = tiny_model("llama")
    torch.manual_seed(0)
    networks = MendNetworks(resolve_targets(model, None, 2), {"rank": 8, "init_lr": 1.0})
    records = tiny_records(4)
    args = (tokenizer, records, [r.equivalents[0] for r in records], [r.locality[0] for r in records])
    outputs = []
    for whole in (False, True):
        batch = build_meta_batch(*args, max_length=64, whole_locality=whole)
        with torch.no_grad():
            outputs.append(meta_objective(model, networks, batch, c_edit=1.0, c_loc=1.0, loc_prompt_weight=weight))
    return outputs


def test_the_locality_kl_over_every_probe_position_adds_the_prompt_with_its_weight():
    answers, whole_at_0 = _objective_pair(0.0)
    _, whole_at_1 = _objective_pair(1.0)
    _, whole_at_3 = _objective_pair(3.0)
    # weight 0: exactly the answer-only objective, and the locality metric is the answers' in every case
    torch.testing.assert_close(whole_at_0.loss, answers.loss)
    for out in (whole_at_0, whole_at_1, whole_at_3):
        assert torch.equal(out.metrics["loc_agree"], answers.metrics["loc_agree"])
    prompt_kl = whole_at_1.metrics["loc_loss"] - answers.metrics["loc_loss"]
    assert prompt_kl > 0  # the edit moves the probes' prompt positions too
    torch.testing.assert_close(whole_at_3.metrics["loc_loss"] - answers.metrics["loc_loss"], 3 * prompt_kl)


def test_a_run_with_the_locality_kl_over_every_probe_position_trains(tmp_path):
    result = run(tmp_path, "train.max_steps=4", "train.val_every=4", "train.log_every=2", "train.loc_prompt_weight=1")
    log = read_jsonl(tmp_path / "log.jsonl")
    assert all(math.isfinite(line["loss"]) and line["loc_loss"] > 0 for line in log if line["split"] == "train")
    assert steps(log, "val") == [4] and result.progress.skipped_steps == 0


def test_the_update_penalty_is_the_relative_frobenius_norm_of_each_edit():
    from mend.objective import update_sizes

    model, _ = tiny_model("llama")
    targets = resolve_targets(model, None, 2)
    edits = {t.name: (torch.randn(3, 4, t.d_in), torch.randn(3, 4, t.d_out), torch.tensor(0.7)) for t in targets}
    expected = sum(torch.stack([(0.7 * d.t() @ k).pow(2).sum() for k, d in zip(keys, deltas)])
                   / model.get_parameter(name).pow(2).sum() for name, (keys, deltas, _) in edits.items())
    torch.testing.assert_close(update_sizes(model, edits), expected)


# ---------------------------------------------------------------- two processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with the gloo backend")
def test_two_processes_end_with_identical_editors(tmp_path):
    # accelerate launch --cpu runs multi-CPU jobs through mpirun; torchrun starts the two processes
    # directly, and Accelerator() picks them up (MULTI_CPU, gloo).
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
               "--master_addr", "127.0.0.1", "--master_port", str(port), str(TESTS / "dist_train_script.py"),
               str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    rank0 = load_file(str(tmp_path / "rank0.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1.safetensors"))
    initial = load_file(str(tmp_path / "initial.safetensors"))
    assert rank0.keys() == rank1.keys() == initial.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between the processes"
    moved = [name for name in rank0 if not torch.equal(rank0[name], initial[name])]
    assert "log_lrs" in moved and any(name.endswith("up.weight") for name in moved)

    log = read_jsonl(tmp_path / "run" / "log.jsonl")  # only the main process logs: each step once
    assert steps(log, "train") == [1, 2, 3, 4] and steps(log, "val") == [2, 4]
