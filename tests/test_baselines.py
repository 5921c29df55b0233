"""Edit methods: FT / FT-L fine-tune only the target matrices, respect their bounds, revert bit for bit,
leave no gradients behind; build_methods validates names."""

from __future__ import annotations

import pytest
import torch

import mend
from mend.baselines import METHOD_NAMES, EditMethod, FineTune, MendMethod, NoEdit, build_methods
from mend.batching import encode_pairs
from mend.scoring import mean_nll, target_logits
from mend.targets import resolve_targets

from tiny_models import tiny_model

PAIRS = [("The Eiffel Tower is in", "Rome")]


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _nll(model, tok, pairs):
    prompts, targets = zip(*pairs)
    batch = encode_pairs(tok, list(prompts), list(targets))
    with torch.no_grad():
        return float(mean_nll(target_logits(model, batch), batch.target_ids))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ft_changes_only_targets_lowers_the_loss_and_reverts_bitwise(family):
    model, tok = tiny_model(family)
    targets = resolve_targets(model, last_n_blocks=2)
    before = _state(model)
    loss_before = _nll(model, tok, PAIRS)
    ft = FineTune(model, tok, targets, steps=5, lr=1e-2)
    ft.apply(PAIRS)
    names = {t.name for t in targets}
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]) != (name in names), name  # targets changed, nothing else
        assert param.grad is None and not param.requires_grad
    assert _nll(model, tok, PAIRS) < loss_before - 0.1
    ft.apply([("Water is", "dry")])  # a second edit stacks on the first
    ft.revert()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_ft_keeps_requires_grad_flags_and_leaves_no_grad():
    model, tok = tiny_model("llama")
    targets = resolve_targets(model, last_n_blocks=1)
    trainable = model.get_input_embeddings().weight
    trainable.requires_grad_(True)  # a model that is not fully frozen
    model.get_output_embeddings().weight.requires_grad_(True)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    FineTune(model, tok, targets, steps=2, lr=1e-2).apply(PAIRS)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_ftl_stays_in_the_linf_ball(family):
    model, tok = tiny_model(family)
    targets = resolve_targets(model, last_n_blocks=2)
    params = dict(model.named_parameters())
    before = _state(model)
    eps = 1e-3
    ftl = FineTune(model, tok, targets, steps=4, lr=1e-1, linf_norm=eps)
    assert ftl.name == "ft-l"
    ftl.apply(PAIRS)
    after_one = _state(model)
    for t in targets:
        change = (params[t.name] - before[t.name]).abs().max().item()
        assert change <= eps * (1 + 1e-4), t.name
        assert change >= 0.9 * eps, t.name  # lr 0.1 >> eps: the bound is active
    ftl.apply([("Water is", "dry")])  # sequential: each edit stays within eps of where it started
    for t in targets:
        assert (params[t.name] - after_one[t.name]).abs().max().item() <= eps * (1 + 1e-4)
    ftl.revert()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ft_without_bound_moves_further_than_ftl():
    model, tok = tiny_model("llama")
    targets = resolve_targets(model, last_n_blocks=1)
    params = dict(model.named_parameters())
    before = _state(model)
    ft = FineTune(model, tok, targets, steps=4, lr=1e-1)
    ft.apply(PAIRS)
    assert max((params[t.name] - before[t.name]).abs().max().item() for t in targets) > 1e-2
    ft.revert()


def test_zero_steps_change_nothing():
    model, tok = tiny_model("llama")
    before = _state(model)
    FineTune(model, tok, resolve_targets(model), steps=0, lr=1e-2).apply(PAIRS)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("kwargs, match", [
    ({"steps": -1, "lr": 1e-3}, "ft_steps"),
    ({"steps": 1, "lr": 0.0}, "ft_lr"),
    ({"steps": 1, "lr": 1e-3, "linf_norm": 0.0}, "ftl_norm"),
])
def test_ft_rejects_bad_settings(kwargs, match):
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        FineTune(model, tok, resolve_targets(model), **kwargs)


def test_none_changes_nothing_and_checks_pairs():
    model, tok = tiny_model("llama")
    before = _state(model)
    method = NoEdit()
    method.apply(PAIRS)
    method.revert()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(mend.EditInputError):
        method.apply([("prompt", "")])


def test_mend_method_reverts_only_its_own_edits():
    model, tok = tiny_model("llama")
    editor = mend.Editor.untrained(model, tok, {"editor": {"init_lr": 1.0}})
    outside = editor.edit("Water is", "dry")  # made before the harness runs
    after_outside = _state(model)
    method = MendMethod(editor)
    method.apply(PAIRS)
    method.apply([("Fire is", "cold")])
    assert not all(torch.equal(p, after_outside[n]) for n, p in model.named_parameters())
    method.revert()
    assert all(torch.equal(p, after_outside[n]) for n, p in model.named_parameters())
    assert editor.applied == [outside]
    method.apply(PAIRS)
    editor.revert(outside)
    method.revert()  # now only the harness's edits are applied: plain full revert
    assert editor.applied == []


