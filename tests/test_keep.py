"""Facts an edit is asked to keep: their layer inputs at every position join the ridge solve with
``editor.keep_weight``, so the edit leaves what the model says there nearly as it was."""

from __future__ import annotations

import pytest
import torch

from mend import ConfigError, EditInputError, Editor, load_config
from mend.aggregate import MomentBasis, aggregate_facts
from mend.batching import encode_pairs
from mend.networks import update_from
from mend.scoring import target_logits
from tiny_models import tiny_model

EDIT = ("The mother tongue of Bob is", "German")
NEIGHBOUR = ("Anna speaks", "French")


def editor_for(preserved: bool = True, **settings) -> Editor:
    model, tokenizer = tiny_model("llama")
    editor = Editor.untrained(model, tokenizer, {"editor": {"init_lr": 0.5, "preserve_weight": 50.0, **settings}})
    if preserved:
        editor.preserve(["Generic text about many things.", "Another sentence of plain prose."])
    return editor


def answer_log_probs(editor, fact) -> torch.Tensor:
    """log p of every vocabulary entry at the positions that predict ``fact``'s answer (n, V)."""
    batch = encode_pairs(editor.tokenizer, [fact[0]], [fact[1]])
    with torch.no_grad():
        return target_logits(editor.model, batch).log_softmax(-1)


@pytest.mark.parametrize("fit_predictions, n_guard", [(False, 5), (True, 5), (False, 40)])  # 40 + 9 rows > 12 inputs: d-space
def test_guard_rows_in_the_n_space_solve_equal_adding_their_moment_to_c(fit_predictions, n_guard):
    d_in, d_out = 12, 7
    keys, deltas = torch.randn(9, d_in), torch.randn(9, d_out)
    facts = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    solve = torch.tensor([False, True, True, False, True, False, False, True, True]) if fit_predictions else None
    base = torch.randn(d_in, 30)
    moment = (base @ base.t() / 30).double()  # (d_in, d_in) a preserved moment
    guard = 3.0 * torch.randn(n_guard, d_in)  # the kept keys
    rho, lr = torch.tensor(1e-2), torch.tensor(0.5)
    fast = aggregate_facts(keys, deltas, lr, facts, aggregation="ridge", rho=rho, moment=MomentBasis.of(moment),
                           solve=solve, guard=guard)
    dense = aggregate_facts(keys, deltas, lr, facts, aggregation="ridge", rho=rho, solve=solve, space="d",
                            moment=moment + guard.double().t() @ guard.double())
    torch.testing.assert_close(update_from(*fast), update_from(*dense), rtol=1e-4, atol=1e-5)
    plain = aggregate_facts(keys, deltas, lr, facts, aggregation="ridge", rho=rho, moment=MomentBasis.of(moment),
                            solve=solve)
    assert (guard @ update_from(*fast).t()).norm() < 0.5 * (guard @ update_from(*plain).t()).norm()


def test_no_facts_to_keep_is_the_plain_edit():
    editor = editor_for()
    plain, _, _ = editor.compute_updates([EDIT])
    for keep in (None, []):
        same, _, _ = editor.compute_updates([EDIT], keep=keep)
        assert all(torch.equal(plain[n], same[n]) for n in plain)
    editor.configure(keep_weight=0.0)
    same, _, _ = editor.compute_updates([EDIT], keep=[NEIGHBOUR])
    assert all(torch.equal(plain[n], same[n]) for n in plain)


@pytest.mark.parametrize("preserved", [True, False])  # the n-space (eigenbasis) and the d-space solve
def test_a_kept_fact_moves_less_and_the_edit_still_lands(preserved):
    editor = editor_for(preserved)
    before_neighbour, before_edit = answer_log_probs(editor, NEIGHBOUR), answer_log_probs(editor, EDIT)
    target = encode_pairs(editor.tokenizer, [EDIT[0]], [EDIT[1]]).target_ids

    def after(keep):
        result = editor.edit(*EDIT, keep=keep)
        moved = (answer_log_probs(editor, NEIGHBOUR) - before_neighbour).abs().max()
        gain = (answer_log_probs(editor, EDIT) - before_edit).gather(1, target[:, None]).mean()
        editor.revert(result)
        return float(moved), float(gain)

    moved_plain, gain_plain = after(None)
    moved_kept, gain_kept = after([NEIGHBOUR])
    assert moved_kept < 0.3 * moved_plain
    assert gain_kept > 0.3 * gain_plain > 0


