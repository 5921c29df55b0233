"""Lifelong editing: an editor that remembers (statistics and key moments of its edits), saved and
loaded with it, reset on demand, and reverted bit for bit after any number of edits."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mend import CheckpointError, ConfigError, Editor, load_base_model, load_config
from mend.batching import encode_pairs
from mend.capture import capture_rank1
from tiny_models import save_tiny_hf_model, tiny_model

FACTS = [("Bees make", "glue"), ("Snow is", "hot"), ("Fish live in", "trees"), ("The sky is", "green"),
         ("Cats like to eat", "rocks")]


def lifelong(family="gpt2", **editor):
    model, tokenizer = tiny_model(family)
    return Editor.untrained(model, tokenizer, {"editor": {"init_lr": 0.5, "lifelong": True, **editor}})


def same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def raw_inputs(editor, fact) -> dict[str, torch.Tensor]:
    """name -> (n, d_in) the layer inputs an edit of ``fact`` captures, on the model as it is."""
    batch = encode_pairs(editor.tokenizer, [fact[0]], [fact[1]], max_length=editor.max_length)
    capture = capture_rank1(editor.model, editor.targets, batch)
    return {name: u for name, (u, _) in capture.factors.items()}


# ---------------------------------------------------------------- stateless or remembering
def test_an_editor_is_stateless_unless_asked_to_remember():
    model, tokenizer = tiny_model("gpt2")
    editor = Editor.untrained(model, tokenizer)
    assert not editor.remembers and editor.memory is None
    with pytest.raises(ValueError, match="lifelong=True"):
        editor.reset_memory()
    assert editor.variant(lifelong=True).remembers
    assert lifelong().remembers


def test_lifelong_needs_the_ridge_aggregation():
    with pytest.raises(ConfigError, match="aggregation=ridge"):
        load_config(["editor.lifelong=true", "editor.aggregation=sum"])
    with pytest.raises(ValueError, match="aggregation='ridge'"):
        lifelong().variant(aggregation="sum")


def test_the_first_remembered_edit_is_the_stateless_edit():
    editor = lifelong("llama")
    stateless = editor.variant(lifelong=False)
    want, _, _ = stateless.compute_updates([FACTS[0]])
    got, _, _ = editor.compute_updates([FACTS[0]])
    assert same_tensors(got, want)


def test_an_edit_is_remembered_as_key_moments_and_statistics_never_as_text():
    editor = lifelong("llama")
    trained = {k: v.clone() for k, v in editor.networks.state_dict().items()}
    inputs = raw_inputs(editor, FACTS[0])
    editor.edit(*FACTS[0])
    memory = editor.memory
    assert memory.n_edits == 1
    for name, u in inputs.items():
        torch.testing.assert_close(memory.edits[name], u.t() @ u, rtol=1e-5, atol=1e-5)
    n = len(next(iter(inputs.values())))
    for key, network in editor.networks.networks.items():
        users = sum(1 for t in editor.targets if editor.networks.network_of[t.name] == key)
        assert int(memory.norms[key][0].count) == users * n  # every matrix's rows, merged
    assert same_tensors(editor.networks.state_dict(), trained)  # the trained statistics stay as they were
    # moments of keys and value shifts, the first edit's ridge, statistics: no text
    assert {flat.split(".")[0] for flat in memory.tensors()} == {"n_edits", "edits", "gram", "cross", "ridge", "norms"}


def test_later_edits_use_the_memory_and_keep_off_earlier_edits_inputs():
    editor = lifelong("llama", memory_weight=100.0, memory_solve="hold")
    stateless = editor.variant(lifelong=False)
    first_inputs = editor.edit(*FACTS[0])._memory.keys  # the layer inputs the first edit was computed at
    remembering, _, _ = editor.compute_updates([(FACTS[0][0] + " and", "more")])  # shares the first's prompt
    forgetting, _, _ = stateless.compute_updates([(FACTS[0][0] + " and", "more")])
    for name, u in first_inputs.items():
        moved_with, moved_without = (u @ remembering[name].t()).norm(), (u @ forgetting[name].t()).norm()
        assert moved_with < 0.5 * moved_without, name


def test_lifelong_normalisation_uses_the_statistics_of_edits_so_far():
    editor = lifelong("gpt2")
    assert editor.memory.norms_for(editor.networks) is None  # nothing seen yet: the trained statistics
    editor.edit(*FACTS[0])
    norms = editor.memory.norms_for(editor.networks)
    for key, network in editor.networks.networks.items():
        u_norm, delta_norm = norms[key]
        assert int(u_norm.count) == int(network.u_norm.count) + int(editor.memory.norms[key][0].count)
        assert int(delta_norm.count) == int(network.delta_norm.count) + int(editor.memory.norms[key][1].count)


def test_a_refit_memory_holds_the_joint_ridge_fit_of_every_edit_so_far():
    """After t remembered edits the model carries W0 - lr F^T, F = (S + C + lambda I)^-1 R: the one
    ridge fit of every edit's keys to its value shifts (recursive least squares), not a stack of them."""
    editor = lifelong("llama", normalize=False)
    base = {t.name: editor._params[t.name].detach().clone() for t in editor.targets}
    for fact in FACTS[:3]:
        editor.edit(*fact)
    lrs = editor.networks.step_sizes()
    for target in editor.targets:
        name = target.name
        gram, cross, lam = editor.memory.fit(name)
        lhs = gram + lam * torch.eye(gram.shape[0], dtype=torch.float64)
        fit = torch.linalg.solve(lhs, cross)  # (d_in, d_out)
        want = base[name].double() - float(lrs[name].detach()) * fit.t()
        torch.testing.assert_close(editor._params[name].double(), want, rtol=1e-4, atol=1e-5)


