"""A table of malformed inputs: each is refused with its own specific error, and the base model's
weights are bit-identical afterwards (an edit that fails changes nothing; loading never writes)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mend import CheckpointError, ConfigError, EditFailedError, EditInputError, Editor, load_config
from mend.train_state import Progress, load_train_state, save_train_state
from tiny_models import tiny_model

MAX_LENGTH = 64  # tokens; the tiny models' CharTokenizer makes one token per byte
PROMPT, TARGET = "The Eiffel Tower is in", "Rome"


def edit(prompt, target):
    return lambda editor, path: editor.edit(prompt, target)


def edit_many(pairs):
    return lambda editor, path: editor.edit_many(pairs)


def load_after(change):
    """Save the editor to ``path``, apply ``change(path)``, then load it onto the same model."""

    def run(editor, path):
        editor.save(path)
        change(path)
        Editor.load(path, editor.model, editor.tokenizer)

    return run


def change_yaml(change):
    def apply(path: Path):
        meta = yaml.safe_load((path / "editor.yaml").read_text())
        (path / "editor.yaml").write_text(yaml.safe_dump(change(meta)))

    return apply


def truncate(name: str):
    def apply(path: Path):
        data = (path / name).read_bytes()
        (path / name).write_bytes(data[: len(data) // 2])

    return apply


def drop_tensor(name: str):
    def apply(path: Path):
        tensors = load_file(str(path / "editor.safetensors"))
        save_file({k: v for k, v in tensors.items() if k != name}, str(path / "editor.safetensors"))

    return apply


def poison(where: str, value: float):
    """Put ``value`` (NaN or inf) into one editor tensor, then edit."""

    def run(editor, path):
        networks = editor.networks
        network = next(iter(networks.networks.values()))
        tensor = {"up.weight": network.blocks[0].up.weight, "down.weight": network.blocks[0].down.weight,
                  "log_lrs": networks.log_lrs, "u_norm.mean": network.u_norm.mean}[where]
        with torch.no_grad():
            tensor.view(-1)[0] = value
        editor.edit(PROMPT, TARGET)

    return run


def load_train_state_after(change):
    def run(editor, path):
        optimizer = torch.optim.Adam(editor.networks.parameters())
        save_train_state(path, editor.networks, optimizer, Progress(step=1), "train: {}\n")
        change(path)
        load_train_state(path, editor.networks, optimizer)

    return run


def config_file(text: str):
    def run(editor, path):
        path.mkdir()
        (path / "run.yaml").write_text(text)
        load_config(config_dir=path, file=path / "run.yaml")

    return run


def revert(value):
    return lambda editor, path: editor.revert(value)


LONG = "word " * 40  # 200 tokens, over MAX_LENGTH
# (name, action, error type, regex the message must match)
CASES = [
    # wrong types
    ("prompt None", edit(None, TARGET), EditInputError, "prompt #0 must be a string, got NoneType"),
    ("prompt int", edit(42, TARGET), EditInputError, "prompt #0 must be a string, got int"),
    ("prompt bytes", edit(b"The Eiffel Tower is in", TARGET), EditInputError, "prompt #0 must be a string, got bytes"),
    ("prompt list", edit([PROMPT], TARGET), EditInputError, "prompt #0 must be a string, got list"),
    ("target float", edit(PROMPT, 1.5), EditInputError, "target #0 must be a string, got float"),
    ("target dict", edit(PROMPT, {"text": TARGET}), EditInputError, "target #0 must be a string, got dict"),
    # empty, whitespace and control characters
    ("prompt empty", edit("", TARGET), EditInputError, "prompt #0 is empty or only whitespace"),
    ("prompt spaces", edit("   ", TARGET), EditInputError, "prompt #0 is empty or only whitespace"),
    ("prompt newlines and tabs", edit("\n\t\r\n", TARGET), EditInputError, "prompt #0 is empty or only whitespace"),
    ("target empty", edit(PROMPT, ""), EditInputError, "target #0 is empty or only whitespace"),
    ("target whitespace", edit(PROMPT, " \u3000 "), EditInputError, "target #0 is empty or only whitespace"),
    ("prompt NUL", edit("The Eiffel\x00 Tower is in", TARGET), EditInputError,
     r"prompt #0 contains the control character '\\x00' at position 10"),
    ("prompt only control characters", edit("\x01\x02", TARGET), EditInputError, "prompt #0 contains the control"),
    ("target ANSI escape", edit(PROMPT, "\x1b[31mRome"), EditInputError, r"target #0 contains the control character '\\x1b'"),
    ("target DEL", edit(PROMPT, "Rome\x7f"), EditInputError, r"target #0 contains the control character '\\x7f'"),
    # over-long text
    ("prompt over max_length", edit(LONG, TARGET), EditInputError, f"over the limit of {MAX_LENGTH}"),
    ("target over max_length", edit(PROMPT, LONG), EditInputError, f"over the limit of {MAX_LENGTH}"),
    ("pair one token over max_length", edit("x" * (MAX_LENGTH - 3), "abc"), EditInputError,
     f"is {MAX_LENGTH + 1} tokens, over the limit of {MAX_LENGTH}"),
    # lists of pairs
    ("pairs empty list", edit_many([]), EditInputError, r"no \(prompt, target\) pairs were given"),
    ("pairs empty generator", edit_many(p for p in []), EditInputError, r"no \(prompt, target\) pairs were given"),
    ("pairs a string", edit_many("The Eiffel Tower is in Rome"), EditInputError, "pairs must be a list .* got str"),
    ("pairs None", edit_many(None), EditInputError, "pairs must be a list .* got NoneType"),
    ("pairs an int", edit_many(3), EditInputError, "pairs must be a list .* got int"),
    ("pairs a dict", edit_many({PROMPT: TARGET}), EditInputError, "pairs must be a list .* got dict"),
    ("pair of one", edit_many([(PROMPT,)]), EditInputError, r"pair #0 must be a \(prompt, target\) tuple"),
    ("pair of three", edit_many([(PROMPT, TARGET, "extra")]), EditInputError, r"pair #0 must be a \(prompt, target\)"),
    ("ragged pairs", edit_many([(PROMPT, TARGET), ("Water boils at",)]), EditInputError, r"pair #1 must be a"),
    ("pair a bare string", edit_many(["ab"]), EditInputError, r"pair #0 must be a \(prompt, target\) tuple, got 'ab'"),
    ("pair with a non-string", edit_many([(PROMPT, TARGET), ("Water boils at", 100)]), EditInputError,
     "target #1 must be a string, got int"),
    ("pair with None", edit_many([(None, TARGET)]), EditInputError, "prompt #0 must be a string"),
    ("pair mapping without target", edit_many([{"prompt": PROMPT}]), EditInputError, "target #0 must be a string"),
    ("pair with a nested list", edit_many([[PROMPT, [TARGET]]]), EditInputError, "target #0 must be a string, got list"),
    # the editor's own tensors
    ("NaN in an editor weight", poison("up.weight", float("nan")), EditFailedError, "contains NaN or inf"),
    ("inf in an editor weight", poison("down.weight", float("inf")), EditFailedError, "contains NaN or inf"),
    ("NaN step size", poison("log_lrs", float("nan")), EditFailedError, "contains NaN or inf"),
    ("NaN running mean", poison("u_norm.mean", float("nan")), EditFailedError, "contains NaN or inf"),
    # reverting something that is not an applied edit
    ("revert a string", revert("edit 0"), TypeError, "revert takes an EditResult"),
    ("revert an int", revert(0), TypeError, "revert takes an EditResult"),
    # editor checkpoints
    ("weights truncated", load_after(truncate("editor.safetensors")), CheckpointError, "cannot read .*editor.safetensors"),
    ("yaml truncated", load_after(truncate("editor.yaml")), CheckpointError, "editor.yaml"),
    ("weights missing", load_after(lambda p: (p / "editor.safetensors").unlink()), CheckpointError,
     "editor.safetensors is missing"),
    ("yaml missing", load_after(lambda p: (p / "editor.yaml").unlink()), CheckpointError, "editor.yaml is missing"),
    ("key 'targets' missing", load_after(change_yaml(lambda m: {k: v for k, v in m.items() if k != "targets"})),
     CheckpointError, "lacks the key 'targets'"),
    ("key 'format_version' missing", load_after(change_yaml(lambda m: {k: v for k, v in m.items() if k != "format_version"})),
     CheckpointError, "lacks the key 'format_version'"),
    ("tensor 'log_lrs' missing", load_after(drop_tensor("log_lrs")), CheckpointError, "missing \\['log_lrs'\\]"),
    ("yaml a list", load_after(lambda p: (p / "editor.yaml").write_text("- editor\n- model\n")), CheckpointError,
     "does not hold a mapping"),
    ("yaml a number", load_after(lambda p: (p / "editor.yaml").write_text("42\n")), CheckpointError, "does not hold a mapping"),
    ("yaml 'model' a string", load_after(change_yaml(lambda m: {**m, "model": "gpt2"})), CheckpointError,
     "'model' and 'editor' must be mappings"),
    ("yaml 'targets' a string", load_after(change_yaml(lambda m: {**m, "targets": "all"})), CheckpointError,
     "'targets' must be a non-empty list of mappings"),
    ("yaml rank a word", load_after(change_yaml(lambda m: {**m, "editor": {**m["editor"], "rank": "wide"}})),
     CheckpointError, "malformed.*rank"),
    ("yaml fingerprint a string", load_after(change_yaml(
        lambda m: {**m, "targets": [{**t, "fingerprint": "abc"} for t in m["targets"]]})), CheckpointError, "malformed"),
    # training-state checkpoints
    ("train state truncated", load_train_state_after(truncate("networks.safetensors")), CheckpointError,
     "cannot read .*networks.safetensors"),
    ("train state lacks progress", load_train_state_after(
        lambda p: (p / "state.yaml").write_text("optimizer: {param_groups: [], plain_state: {}}\n")), CheckpointError,
     "lacks the mapping 'progress'"),
    ("train state progress of the wrong type", load_train_state_after(
        lambda p: (p / "state.yaml").write_text(
            yaml.safe_dump({**yaml.safe_load((p / "state.yaml").read_text()), "progress": {"stpe": 3}}))),
     CheckpointError, "malformed.*stpe"),
    # configuration files
    ("config a YAML list", config_file("- editor\n- rank\n"), ConfigError, "run.yaml must hold a mapping"),
    ("config value of the wrong type", config_file("editor:\n  rank: wide\n"), ConfigError, "editor.rank"),
    ("config section a string", config_file("editor: small\n"), ConfigError, "run.yaml"),
]
N_CASES = len(CASES)


def test_the_table_holds_at_least_30_malformed_inputs():
    print(f"{N_CASES} malformed inputs")
    assert N_CASES >= 30
    assert len({name for name, *_ in CASES}) == N_CASES


@pytest.mark.parametrize("name, action, error, match", CASES,
                         ids=[f"{i + 1:02d}of{N_CASES}-{name.replace(' ', '-')}" for i, (name, *_) in enumerate(CASES)])
def test_malformed_input_is_refused_and_changes_no_weight(tmp_path, name, action, error, match, unchanged):
    model, tokenizer = tiny_model("llama")
    editor = Editor.untrained(model, tokenizer, {"editor": {"rank": 4, "init_lr": 0.5},
                                                 "model": {"max_length": MAX_LENGTH}})
    check = unchanged(model)
    with pytest.raises(error) as info:
        action(editor, tmp_path / "checkpoint")
    assert type(info.value) is error, f"{type(info.value).__name__}: {info.value}"
    assert re.search(match, str(info.value), re.DOTALL), f"{str(info.value)!r} does not match {match!r}"
    check()
    assert editor.applied == []
