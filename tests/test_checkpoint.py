"""Saving and loading editors: safetensors + YAML, exact round trips, refusal of other base models."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file, save_file

import mend.checkpoint
import mend.editor
from mend import CheckpointError, Editor
from mend.checkpoint import atomic_write_file, load_tensors, load_yaml
from tiny_models import CharTokenizer, tiny_model

PAIRS = [("The Eiffel Tower is in", "Rome"), ("Water boils at", "42 degrees")]


def trained_editor(family="gpt2", seed=0, **editor_config):
    """An editor on a tiny model whose networks are not the identity: perturbed weights, step sizes
    and running statistics, as after some training."""
    model, tokenizer = tiny_model(family, seed=seed)
    config = {"editor": {"rank": 4, **editor_config}, "model": {"max_length": 96}}
    editor = Editor.untrained(model, tokenizer, config)
    networks = editor.networks
    with torch.no_grad():
        for network in networks.networks.values():
            for block in network.blocks:
                block.up.weight.normal_(0, 0.1)
                block.scale.uniform_(0.5, 1.5)
        networks.log_lrs.uniform_(-6, -3)
    networks.train()
    for _ in range(2):
        networks({t.name: (torch.randn(5, t.d_in), torch.randn(5, t.d_out) * 1e-3) for t in editor.targets})
    networks.eval()
    return editor


def gpt2(n_embd=32, n_layer=4, seed=0):
    """A GPT-2 like tiny_model('gpt2') but of another size."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=4, n_positions=128, vocab_size=260,
                                     pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return transformers.GPT2LMHeadModel(config).requires_grad_(False).eval(), CharTokenizer()


def assert_same_updates(a: Editor, b: Editor):
    updates_a, factors_a, loss_a = a.compute_updates(PAIRS)
    updates_b, factors_b, loss_b = b.compute_updates(PAIRS)
    assert loss_a == loss_b
    assert updates_a.keys() == updates_b.keys()
    for name in updates_a:
        assert torch.equal(updates_a[name], updates_b[name]), name


@pytest.fixture
def saved(tmp_path):
    """(editor, directory) of a saved non-trivial gpt2 editor."""
    editor = trained_editor("gpt2")
    return editor, editor.save(tmp_path / "editor")


# ---------------------------------------------------------------- the format
def test_save_writes_safetensors_and_yaml_only(saved):
    editor, path = saved
    assert sorted(p.name for p in path.iterdir()) == ["editor.safetensors", "editor.yaml"]
    assert not any(p.name.startswith(".") for p in path.parent.iterdir())  # no staging leftovers
    tensors = load_file(str(path / "editor.safetensors"))
    state = editor.networks.state_dict()
    assert tensors.keys() == state.keys()  # running statistics included
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    text = (path / "editor.yaml").read_text()
    assert "!!python" not in text
    meta = yaml.safe_load(text)
    assert meta["format_version"] == mend.editor.FORMAT_VERSION
    assert meta["editor"]["rank"] == 4 and meta["editor"]["transform"] == "both"
    assert meta["model"]["max_length"] == 96
    assert [t["name"] for t in meta["targets"]] == [t.name for t in editor.targets]


# ---------------------------------------------------------------- exact round trip
@pytest.mark.parametrize(
    "family, config",
    [("gpt2", {}), ("llama", {}), ("gpt2", {"transform": "u_only", "share": False}), ("llama", {"normalize": False, "n_blocks": 1}),
     ("llama", {"modulation": "output"})],
)
def test_a_loaded_editor_reproduces_identical_updates(tmp_path, family, config):
    editor = trained_editor(family, **config)
    editor.save(tmp_path / "ckpt")
    model, tokenizer = tiny_model(family)  # a fresh copy of the same base model
    loaded = Editor.load(tmp_path / "ckpt", model, tokenizer)
    assert [t for t in loaded.targets] == [t for t in editor.targets]
    assert loaded.max_length == 96
    assert dict(loaded.networks.config) == dict(editor.networks.config)
    for key, value in editor.networks.state_dict().items():
        assert torch.equal(loaded.networks.state_dict()[key], value), key
    assert_same_updates(editor, loaded)
    # and it edits and reverts like the original
    before = {n: p.clone() for n, p in model.named_parameters()}
    loaded.edit(*PAIRS[0])
    loaded.revert()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_loading_does_not_touch_the_base_model(saved, unchanged):
    _, path = saved
    model, tokenizer = tiny_model("gpt2")
    state = unchanged(model)
    Editor.load(path, model, tokenizer)
    state()