def test_bad_facts_to_keep_are_refused_and_change_nothing(unchanged):
    editor = editor_for()
    check = unchanged(editor.model)
    with pytest.raises(EditInputError, match="keep pair #1"):
        editor.edit(*EDIT, keep=[NEIGHBOUR, ("only a prompt",)])
    with pytest.raises(EditInputError, match="keep target #0"):
        editor.edit_many([EDIT], keep=[("A prompt", "")])
    with pytest.raises(EditInputError, match="keep must be a list"):
        editor.edit(*EDIT, keep="The mother tongue of Anna is French")
    with pytest.raises(EditInputError, match="wrap one fact in a list"):
        editor.edit(*EDIT, keep=NEIGHBOUR)
    with pytest.raises(EditInputError, match="keep prompt"):
        editor.edit(*EDIT, keep=[("word " * 400, "answer")])  # over model.max_length tokens
    summing = editor.variant(aggregation="sum")
    with pytest.raises(ValueError, match="keep needs aggregation='ridge'"):
        summing.edit(*EDIT, keep=[NEIGHBOUR])
    check()
    summing.compute_updates([EDIT], keep=[])  # nothing to keep: any editor
    editor.compute_updates([EDIT], keep=iter([]))
    assert not editor.applied


def test_the_keep_weight_is_an_edit_time_setting_checked_like_a_config(tmp_path):
    with pytest.raises(ConfigError, match="keep_weight must be >= 0"):
        load_config(["editor.keep_weight=-1"])
    editor = editor_for()
    editor.configure(keep_weight=20.0)
    editor.save(tmp_path / "editor")
    assert Editor.load(tmp_path / "editor", *tiny_model("llama")).networks.config.keep_weight == 20.0


def test_the_keep_probes_script_keeps_each_records_locality_probes(tmp_path, capsys):
    import importlib.util
    import json
    from pathlib import Path

    from mend import load_base_model
    from tiny_models import save_tiny_hf_model

    model, tokenizer = load_base_model(str(save_tiny_hf_model(tmp_path / "tiny", "llama")))
    Editor.untrained(model, tokenizer, {"editor": {"init_lr": 0.5}}).save(tmp_path / "editor")
    records = [{"case_id": i, "prompt": p, "target_new": t, "ground_truth": "x", "subject": p.split()[0],
                "rephrase_prompt": "So, " + p, "locality_prompt": f"Number {i} is", "locality_ground_truth": "odd"}
               for i, (p, t) in enumerate([EDIT, ("Bees make", "glue")])]
    (tmp_path / "records.json").write_text(json.dumps(records))
    script = Path(__file__).resolve().parents[1] / "scripts" / "keep_probes.py"
    spec = importlib.util.spec_from_file_location("keep_probes", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kept = []
    original = Editor.edit_many
    Editor.edit_many = lambda self, pairs, keep=None: kept.append(keep) or original(self, pairs, keep=keep)
    try:
        module.main(["--editor", str(tmp_path / "editor"), "--data", str(tmp_path / "records.json"),
                     "--out", str(tmp_path / "out")])
    finally:
        Editor.edit_many = original
    assert kept == [[("Number 0 is", "odd")], [("Number 1 is", "odd")]]
    rows = [json.loads(line) for line in (tmp_path / "out" / "edits.jsonl").read_text().splitlines()]
    assert [row["case_id"] for row in rows] == ["0", "1"] and all(row["locality_tf_acc"] is not None for row in rows)


def test_facts_to_keep_are_read_in_chunks_with_the_same_result():
    editor = editor_for()
    keep = [NEIGHBOUR, ("Bees make", "honey"), ("Snow is", "cold"), ("Fish live in", "water")]
    whole, _, _ = editor.compute_updates([EDIT], keep=keep)
    editor.configure(edit_chunk=1)
    chunked, _, _ = editor.compute_updates([EDIT], keep=keep)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-6)
