"""Meta-training batches: which records a step sees (per process), and how their rows are laid out."""

from __future__ import annotations

import pytest
import torch

from mend.data.records import EditRecord, Probe
from mend.meta_batch import EditSampler, build_meta_batch, token_kinds
from tiny_models import CharTokenizer


def make_records(n: int, *, locality: bool = True) -> list[EditRecord]:
    return [
        EditRecord(str(i), f"Fact number {i} is", f"t{i}", rephrases=(f"Rephrased {i} is", f"Also {i} is"),
                   locality=(Probe(f"Unrelated {i}", f"a{i}"),) if locality else ())
        for i in range(n)
    ]


def ids(records) -> list[str]:
    return [r.case_id for r in records]


# ---------------------------------------------------------------- EditSampler
def test_sampling_is_a_pure_function_of_seed_step_and_rank():
    records = make_records(12)
    a, b = EditSampler(records, 2, seed=3), EditSampler(records, 2, seed=3)
    for step in (0, 1, 5, 17):
        chosen = a.records_for_step(step)
        assert ids(chosen) == ids(b.records_for_step(step))
        assert a.choose(step, chosen) == b.choose(step, chosen)
    # asking again, or out of order, gives the same answer (a resumed run sees the same batches)
    assert ids(a.records_for_step(5)) == ids(EditSampler(records, 2, seed=3).records_for_step(5))
    assert [ids(EditSampler(records, 2, seed=4).records_for_step(s)) for s in range(6)] != [
        ids(a.records_for_step(s)) for s in range(6)
    ]


def test_processes_get_disjoint_records_in_every_step():
    records = make_records(12)
    rank0, rank1 = (EditSampler(records, 2, seed=0, rank=r, world=2) for r in (0, 1))
    for step in range(9):
        first, second = ids(rank0.records_for_step(step)), ids(rank1.records_for_step(step))
        assert len(first) == len(second) == 2
        assert not set(first) & set(second)


def test_an_epoch_covers_the_records_without_repetition():
    records = make_records(12)
    world, per_step = 2, 2
    samplers = [EditSampler(records, per_step, seed=1, rank=r, world=world) for r in range(world)]
    per_epoch = 12 // (per_step * world)
    for epoch in range(2):
        seen = [i for step in range(epoch * per_epoch, (epoch + 1) * per_epoch)
                for sampler in samplers for i in ids(sampler.records_for_step(step))]
        assert sorted(seen) == sorted(ids(records))
    epoch0 = [ids(samplers[0].records_for_step(s)) for s in range(per_epoch)]
    epoch1 = [ids(samplers[0].records_for_step(s + per_epoch)) for s in range(per_epoch)]
    assert epoch0 != epoch1  # a fresh permutation each epoch


def test_records_left_over_from_an_epoch_are_not_repeated_within_it():
    records = make_records(7)  # 3 steps of 2, one record left over
    sampler = EditSampler(records, 2, seed=0)
    seen = [i for step in range(3) for i in ids(sampler.records_for_step(step))]
    assert len(seen) == len(set(seen)) == 6


def test_choose_picks_a_paraphrase_and_a_locality_probe_of_each_record():
    records = make_records(4)
    sampler = EditSampler(records, 4, seed=0)
    equivalents, localities = sampler.choose(0, records)
    for record, equivalent, probe in zip(records, equivalents, localities):
        assert equivalent in record.rephrases
        assert probe in record.locality
    # no paraphrase: the prompt itself; no locality probe: one from the pool of other records
    bare = EditRecord("x", "Bare prompt", "t")
    equivalents, localities = EditSampler(records + [bare], 1, seed=0).choose(0, [bare])
    assert equivalents == ["Bare prompt"] and localities[0] in [p for r in records for p in r.locality]


def test_too_few_records_or_no_locality_probes_are_errors():
    with pytest.raises(ValueError, match="too few"):
        EditSampler(make_records(3), 2, seed=0, world=2)
    sampler = EditSampler(make_records(4, locality=False), 2, seed=0)
    with pytest.raises(ValueError, match="locality"):
        sampler.choose(0, sampler.records_for_step(0))


def test_same_answer_probes_are_other_neighbours_expecting_the_record_neighbours_answer():
    # records 0-5: neighbours expecting "French" or "guitar" (three each); record 6's answer is unique
    records = [EditRecord(str(i), f"Fact {i} is", f"t{i}",
                          locality=(Probe(f"Neighbour {i} speaks", "French" if i % 2 else "guitar"),)) for i in range(6)]
    records.append(EditRecord("6", "Fact 6 is", "t6", locality=(Probe("Lonely neighbour", "Tagalog"),)))
    sampler = EditSampler(records, 7, seed=0)
    for step in range(5):
        _, probes = sampler.choose(step, records, loc_probes=3, same_answer=1)
        for i, record in enumerate(records[:6]):
            own, hard, _ = probes[3 * i: 3 * i + 3]
            assert own == record.locality[0]
            assert hard.answer == own.answer and hard.prompt != own.prompt
        assert probes[18].prompt == "Lonely neighbour"
        assert probes[19] in sampler.locality_pool  # nothing else expects "Tagalog": any probe stands in
    with pytest.raises(ValueError, match="same_answer"):
        sampler.choose(0, records, loc_probes=2, same_answer=2)


# ---------------------------------------------------------------- build_meta_batch
def decode_rows(tokenizer, batch) -> list[str]:
    return [tokenizer.decode(row[mask.bool()].tolist()) for row, mask in zip(batch.input_ids, batch.attention_mask)]


