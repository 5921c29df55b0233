"""Retrieved neighbours: a bank of known facts' keys at their last prompt token; each edit keeps the
outputs at its nearest bank keys in its solve, saved and loaded with the editor."""

from __future__ import annotations

import pytest
import torch

from mend import CheckpointError, ConfigError, Editor, load_config
from mend.batching import encode_pairs
from mend.capture import ModuleRecorder
from mend.neighbours import KeyBank, first_predictions
from tiny_models import tiny_model

KNOWN = [("The capital of Peru is", "Lima"), ("Bees make", "honey"), ("Snow is", "cold"),
         ("The mother tongue of Anna is", "French"), ("Fish live in", "water")]


def editor_with_bank(family="llama", **settings):
    model, tokenizer = tiny_model(family)
    editor = Editor.untrained(model, tokenizer, {"editor": {"init_lr": 0.5, "preserve_weight": 50.0, **settings}})
    editor.preserve(["Generic text about many things."])
    editor.build_neighbours(KNOWN)
    return editor


def last_prompt_inputs(editor, pairs) -> dict[str, torch.Tensor]:
    """name -> (len(pairs), d_in): each pair's raw input at its last prompt token, one pair at a time."""
    out = {t.name: [] for t in editor.targets}
    for prompt, answer in pairs:
        batch = encode_pairs(editor.tokenizer, [prompt], [answer])
        last = int((~batch.target_mask[0]).sum()) - 1
        with torch.no_grad(), ModuleRecorder(editor.model, editor.targets) as recorder:
            editor.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        for target in editor.targets:
            out[target.name].append(recorder.inputs[target.name][0, last].float())
    return {name: torch.stack(rows) for name, rows in out.items()}


def test_the_first_prediction_of_each_row_is_its_last_prompt_token():
    predicting = torch.tensor([False, True, True, False, False, True, True, True])
    rows = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    assert first_predictions(predicting, rows).tolist() == [False, True, False, False, False, True, True, False]


def test_the_bank_holds_unit_keys_at_the_last_prompt_token_and_their_mean_norm():
    editor = editor_with_bank()
    expected = last_prompt_inputs(editor, KNOWN)  # one unpadded pass per fact
    assert len(editor.neighbours) == len(KNOWN)
    for name, raw in expected.items():
        keys = editor.neighbours.keys[name].float()
        assert keys.dtype == torch.float32 and editor.neighbours.keys[name].dtype == torch.float16
        torch.testing.assert_close(keys, raw / raw.norm(dim=1, keepdim=True), atol=2e-3, rtol=0, msg=name)
        assert editor.neighbours.scales[name] == pytest.approx(float(raw.norm(dim=1).mean()), rel=1e-4)


def test_nearest_returns_each_querys_most_similar_keys_at_the_banks_scale():
    keys = torch.eye(4)[:3]  # three orthogonal unit keys in 4 dimensions
    bank = KeyBank({"w": keys}, {"w": 2.0})
    queries = torch.tensor([[0.1, 5.0, 0.0, 0.0], [3.0, 0.0, 1.0, 0.0]])
    near = bank.nearest("w", queries, k=2)  # (2 * 2, 4)
    assert near.shape == (4, 4)
    torch.testing.assert_close(near[:2], 2.0 * torch.stack([keys[1], keys[0]]))
    torch.testing.assert_close(near[2:], 2.0 * torch.stack([keys[0], keys[2]]))
    assert bank.nearest("w", queries, k=10).shape == (2 * 3, 4)  # k is capped at the bank's size