def test_a_refit_updates_its_held_inverse_exactly_as_a_fresh_factorisation_would(monkeypatch):
    """Each refit updates the held A^-1 and F by Woodbury (O(n d^2) per edit); the weights equal those
    of an editor that factorises afresh at every edit, with preserved knowledge in the solve and after
    a revert of a middle edit (which must drop the held state)."""
    import mend.editor as editor_module

    def run(refresh_every):
        monkeypatch.setattr(editor_module, "REFIT_REFRESH", refresh_every)
        editor = lifelong("llama", normalize=False)
        editor.preserve(["Water is wet and the grass is green.", "Paris is a city in France."])
        results = [editor.edit(*fact) for fact in FACTS]
        editor.revert(results[2])
        editor.edit(*FACTS[2])
        return editor, {t.name: editor._params[t.name].detach().clone() for t in editor.targets}

    held, with_held_state = run(100)
    assert held._refit_states  # the cheap path was taken
    _, fresh = run(1)
    for name, weight in fresh.items():
        torch.testing.assert_close(with_held_state[name], weight, rtol=1e-5, atol=1e-6)


def test_a_refit_captures_every_edit_on_the_weights_of_the_first():
    editor = lifelong("llama", normalize=False)
    fresh = lifelong("llama", normalize=False)
    want = fresh.edit(*FACTS[1])._memory.fitted  # the fact's keys and value shifts on the unedited model
    editor.edit(*FACTS[0])
    got = editor.edit(*FACTS[1])._memory.fitted  # the same fact after another edit changed the model
    for name, (keys, values) in got.items():
        torch.testing.assert_close(keys, want[name][0])
        torch.testing.assert_close(values, want[name][1])
    params_after = {t.name: editor._params[t.name].detach().clone() for t in editor.targets}
    editor.compute_updates([FACTS[2]])  # the capture swaps the first edit's weights in and back
    assert all(torch.equal(editor._params[n], w) for n, w in params_after.items())


def test_a_stack_of_identical_refit_edits_fits_the_fact_once():
    """The same fact edited again asks for nothing new: its residual is what the fit so far leaves."""
    editor = lifelong("llama", normalize=False)
    first = editor.edit(*FACTS[0])
    second = editor.edit(*FACTS[0])
    for name in first.update_norms:
        assert second.update_norms[name] < 0.5 * first.update_norms[name], name


# ---------------------------------------------------------------- revert
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_revert_after_many_lifelong_edits_is_bit_exact(family, unchanged):
    editor = lifelong(family)
    model_unchanged = unchanged(editor.model)
    memory_before = editor.memory.tensors()
    for fact in FACTS:
        editor.edit(*fact)
    editor.edit_many(FACTS[:3])
    assert editor.memory.n_edits == len(FACTS) + 1
    editor.revert()
    model_unchanged()
    assert same_tensors(editor.memory.tensors(), memory_before)


