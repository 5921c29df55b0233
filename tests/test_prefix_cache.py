"""The prefix cache: starting at the lowest edited block gives what the full forward gives, a training
step from the cache equals one without it, and any change of what the states depend on is a new cache."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FAMILIES
from mend.batching import encode_pairs
from mend.config import load_config
from mend.meta_batch import EditSampler, build_meta_batch
from mend.networks import MendNetworks
from mend.objective import meta_objective
from mend.prefix_cache import PrefixCache, training_rows
from mend.prefix_forward import lowest_edited_block, probe_block_output, starting_at_block
from mend.scoring import target_logits
from mend.targets import find_blocks, resolve_targets
from tiny_models import tiny_model, tiny_records

PROMPTS = ["Paris is the capital of", "The sky is", "Number 3 is"]
ANSWERS = ["Rome", "green and blue", "odd"]


def build_cache(model, tokenizer, records, tmp_path, start, **kwargs):
    return PrefixCache.build_or_load(model, tokenizer, training_rows(records), start=start, max_length=64,
                                     directory=tmp_path, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_starting_at_the_lowest_edited_block_gives_the_full_forward_logits(family, side, tmp_path):
    model, tokenizer = tiny_model(family)
    start = lowest_edited_block(resolve_targets(model, None, 3))
    assert start == 1
    records = [r for r in tiny_records()]
    rows = [(p, a) for p, a in zip(PROMPTS, ANSWERS)]
    cache = PrefixCache.build_or_load(model, tokenizer, rows + training_rows(records), start=start, max_length=64,
                                      directory=tmp_path)
    batch = encode_pairs(tokenizer, PROMPTS, ANSWERS, padding_side=side)
    full = target_logits(model, batch)
    with starting_at_block(model, start, cache.gather(batch), cache.block_output):
        cached = target_logits(model, batch)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)
    # the real blocks are back afterwards
    assert all(type(b).__name__ != "_SkippedBlock" for b in model.modules())


def one_step(model, tokenizer, records, cfg, cache):
    targets = resolve_targets(model, None, 3)
    torch.manual_seed(0)
    networks = MendNetworks(targets, cfg.editor).train()
    sampler = EditSampler(records, 4, seed=0)
    chosen = sampler.records_for_step(0)
    equivalents, localities = sampler.choose(0, chosen)
    batch = build_meta_batch(tokenizer, chosen, equivalents, localities, max_length=64, n_edits=1, prefix_cache=cache)
    out = meta_objective(model, networks, batch, c_edit=1.0, c_loc=1.0)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in networks.named_parameters() if p.grad is not None}
    return out, grads, {n: b.clone() for n, b in networks.named_buffers()}


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_training_step_from_the_cache_equals_one_without(family, tmp_path):
    model, tokenizer = tiny_model(family)
    records = tiny_records()
    cfg = load_config(["editor.rank=8", "editor.init_lr=0.5"])
    cache = build_cache(model, tokenizer, records, tmp_path, start=1)
    plain, plain_grads, plain_stats = one_step(model, tokenizer, records, cfg, None)
    cached, cached_grads, cached_stats = one_step(model, tokenizer, records, cfg, cache)
    torch.testing.assert_close(cached.loss, plain.loss, atol=1e-5, rtol=1e-5)
    for key in plain.metrics:
        torch.testing.assert_close(cached.metrics[key], plain.metrics[key], atol=1e-5, rtol=1e-5)
    assert set(cached_grads) == set(plain_grads) and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(cached_grads[name], plain_grads[name], atol=1e-4, rtol=1e-4)
    for name in plain_stats:
        torch.testing.assert_close(cached_stats[name], plain_stats[name], atol=1e-5, rtol=1e-5)
    assert plain.loss.item() > 0 and any(g.abs().sum() > 0 for g in plain_grads.values())


def test_every_row_a_run_can_draw_is_cached(tmp_path):
    model, tokenizer = tiny_model("llama")
    records = tiny_records()
    cache = build_cache(model, tokenizer, records, tmp_path, start=1)
    assert len(cache) == len(records) * 3  # edit, paraphrase and locality rows, all distinct
    sampler = EditSampler(records, 4, seed=0)
    for step in range(4):
        chosen = sampler.records_for_step(step)
        build_meta_batch(tokenizer, chosen, *sampler.choose(step, chosen), max_length=64, prefix_cache=cache)
    with pytest.raises(KeyError, match="not in the prefix cache"):
        cache.gather(encode_pairs(tokenizer, ["Never seen"], ["before"]))


def test_a_second_run_reuses_the_file_and_reads_the_same_states(tmp_path):
    model, tokenizer = tiny_model("gpt2")
    records = tiny_records()
    first = build_cache(model, tokenizer, records, tmp_path, start=1)
    second = build_cache(model, tokenizer, records, tmp_path, start=1)
    mapped = build_cache(model, tokenizer, records, tmp_path, start=1, placement="disk")
    assert first.info.build_seconds is not None and second.info.build_seconds is None
    assert second.info.path == first.info.path and len(list(tmp_path.glob("*.safetensors"))) == 1
    assert torch.equal(second.hidden, first.hidden) and torch.equal(mapped.hidden, first.hidden)
    assert mapped.info.placement.startswith("disk")


def test_half_precision_storage_is_an_option(tmp_path):
    model, tokenizer = tiny_model("llama")
    records = tiny_records()
    full = build_cache(model, tokenizer, records, tmp_path, start=1)
    half = build_cache(model, tokenizer, records, tmp_path, start=1, dtype="bfloat16", placement="disk")
    assert half.hidden.dtype == torch.bfloat16 and half.info.path != full.info.path
    torch.testing.assert_close(half.hidden.float(), full.hidden, atol=0.05, rtol=0.02)


def key_of(model, tokenizer, records, tmp_path, **kwargs):
    options = dict(start=1, max_length=64)
    options.update(kwargs)
    return PrefixCache.build_or_load(model, tokenizer, training_rows(records), directory=tmp_path, **options).info.path


def test_any_change_of_what_the_states_depend_on_is_a_new_cache(tmp_path):
    model, tokenizer = tiny_model("llama")
    records = tiny_records()
    base = key_of(model, tokenizer, records, tmp_path)
    assert key_of(model, tokenizer, records, tmp_path) == base
    # the data
    assert key_of(model, tokenizer, records[:-1], tmp_path) != base
    assert key_of(model, tokenizer, records, tmp_path, data_hashes=["another file"]) != base
    # max_length and the first edited block
    assert key_of(model, tokenizer, records, tmp_path, max_length=63) != base
    assert key_of(model, tokenizer, records, tmp_path, start=2) != base
    # the weights below the edited blocks (one element of block 0)
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.model.layers[0].mlp.down_proj.weight[0, 0] += 1e-3
    assert key_of(changed, tokenizer, records, tmp_path) != base
    # ... but not the weights of the edited blocks, which the states do not depend on
    upper = copy.deepcopy(model)
    with torch.no_grad():
        upper.model.layers[2].mlp.down_proj.weight[0, 0] += 1.0
    assert key_of(upper, tokenizer, records, tmp_path) == base


def test_the_tokenizer_is_part_of_the_key(tmp_path):
    from tiny_models import CharTokenizer

    class ShiftedTokenizer(CharTokenizer):
        def __call__(self, text, add_special_tokens=True, **kwargs):
            return {"input_ids": [4 + b for b in text.encode("utf-8")]}

    model, tokenizer = tiny_model("llama")
    records = tiny_records()
    assert key_of(model, ShiftedTokenizer(), records, tmp_path) != key_of(model, tokenizer, records, tmp_path)


def test_a_cache_that_cannot_fit_in_memory_is_refused_before_building(tmp_path, monkeypatch):
    import mend.prefix_cache as prefix_cache

    model, tokenizer = tiny_model("llama")
    monkeypatch.setattr(prefix_cache, "available_memory_bytes", lambda: 1000)
    with pytest.raises(prefix_cache.PrefixCacheError, match="prefix_cache=disk"):
        build_cache(model, tokenizer, tiny_records(), tmp_path, start=1, placement="memory")
    assert not list(tmp_path.glob("*.safetensors"))
    assert build_cache(model, tokenizer, tiny_records(), tmp_path, start=1).info.placement.startswith("disk")


def test_edits_in_block_zero_have_no_prefix_to_cache():
    model, _ = tiny_model("llama")
    assert lowest_edited_block(resolve_targets(model, None, 4)) is None
    assert lowest_edited_block(resolve_targets(model, ["lm_head.weight"])) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_the_stand_in_block_returns_what_the_real_block_returns(family):
    model, _ = tiny_model(family)
    seen = []
    handle = model.get_submodule(find_blocks(model)[0] + ".1").register_forward_hook(
        lambda module, args, output: seen.append(output))
    with torch.no_grad():
        model(input_ids=torch.tensor([[5, 6, 7]]))
    handle.remove()
    real = seen[0]
    expected = 0 if isinstance(real, torch.Tensor) else len(real)  # a bare tensor, or (hidden, ...) as in GPT-Neo
    assert probe_block_output(model, 2).tuple_length == expected


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_preserved_moments_start_from_the_cache_and_equal_the_full_forward(family, tmp_path, monkeypatch):
    from mend import prefix_forward
    from mend.memory import answer_key_moments, key_moments
    from mend.preserved import locality_pairs, locality_texts

    model, tokenizer = tiny_model(family)
    targets = resolve_targets(model, None, 3)
    records = tiny_records()
    cache = build_cache(model, tokenizer, records, tmp_path, lowest_edited_block(targets))
    texts, pairs = locality_texts(records) + ["a text no row holds"], locality_pairs(records)
    runs = []
    real = prefix_forward.starting_at_block

    def counting(*args, **kwargs):
        runs.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prefix_forward, "starting_at_block", counting)
    for moments in (key_moments, answer_key_moments):
        inputs = texts if moments is key_moments else pairs
        full = moments(model, targets, tokenizer, inputs, max_length=64)
        assert not runs
        cached = moments(model, targets, tokenizer, inputs, max_length=64, batch_size=2, prefix_cache=cache)
        assert runs, "no batch started from the prefix cache"
        runs.clear()
        assert set(cached) == set(full)
        for name in full:
            torch.testing.assert_close(cached[name], full[name], rtol=1e-4, atol=1e-6, msg=name)
    # a cache that starts above a target's block would skip the block that target reads: not used
    above = build_cache(model, tokenizer, records, tmp_path / "above", lowest_edited_block(targets) + 1)
    full = key_moments(model, targets, tokenizer, texts, max_length=64)
    assert key_moments(model, targets, tokenizer, texts, max_length=64, prefix_cache=above).keys() == full.keys()
    assert not runs