# ---------------------------------------------------------------- another base model is refused
@pytest.mark.parametrize(
    "other, match",
    [
        (lambda: tiny_model("llama"), "model_type: checkpoint 'gpt2', model 'llama'"),
        (lambda: tiny_model("gpt_neo"), "model_type"),
        (lambda: gpt2(n_embd=64), "hidden_size: checkpoint 32, model 64"),
        (lambda: gpt2(n_layer=6), "num_layers: checkpoint 4, model 6"),
        (lambda: tiny_model("gpt2", seed=1), "weights differ"),
    ],
    ids=["llama", "gpt_neo", "wider", "deeper", "other-weights"],
)
def test_another_base_model_is_refused(saved, other, match):
    _, path = saved
    model, tokenizer = other()
    with pytest.raises(CheckpointError, match="trained for another base model") as info:
        Editor.load(path, model, tokenizer)
    assert match in str(info.value)


def test_other_weights_are_refused_for_llama_too(tmp_path):
    trained_editor("llama").save(tmp_path / "ckpt")
    model, tokenizer = tiny_model("llama", seed=3)
    with pytest.raises(CheckpointError, match="weights differ"):
        Editor.load(tmp_path / "ckpt", model, tokenizer)


# ---------------------------------------------------------------- broken checkpoints
def _edit_meta(change):
    def apply(path: Path):
        meta = yaml.safe_load((path / "editor.yaml").read_text())
        change(meta)
        (path / "editor.yaml").write_text(yaml.safe_dump(meta))

    return apply


def _swap_weights_for_a_rank_8_editors(path: Path):
    other = Editor.untrained(*tiny_model("gpt2"), {"editor": {"rank": 8}})
    save_file({k: v.contiguous() for k, v in other.networks.state_dict().items()}, str(path / "editor.safetensors"))


BROKEN = {
    "no directory": lambda path: shutil.rmtree(path),
    "no yaml": lambda path: (path / "editor.yaml").unlink(),
    "no weights": lambda path: (path / "editor.safetensors").unlink(),
    "yaml syntax": lambda path: (path / "editor.yaml").write_text("editor: {rank: [4\n  targets: :"),
    "yaml not a mapping": lambda path: (path / "editor.yaml").write_text("- 1\n- 2\n"),
    "empty yaml": lambda path: (path / "editor.yaml").write_text(""),
    "weights garbage": lambda path: (path / "editor.safetensors").write_bytes(b"not a safetensors file"),
    "lacks targets": _edit_meta(lambda meta: meta.pop("targets")),
    "format version": _edit_meta(lambda meta: meta.update(format_version=99)),
    "target lacks d_in": _edit_meta(lambda meta: meta["targets"][0].pop("d_in")),
    "targets not a list": _edit_meta(lambda meta: meta.update(targets="all of them")),
    "targets empty": _edit_meta(lambda meta: meta.update(targets=[])),
    "unknown editor key": _edit_meta(lambda meta: meta["editor"].update(rnak=4)),
    "bad editor value": _edit_meta(lambda meta: meta["editor"].update(transform="sideways")),
    "unknown model key": _edit_meta(lambda meta: meta["model"].update(max_lenght=4)),
    "weights of another config": _swap_weights_for_a_rank_8_editors,
    "weights missing a tensor": lambda path: save_file(
        {k: v for k, v in load_file(str(path / "editor.safetensors")).items() if k != "log_lrs"}, str(path / "editor.safetensors")
    ),
}


@pytest.mark.parametrize("break_it", BROKEN.values(), ids=BROKEN.keys())
def test_a_broken_checkpoint_raises_checkpoint_error(saved, break_it):
    _, path = saved
    break_it(path)
    model, tokenizer = tiny_model("gpt2")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        Editor.load(path, model, tokenizer)