def test_reverting_a_middle_lifelong_edit_forgets_exactly_that_edit(unchanged):
    editor = lifelong("llama")
    results = [editor.edit(*fact) for fact in FACTS[:3]]
    inputs = [r._memory.keys for r in results]
    editor.revert(results[1])
    assert editor.memory.n_edits == 2
    for name in inputs[0]:
        want = sum(keys[name].t() @ keys[name] for keys in (inputs[0], inputs[2]))
        torch.testing.assert_close(editor.memory.edits[name], want, rtol=1e-5, atol=1e-5)
    # the kept edits are replayed: removing the others too gives the unedited model and memory
    editor.revert(results[0])
    editor.revert(results[2])
    assert editor.applied == [] and editor.memory.n_edits == 0 and editor.memory.edits == {}


def test_commit_keeps_the_edits_frees_their_history_and_later_edits_are_unchanged():
    """After commit the model and memory stay; revert goes back only to the commit; an edit made after
    it equals the same edit made by an editor that never committed."""
    committed, plain = lifelong("llama"), lifelong("llama")
    for editor in (committed, plain):
        for fact in FACTS[:3]:
            editor.edit(*fact)
    old = committed.applied[0]
    committed.commit()
    at_commit = {t.name: committed._params[t.name].detach().clone() for t in committed.targets}
    memory_at_commit = committed.memory.tensors()
    assert committed.applied == [] and old._factors == {} and old._memory is None
    assert committed.memory.n_edits == 3
    with pytest.raises(ValueError, match="committed"):
        committed.revert(old)
    committed.edit(*FACTS[3])
    plain.edit(*FACTS[3])
    for target in committed.targets:
        torch.testing.assert_close(committed._params[target.name], plain._params[target.name], rtol=0, atol=0)
    committed.revert()  # back to the commit, not to the start
    assert all(torch.equal(committed._params[n], w) for n, w in at_commit.items())
    assert same_tensors(committed.memory.tensors(), memory_at_commit)


def test_reset_memory_forgets_but_leaves_the_weights():
    editor = lifelong("gpt2")
    editor.edit(*FACTS[0])
    editor.edit(*FACTS[1])
    params = {n: p.detach().clone() for n, p in editor.model.named_parameters()}
    editor.reset_memory()
    assert editor.memory.n_edits == 0 and editor.memory.edits == {}
    assert all(torch.equal(p, params[n]) for n, p in editor.model.named_parameters())
    stateless = editor.variant(lifelong=False)
    assert same_tensors(editor.compute_updates([FACTS[2]])[0], stateless.compute_updates([FACTS[2]])[0])
    editor.edit(*FACTS[2])
    editor.revert(editor.applied[0])  # an edit made before the reset: the memory keeps only the later one
    assert editor.memory.n_edits == 1


# ---------------------------------------------------------------- save and load
def test_lifelong_state_survives_save_and_load(tmp_path):
    # hold: the next update depends on the weights and the memory only (a loaded refit memory captures
    # on the weights it is given, since the weights of its first edit are not saved)
    editor = lifelong("llama", memory_solve="hold")
    for fact in FACTS[:3]:
        editor.edit(*fact)
    editor.save(tmp_path / "editor")
    assert (tmp_path / "editor" / "memory.safetensors").is_file()

    model, tokenizer = tiny_model("llama")  # the same base model, unedited
    loaded = Editor.load(tmp_path / "editor", model, tokenizer)
    assert loaded.remembers  # saved for lifelong use: remembers by default
    assert same_tensors(loaded.memory.tensors(), editor.memory.tensors())
    model.load_state_dict(editor.model.state_dict())  # carry the edits over: both now compute the same edit
    want, _, _ = editor.compute_updates([FACTS[3]])
    got, _, _ = loaded.compute_updates([FACTS[3]])
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    loaded.edit(*FACTS[3])
    loaded.edit(*FACTS[4])
    assert loaded.memory.n_edits == 5  # remembers across edit calls after loading

    stateless = Editor.load(tmp_path / "editor", *tiny_model("llama"), lifelong=False)
    assert not stateless.remembers


def test_a_stateless_editor_saves_no_memory_and_can_load_remembering(tmp_path):
    model, tokenizer = tiny_model("gpt2")
    Editor.untrained(model, tokenizer).save(tmp_path / "editor")
    assert not (tmp_path / "editor" / "memory.safetensors").exists()
    assert not Editor.load(tmp_path / "editor", model, tokenizer).remembers
    remembering = Editor.load(tmp_path / "editor", model, tokenizer, lifelong=True)
    assert remembering.remembers and remembering.memory.n_edits == 0


