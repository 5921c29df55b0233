"""Integration tests on the real Gemma 3 270M (base), the second embedded model: a GGUF split across
five wheels, joined into the cache, dequantised once into safetensors. Loaded once per module;
skipped when the wheels are not installed."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

import mend
from conftest import changed_tensors, snapshot
from mend.batching import encode_pairs
from mend.embedded import EMBEDDED_MODELS
from mend.scoring import mean_nll, target_logits

pytestmark = pytest.mark.slow

GEMMA3 = EMBEDDED_MODELS["gemma3-270m"]
MISSING = [pip for pip, package in zip(GEMMA3.pip_names, (GEMMA3.package, *GEMMA3.parts))
           if importlib.util.find_spec(package) is None]
PROMPT, TARGET = "The Eiffel Tower is located in the city of", "Rome"
DEFAULT_TARGETS = [f"model.layers.{layer}.mlp.{proj}.weight" for layer in (15, 16, 17)
                   for proj in ("gate_proj", "up_proj", "down_proj")]


@pytest.fixture(scope="module")
def gemma3():
    """``(model, tokenizer)`` of Gemma 3 270M, loaded once for the module."""
    if MISSING:
        pytest.skip(f"Gemma 3 270M is not installed ({', '.join(MISSING)} missing): {GEMMA3.pip_command}")
    return mend.load_base_model("gemma3-270m")


def target_probability(model, tokenizer, prompt: str, target: str) -> float:
    """exp(-mean NLL) of the target's tokens after the prompt."""
    batch = encode_pairs(tokenizer, [prompt], [target])
    with torch.no_grad():
        return math.exp(-float(mean_nll(target_logits(model, batch), batch.target_ids)))


def test_it_loads_as_the_text_only_causal_lm(gemma3):
    from transformers import Gemma3ForCausalLM

    model, tokenizer = gemma3
    assert isinstance(model, Gemma3ForCausalLM)  # not the image-text Gemma3ForConditionalGeneration
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("gemma3_text", 18, 640)
    assert config.layer_types.count("full_attention") == 3 and config.sliding_window == 512
    assert config.final_logit_softcapping is None and config.attn_logit_softcapping is None
    assert model.get_input_embeddings().num_embeddings == 262_144
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied
    assert float(model.get_input_embeddings().embed_scale) == pytest.approx(640**0.5)
    assert config.name_or_path == "gemma3-270m"
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert tokenizer.is_fast and tokenizer("Paris is")["input_ids"][0] == tokenizer.bos_token_id


def test_target_logits_are_the_full_forward_at_the_target_positions(gemma3):
    """A boolean ``logits_to_keep`` projects only the target positions onto the 262k vocabulary."""
    model, tokenizer = gemma3
    batch = encode_pairs(tokenizer, [PROMPT, "The capital of Italy is"], [TARGET, "Berlin"])
    with torch.no_grad():
        kept = target_logits(model, batch)
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                     position_ids=batch.position_ids, use_cache=False).logits
    assert kept.shape == (int(batch.prediction_mask.sum()), 262_144)
    torch.testing.assert_close(kept, full[batch.prediction_mask], rtol=1e-4, atol=1e-4)


def test_an_edit_raises_the_target_probability_and_reverts_bit_for_bit(gemma3):
    model, tokenizer = gemma3
    editor = mend.Editor.untrained(model, tokenizer)  # identity networks: one gradient step of init_lr 1e-4
    assert [t.name for t in editor.targets] == DEFAULT_TARGETS
    before = snapshot(model)
    p_before = target_probability(model, tokenizer, PROMPT, TARGET)
    result = editor.edit(PROMPT, TARGET)
    p_after = target_probability(model, tokenizer, PROMPT, TARGET)
    assert sorted(changed_tensors(model, before)) == sorted(DEFAULT_TARGETS) == sorted(result.changed)
    assert p_after > 10 * p_before, (p_before, p_after)
    editor.revert()
    assert changed_tensors(model, before) == []