# ---------------------------------------------------------------- atomic saves
def test_saving_over_an_existing_checkpoint_replaces_it(tmp_path):
    path = tmp_path / "ckpt"
    first = trained_editor("gpt2", seed=0)
    first.save(path)
    (path / "stale.bin").write_bytes(b"left over from an older save")
    second = trained_editor("gpt2", seed=0, rank=6)
    torch.manual_seed(1)
    with torch.no_grad():
        second.networks.log_lrs.uniform_(-5, -4)
    second.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["editor.safetensors", "editor.yaml"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    loaded = Editor.load(path, *tiny_model("gpt2"))
    assert loaded.networks.config.rank == 6
    assert_same_updates(second, loaded)


def test_a_failed_save_leaves_the_old_checkpoint_intact(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    trained_editor("gpt2").save(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def broken_yaml(data, target):
        Path(target).write_text("half")
        raise OSError("disk full")

    monkeypatch.setattr(mend.editor, "save_yaml", broken_yaml)
    with pytest.raises(OSError, match="disk full"):
        trained_editor("gpt2", rank=6).save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging directory left behind


def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    path = tmp_path / "ckpt"
    trained_editor("gpt2").save(path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    real_replace = os.replace

    def failing_swap(src, dst):
        if Path(dst) == path and Path(src).name.endswith(".tmp"):  # the staging directory moving in
            raise OSError("rename failed")
        return real_replace(src, dst)

    monkeypatch.setattr(mend.checkpoint.os, "replace", failing_swap)
    with pytest.raises(OSError, match="rename failed"):
        trained_editor("gpt2", rank=6).save(path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_atomic_write_file_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "file.txt"
    path.write_text("old")

    def fail(tmp):
        Path(tmp).write_text("new but incomplete")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write_file(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]


def test_low_level_readers_raise_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="missing"):
        load_tensors(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="missing"):
        load_yaml(tmp_path / "absent.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        load_yaml(tmp_path / "bad.yaml")
    assert issubclass(CheckpointError, ValueError)


# ---------------------------------------------------------------- a save killed midway
KILL_SCRIPT = Path(__file__).resolve().parent / "kill_during_save_script.py"


def _kill_midway(kind: str, point: str, directory: Path) -> None:
    """Run kill_during_save_script.py until it stops in the middle of its save, then SIGKILL it."""
    import signal
    import subprocess
    import sys
    import time

    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(mend.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, str(KILL_SCRIPT), kind, point, str(directory)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (directory / "ready").exists():
            if child.poll() is not None:
                pytest.fail(f"the child exited with {child.returncode} before stopping:\n{child.stdout.read()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the child never reached the point to kill it at")
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()


@pytest.mark.parametrize("point", ["writing", "swapping"])
def test_an_editor_save_killed_midway_leaves_the_previous_checkpoint(tmp_path, point):
    editor = Editor.untrained(*tiny_model("llama"), {"editor": {"rank": 4}})
    editor.save(tmp_path / "ckpt")
    saved_meta = (tmp_path / "ckpt" / "editor.yaml").read_text()
    _kill_midway("editor", point, tmp_path)
    loaded = Editor.load(tmp_path / "ckpt", *tiny_model("llama"))
    assert (tmp_path / "ckpt" / "editor.yaml").read_text() == saved_meta
    expected = editor.networks.state_dict()
    for name, tensor in loaded.networks.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("point", ["writing", "swapping"])
def test_a_training_state_save_killed_midway_leaves_the_previous_state(tmp_path, point):
    from mend.train_state import Progress, load_train_state, save_train_state

    networks = Editor.untrained(*tiny_model("llama"), {"editor": {"rank": 4}}).networks
    optimizer = torch.optim.Adam(networks.parameters(), lr=0.1)
    sum(p.square().sum() for p in networks.parameters()).backward()
    optimizer.step()  # moment estimates to save
    progress = Progress(step=3, best_score=0.5, best_step=3, history=[{"step": 3, "score": 0.5}])
    save_train_state(tmp_path / "state", networks, optimizer, progress, "train: {max_steps: 3}\n")
    _kill_midway("train_state", point, tmp_path)

    fresh = Editor.untrained(*tiny_model("llama"), {"editor": {"rank": 4}}).networks
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=0.1)
    assert load_train_state(tmp_path / "state", fresh, fresh_optimizer) == progress
    assert (tmp_path / "state" / "config.yaml").read_text() == "train: {max_steps: 3}\n"
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, networks.state_dict()[name]), name
    for mine, theirs in zip(fresh_optimizer.state.values(), optimizer.state.values()):
        assert all(torch.equal(mine[key], theirs[key]) for key in ("exp_avg", "exp_avg_sq")), "optimizer state"


def test_writes_are_fsynced_file_then_directory(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(mend.checkpoint, "fsync_file", lambda path: synced.append(("file", Path(path).name)))
    monkeypatch.setattr(mend.checkpoint, "fsync_dir", lambda path: synced.append(("dir", Path(path).name)))
    atomic_write_file(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    assert synced[0][0] == "file" and synced[0][1].startswith(".a.txt.") and synced[1] == ("dir", tmp_path.name)
    synced.clear()
    mend.checkpoint.atomic_write_dir(tmp_path / "d", lambda staging: (Path(staging) / "f").write_text("y"))
    assert ("file", "f") in synced and synced[-1] == ("dir", tmp_path.name)