def test_a_memory_that_does_not_fit_the_editor_is_refused(tmp_path):
    editor = lifelong("gpt2")
    editor.edit(*FACTS[0])
    editor.save(tmp_path / "editor")
    from safetensors.torch import load_file, save_file

    path = tmp_path / "editor" / "memory.safetensors"
    tensors = load_file(path)
    name = next(k for k in tensors if k.startswith("edits."))
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="memory.safetensors"):
        Editor.load(tmp_path / "editor", *tiny_model("gpt2"))


# ---------------------------------------------------------------- preserved knowledge
@pytest.mark.parametrize("remembers", [False, True])
def test_preserved_knowledge_enters_every_later_solve_and_is_saved(tmp_path, remembers):
    model, tokenizer = tiny_model("gpt2")
    editor = Editor.untrained(model, tokenizer, {"editor": {"init_lr": 0.5, "preserve_weight": 50.0,
                                                             "lifelong": remembers}})
    texts = ["Generic text about many things.", "Another sentence of plain prose."]
    before, _, _ = editor.compute_updates([FACTS[0]])
    editor.preserve(texts)
    for target in editor.targets:
        moment = editor.preserved[target.name]
        assert moment.shape == (target.d_in, target.d_in)
        torch.testing.assert_close(moment, moment.t())
    after, _, _ = editor.compute_updates([FACTS[0]])
    assert all(not torch.allclose(after[n], before[n]) for n in before)
    for name, update in after.items():  # the update leaves generic text's inputs more alone
        generic = editor.preserved[name].double()
        assert (update.double() @ generic @ update.double().t()).trace() < (before[name].double() @ generic @
                                                                             before[name].double().t()).trace()
    editor.save(tmp_path / "editor")
    loaded = Editor.load(tmp_path / "editor", *tiny_model("gpt2"))
    assert loaded.remembers == remembers
    assert same_tensors(loaded.preserved, editor.preserved)
    if remembers:
        editor.reset_memory()  # forgets edits, keeps the preserved knowledge
        assert editor.preserved


def test_the_answer_moment_is_taken_at_the_positions_that_predict_the_answer():
    from mend.capture import ModuleRecorder
    from mend.memory import answer_key_moments

    model, tokenizer = tiny_model("llama")
    editor = Editor.untrained(model, tokenizer)
    pairs = [("Bees make", "glue"), ("The sky over the old harbour is", "green and grey")]
    moments = answer_key_moments(model, editor.targets, tokenizer, pairs)  # one padded batch
    expected = {t.name: torch.zeros(t.d_in, t.d_in, dtype=torch.float64) for t in editor.targets}
    count = 0
    for prompt, answer in pairs:  # one row at a time, no padding: the positions from the last prompt token on
        batch = encode_pairs(tokenizer, [prompt], [answer])
        n_prompt = int((~batch.target_mask[0]).sum())
        n_answer = int(batch.target_mask[0].sum())
        with torch.no_grad(), ModuleRecorder(model, editor.targets) as recorder:
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        for target in editor.targets:
            u = recorder.inputs[target.name][0, n_prompt - 1 : n_prompt - 1 + n_answer].double()
            expected[target.name] += u.t() @ u
        count += n_answer
    for name, moment in moments.items():
        torch.testing.assert_close(moment.double(), expected[name] / count, rtol=1e-4, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="pairs"):
        answer_key_moments(model, editor.targets, tokenizer, [])


def test_preserving_answers_adds_their_moment_with_its_weight():
    from mend.memory import answer_key_moments, key_moments

    model, tokenizer = tiny_model("gpt2")
    editor = Editor.untrained(model, tokenizer, {"editor": {"preserve_weight": 50.0}})
    texts, answers = ["Generic text about many things."], [("The capital of Peru is", "Lima")]
    editor.preserve(texts, answers=answers, answer_weight=3.0)
    plain = key_moments(model, editor.targets, tokenizer, texts)
    at_answers = answer_key_moments(model, editor.targets, tokenizer, answers)
    for name, moment in editor.preserved.items():
        torch.testing.assert_close(moment, plain[name] + 3.0 * at_answers[name], msg=name)
        assert not torch.allclose(moment, plain[name])
    with pytest.raises(ValueError, match="answer_weight must be >= 0"):
        editor.preserve(texts, answers=answers, answer_weight=-1.0)