@pytest.mark.parametrize("n_edits", [1, 2])
def test_meta_batch_rows_and_groups(n_edits):
    tokenizer = CharTokenizer()
    records = make_records(4)
    equivalents = [r.rephrases[1] for r in records]
    localities = [r.locality[0] for r in records]
    batch = build_meta_batch(tokenizer, records, equivalents, localities, max_length=64, n_edits=n_edits)

    edit_rows = [f"{r.prompt} {r.target}" for r in records]
    equiv_rows = [f"{e} {r.target}" for e, r in zip(equivalents, records)]
    loc_rows = [f"{p.prompt} {p.answer}" for p in localities]
    assert (batch.n_edit, batch.n_equiv, batch.n_loc) == (4, 4, 4)
    assert decode_rows(tokenizer, batch.pre) == edit_rows + loc_rows  # pre: edit, locality
    assert decode_rows(tokenizer, batch.post) == edit_rows + equiv_rows + loc_rows  # post: edit, equiv, locality

    expected = torch.arange(4) // n_edits  # consecutive runs of n_edits records form one edit
    assert torch.equal(batch.groups, expected)
    assert batch.n_groups == 4 // n_edits
    assert torch.equal(batch.pre_groups, torch.cat([expected] * 2))
    assert torch.equal(batch.post_groups, torch.cat([expected] * 3))
    assert batch.pre_loss_rows().tolist() == [True] * 4 + [False] * 4


def test_several_locality_probes_per_record_come_record_by_record_own_neighbour_first():
    records = make_records(6)
    sampler = EditSampler(records, 3, seed=0)
    chosen = sampler.records_for_step(2)
    equivalents, one = sampler.choose(2, chosen)
    _, three = sampler.choose(2, chosen, loc_probes=3)
    assert len(three) == 9
    assert [three[3 * i] for i in range(3)] == one  # the first probe of each record is the one loc_probes=1 draws
    assert all(three[3 * i] in r.locality for i, r in enumerate(chosen))
    pool = {probe for r in records for probe in r.locality}
    assert set(three) <= pool

    tokenizer = CharTokenizer()
    batch = build_meta_batch(tokenizer, chosen, equivalents, three, max_length=64)
    assert (batch.n_edit, batch.n_equiv, batch.n_loc) == (3, 3, 9)
    assert torch.equal(batch.locality_groups, torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2]))
    assert torch.equal(batch.pre_groups, torch.cat([torch.arange(3), batch.locality_groups]))
    assert torch.equal(batch.post_groups, torch.cat([torch.arange(3), torch.arange(3), batch.locality_groups]))
    with pytest.raises(ValueError, match="locality probes for 3 records"):
        build_meta_batch(tokenizer, chosen, equivalents, three[:8], max_length=64)


def test_token_kinds_label_each_target_token_by_its_row_kind():
    tokenizer = CharTokenizer()
    records = make_records(3)
    batch = build_meta_batch(tokenizer, records, [r.rephrases[0] for r in records], [r.locality[0] for r in records],
                             max_length=64)
    kinds = token_kinds(batch.post, [batch.n_edit, batch.n_equiv, batch.n_loc])
    assert kinds.shape == batch.post.target_ids.shape
    assert torch.equal(kinds, batch.post.target_rows // 3)  # rows 0-2 edit, 3-5 equivalence, 6-8 locality
    targets = [tokenizer.decode(batch.post.target_ids[kinds == k].tolist()) for k in range(3)]
    assert targets == [" t0 t1 t2", " t0 t1 t2", " a0 a1 a2"]
    pre_kinds = token_kinds(batch.pre, [batch.n_edit, batch.n_loc])
    assert torch.equal(pre_kinds, (batch.pre.target_rows >= 3).long())


def test_meta_batch_moves_to_a_device_whole():
    records = make_records(2)
    batch = build_meta_batch(CharTokenizer(), records, ["a b", "c d"], [r.locality[0] for r in records], max_length=64)
    moved = batch.to("cpu")
    assert torch.equal(moved.post.input_ids, batch.post.input_ids) and torch.equal(moved.groups, batch.groups)
    assert (moved.n_edit, moved.n_equiv, moved.n_loc, moved.n_groups) == (2, 2, 2, 2)


def test_whole_locality_rows_predict_every_probe_token_and_mark_the_answer():
    tokenizer = CharTokenizer()
    records = make_records(3)
    equivalents = [r.rephrases[0] for r in records]
    localities = [r.locality[0] for r in records]
    answer_only = build_meta_batch(tokenizer, records, equivalents, localities, max_length=64)
    whole = build_meta_batch(tokenizer, records, equivalents, localities, max_length=64, whole_locality=True)

    assert torch.equal(whole.post.input_ids, answer_only.post.input_ids)  # the same rows, other targets
    kinds = token_kinds(whole.post, [whole.n_edit, whole.n_equiv, whole.n_loc])
    loc_targets = whole.post.target_ids[kinds == 2]
    # every token after the first one of each probe ("Unrelated 0 a0" less its "U")
    assert tokenizer.decode(loc_targets.tolist()) == "".join(f"{p.prompt} {p.answer}"[1:] for p in localities)
    assert whole.loc_is_answer.shape == loc_targets.shape
    assert tokenizer.decode(loc_targets[whole.loc_is_answer].tolist()) == " a0 a1 a2"
    # edit and equivalence rows keep their targets; the pre-edit pass sees the same locality targets
    old_kinds = token_kinds(answer_only.post, [3, 3, 3])
    assert torch.equal(whole.post.target_ids[kinds < 2], answer_only.post.target_ids[old_kinds < 2])
    pre_kinds = token_kinds(whole.pre, [whole.n_edit, whole.n_loc])
    assert torch.equal(whole.pre.target_ids[pre_kinds == 1], loc_targets)
    assert answer_only.loc_is_answer is None
    assert torch.equal(whole.to("cpu").loc_is_answer, whole.loc_is_answer)