@pytest.mark.parametrize("fit_predictions", [False, True])
def test_guard_rows_in_the_n_space_solve_equal_adding_their_moment_to_c(fit_predictions):
    from mend.aggregate import MomentBasis, aggregate_facts
    from mend.networks import update_from

    d_in, d_out = 12, 7
    keys, deltas = torch.randn(9, d_in), torch.randn(9, d_out)
    facts = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    solve = torch.tensor([False, True, True, False, True, False, False, True, True]) if fit_predictions else None
    base = torch.randn(d_in, 30)
    moment = (base @ base.t() / 30).double()  # (d_in, d_in) a preserved moment
    guard = 3.0 * torch.randn(5, d_in)  # five neighbour keys
    rho, lr = torch.tensor(1e-2), torch.tensor(0.5)
    fast = aggregate_facts(keys, deltas, lr, facts, aggregation="ridge", rho=rho, moment=MomentBasis.of(moment),
                           solve=solve, guard=guard)
    dense = aggregate_facts(keys, deltas, lr, facts, aggregation="ridge", rho=rho, solve=solve, space="d",
                            moment=moment + guard.double().t() @ guard.double())
    torch.testing.assert_close(update_from(*fast), update_from(*dense), rtol=1e-4, atol=1e-5)
    plain = aggregate_facts(keys, deltas, lr, facts, aggregation="ridge", rho=rho, moment=MomentBasis.of(moment),
                            solve=solve)
    assert (guard @ update_from(*fast).t()).norm() < 0.5 * (guard @ update_from(*plain).t()).norm()


def test_a_bank_changes_nothing_until_its_weight_is_set():
    editor = editor_with_bank()
    fact = ("The mother tongue of Bob is", "German")
    editor.neighbours = None
    plain, _, _ = editor.compute_updates([fact])
    editor.build_neighbours(KNOWN)
    unused, _, _ = editor.compute_updates([fact])  # neighbour_weight is 0 by default
    assert all(torch.equal(plain[n], unused[n]) for n in plain)


def test_retrieved_neighbours_are_moved_less_by_the_edit():
    editor = editor_with_bank(neighbour_count=2)
    fact = ("The mother tongue of Bob is", "German")
    plain, _, _ = editor.compute_updates([fact])
    editor.configure(neighbour_weight=20.0)
    guarded, _, _ = editor.compute_updates([fact])
    query = last_prompt_inputs(editor, [fact])
    for name in plain:
        near = editor.neighbours.nearest(name, query[name], 2).double()  # (2, d_in) the retrieved keys
        moved_plain = (near @ plain[name].double().t()).norm()
        moved_guarded = (near @ guarded[name].double().t()).norm()
        assert moved_guarded < 0.8 * moved_plain, name


def test_a_bank_is_saved_and_loaded_with_the_editor(tmp_path):
    editor = editor_with_bank(neighbour_weight=3.0, neighbour_count=4)
    fact = ("The mother tongue of Bob is", "German")
    before, _, _ = editor.compute_updates([fact])
    editor.save(tmp_path / "editor")
    loaded = Editor.load(tmp_path / "editor", *tiny_model("llama"))
    assert loaded.networks.config.neighbour_weight == 3.0 and loaded.networks.config.neighbour_count == 4
    assert all(torch.equal(loaded.neighbours.keys[n], editor.neighbours.keys[n]) for n in editor.neighbours.keys)
    after, _, _ = loaded.compute_updates([fact])
    assert all(torch.allclose(after[n], before[n], atol=1e-6) for n in before)
    assert loaded.variant(aggregation="ridge").neighbours is loaded.neighbours


def test_a_bank_for_other_matrices_is_refused_on_load(tmp_path):
    editor = editor_with_bank()
    editor.save(tmp_path / "editor")
    other = editor_with_bank()
    name = other.targets[0].name
    other.neighbours.keys[name] = other.neighbours.keys[name][:, :-1]  # one input width short
    from mend.checkpoint import save_tensors

    save_tensors(other.neighbours.tensors(), tmp_path / "editor" / "neighbours.safetensors")
    with pytest.raises(CheckpointError, match="neighbours.safetensors does not fit"):
        Editor.load(tmp_path / "editor", *tiny_model("llama"))


def test_bad_neighbour_settings_are_refused():
    with pytest.raises(ConfigError, match="neighbour_count must be >= 1"):
        load_config(["editor.neighbour_count=0"])
    with pytest.raises(ConfigError, match="neighbour_weight must be >= 0"):
        load_config(["editor.neighbour_weight=-1"])
    with pytest.raises(ValueError, match="pairs"):
        KeyBank.build(tiny_model("llama")[0], [], None, [])