def test_the_preserve_script_makes_a_lifelong_editor_from_a_trained_one(tmp_path):
    model, tokenizer = load_base_model(str(save_tiny_hf_model(tmp_path / "tiny", "llama")))
    Editor.untrained(model, tokenizer).save(tmp_path / "trained")
    records = [{"case_id": i, "prompt": p, "target_new": t, "ground_truth": "x", "subject": p.split()[0],
                "rephrase_prompt": "Q: " + p, "locality_prompt": f"Number {i} is", "locality_ground_truth": "odd"}
               for i, (p, t) in enumerate(FACTS)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    script = Path(__file__).resolve().parents[1] / "scripts" / "preserve.py"
    spec = importlib.util.spec_from_file_location("preserve", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--editor", str(tmp_path / "trained"), "--data", str(tmp_path / "records.json"),
                 "--out", str(tmp_path / "lifelong"), "--set", "memory_weight=250", "solve_keys=predictions"])
    loaded = Editor.load(tmp_path / "lifelong")
    assert loaded.remembers and loaded.memory.n_edits == 0
    assert set(loaded.preserved) == {t.name for t in loaded.targets}
    assert loaded.networks.config.memory_weight == 250.0 and loaded.networks.config.solve_keys.value == "predictions"

    # --answer-weight adds the probes' answer-position moment; --stateless keeps the editor stateless
    module.main(["--editor", str(tmp_path / "trained"), "--data", str(tmp_path / "records.json"),
                 "--out", str(tmp_path / "answers"), "--answer-weight", "2", "--stateless"])
    with_answers = Editor.load(tmp_path / "answers")
    assert not with_answers.remembers
    from mend.memory import answer_key_moments

    probes = [(r["locality_prompt"], r["locality_ground_truth"]) for r in records]
    at_answers = answer_key_moments(with_answers.model, with_answers.targets, with_answers.tokenizer, probes)
    for name, moment in with_answers.preserved.items():
        torch.testing.assert_close(moment, loaded.preserved[name] + 2.0 * at_answers[name], rtol=1e-4, atol=1e-6)
    with pytest.raises(SystemExit, match="--answer-weight must be >= 0"):
        module.main(["--editor", str(tmp_path / "trained"), "--data", str(tmp_path / "records.json"),
                     "--out", str(tmp_path / "bad"), "--answer-weight", "-1"])


# ---------------------------------------------------------------- edit-time settings
def test_edit_time_settings_change_later_solves_and_are_saved_with_the_editor(tmp_path):
    editor = lifelong("llama", preserve_weight=10.0)
    editor.preserve(["Generic text about many things.", "Another sentence."])
    before, _, _ = editor.compute_updates([FACTS[0]])
    editor.configure(preserve_weight=1000.0, memory_weight=50.0)
    after, _, _ = editor.compute_updates([FACTS[0]])
    for name in before:  # the update leaves generic text's inputs more alone
        generic = editor.preserved[name].double()
        moved = lambda update: float((update.double() @ generic @ update.double().t()).trace())
        assert moved(after[name]) < moved(before[name])
    editor.save(tmp_path / "editor")
    loaded = Editor.load(tmp_path / "editor", *tiny_model("llama"))
    assert (loaded.networks.config.preserve_weight, loaded.networks.config.memory_weight) == (1000.0, 50.0)
    again = Editor.load(tmp_path / "editor", *tiny_model("llama"), settings={"preserve_weight": 10.0})
    same, _, _ = again.compute_updates([FACTS[0]])
    for name in before:
        torch.testing.assert_close(same[name], before[name])


def test_edit_scale_multiplies_every_update_and_an_edit_with_it_reverts_exactly(unchanged):
    editor = lifelong("llama")
    full, _, _ = editor.compute_updates(FACTS[:2])
    editor.configure(edit_scale=0.25)
    scaled, _, _ = editor.compute_updates(FACTS[:2])
    for name in full:
        torch.testing.assert_close(scaled[name], 0.25 * full[name])
        assert scaled[name].abs().max() > 0
    check = unchanged(editor.model)
    editor.edit(*FACTS[0])
    editor.revert()
    check()


@pytest.mark.parametrize("settings, named", [({"rank": 8}, "rank"), ({"memory_weight": -1.0}, "memory_weight"),
                                             ({"solve_keys": "some"}, "solve_keys|some"),
                                             ({"edit_scale": 0.0}, "edit_scale")])
def test_a_setting_that_is_not_edit_time_or_not_valid_is_refused_and_nothing_changes(settings, named):
    editor = lifelong("gpt2")
    config = dict(editor.networks.config)
    with pytest.raises((ValueError, ConfigError), match=named):
        editor.configure(**settings)
    assert dict(editor.networks.config) == config