def test_build_methods_names_and_targets():
    model, tok = tiny_model("llama")
    editor = mend.Editor.untrained(model, tok, {"model": {"edit_last_n_blocks": 1}})
    methods = build_methods(["ft-l", "none", "mend", "ft"], editor, model, tok,
                            {"ft_steps": 7, "ft_lr": 1e-3, "ftl_norm": 2e-4}, checkpoint="runs/x")
    assert list(methods) == ["ft-l", "none", "mend", "ft"]
    assert all(isinstance(m, EditMethod) and m.name == n for n, m in methods.items())
    assert methods["ft"].targets == editor.targets and methods["ft-l"].linf_norm == 2e-4
    assert methods["ft"].linf_norm is None and methods["ft"].steps == 7
    assert methods["mend"].settings()["checkpoint"] == "runs/x"
    # without an editor, FT edits the default matrices
    ft = build_methods(["ft"], None, model, tok)["ft"]
    assert ft.targets == resolve_targets(model) and ft.steps == 10  # EvalConfig defaults
    assert set(METHOD_NAMES) == {"none", "mend", "mend-sum", "mend-lifelong", "ft", "ft-l"}


@pytest.mark.parametrize("names, match", [
    (["none", "rome"], r"unknown edit method 'rome'; valid methods are none, mend, mend-sum, mend-lifelong, ft, ft-l"),
    (["ft", "ft"], "more than once"),
    ([], "no edit methods"),
    (["mend"], "needs an editor"),
])
def test_build_methods_rejects(names, match):
    model, tok = tiny_model("llama")
    with pytest.raises(ValueError, match=match):
        build_methods(names, None, model, tok)


def test_the_mend_methods_are_one_editor_aggregated_summed_and_remembering():
    model, tok = tiny_model("llama")
    editor = mend.Editor.untrained(model, tok)  # stateless, ridge: "mend" is the editor itself
    methods = build_methods(["mend", "mend-sum", "mend-lifelong"], editor, model, tok)
    assert methods["mend"].editor is editor
    got = {name: (m.editor.aggregation.value, m.editor.remembers) for name, m in methods.items()}
    assert got == {"mend": ("ridge", False), "mend-sum": ("sum", False), "mend-lifelong": ("ridge", True)}
    assert all(m.editor.networks is editor.networks for m in methods.values())  # shared, not copied
    assert methods["mend-lifelong"].settings()["editor"]["lifelong"] is True
    before = _state(model)
    for method in methods.values():  # the harness runs them one after another, each reverting
        method.apply(PAIRS)
        method.apply([("Fire is", "cold")])
        method.revert()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert methods["mend-lifelong"].editor.memory.n_edits == 0


def test_build_methods_rejects_an_editor_of_another_model():
    model, tok = tiny_model("llama")
    other, _ = tiny_model("llama")
    editor = mend.Editor.untrained(other, tok)
    with pytest.raises(ValueError, match="another model"):
        build_methods(["mend"], editor, model, tok)


def test_build_methods_rejects_unknown_config_keys():
    model, tok = tiny_model("llama")
    with pytest.raises(mend.ConfigError, match="ft_step"):
        build_methods(["ft"], None, model, tok, {"ft_step": 3})


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("linf_norm", [None, 1e-2])
def test_ft_runs_the_blocks_below_its_matrices_once_per_edit_and_fine_tunes_as_the_full_forward_does(
        family, linf_norm, monkeypatch):
    import contextlib

    from mend.targets import find_blocks

    model, tok = tiny_model(family)
    targets = resolve_targets(model, last_n_blocks=1)  # the top block only: the rest is the prefix
    lowest = find_blocks(model)[1][0]
    runs = []
    handle = lowest.register_forward_hook(lambda *args: runs.append(1))
    pairs = PAIRS + [("Water is", "dry")]
    before = _state(model)
    ft = FineTune(model, tok, targets, steps=4, lr=1e-2, linf_norm=linf_norm)
    ft.apply(pairs)  # the first edit also probes, once, how the blocks return their states
    ft.revert()
    runs.clear()
    ft.apply(pairs)
    from_prefix = {t.name: dict(model.named_parameters())[t.name].detach().clone() for t in targets}
    assert len(runs) == 1  # the lowest block ran for the hidden states, not at every step
    ft.revert()
    monkeypatch.setattr(FineTune, "_unchanged_prefix", lambda self, batch: contextlib.nullcontext())
    runs.clear()
    ft.apply(pairs)
    handle.remove()
    assert len(runs) == 4  # the full forward runs it at every step
    for name, value in from_prefix.items():
        assert not torch.equal(value, before[name]), name
        torch.testing.assert_close(value, dict(model.named_parameters())[name], rtol=1e-5, atol=1e-6, msg=name)
    ft.revert()
