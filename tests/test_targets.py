"""Edit targets: which weight matrices an editor edits, and how each stores its weight."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mend.targets import as_out_in, default_edit_params, editable_candidates, is_transposed, resolve_targets, to_storage
from tiny_models import tiny_gemma3_image_text, tiny_model

# family -> (blocks prefix, MLP matrices in data-flow order, stored transposed (GPT-2's Conv1D))
EXPECTED_MLP = {
    "gpt2": ("transformer.h", ["mlp.c_fc", "mlp.c_proj"], True),
    "gptj": ("transformer.h", ["mlp.fc_in", "mlp.fc_out"], False),
    "gpt_neo": ("transformer.h", ["mlp.c_fc", "mlp.c_proj"], False),
    "gpt_neox": ("gpt_neox.layers", ["mlp.dense_h_to_4h", "mlp.dense_4h_to_h"], False),
    "llama": ("model.layers", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], False),
    "mistral": ("model.layers", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], False),
    "qwen2": ("model.layers", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], False),
    "gemma3": ("model.layers", ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], False),
}
N_LAYERS = 4  # every tiny model has 4 blocks


def expected_names(family, blocks):
    prefix, matrices, _ = EXPECTED_MLP[family]
    return [f"{prefix}.{i}.{m}.weight" for i in blocks for m in matrices]


# ---------------------------------------------------------------- defaults, found by structure
def test_default_targets_are_the_mlp_matrices_of_the_last_three_blocks(family, tiny):
    model, _ = tiny
    targets = resolve_targets(model)
    assert [t.name for t in targets] == expected_names(family, [1, 2, 3])
    assert [t.layer for t in targets] == [i for i in (1, 2, 3) for _ in EXPECTED_MLP[family][1]]


def test_default_targets_record_layout_and_widths(family, tiny):
    model, _ = tiny
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    transposed = EXPECTED_MLP[family][2]
    for target in resolve_targets(model):
        weight = params[target.name]
        assert target.transposed is transposed
        assert target.module_name + ".weight" == target.name
        assert modules[target.module_name].weight is weight
        # (d_out, d_in) is the shape of the matrix acting as y = W u
        assert tuple(as_out_in(weight, target).shape) == (target.d_out, target.d_in)
        assert target.shape_key == f"{target.d_in}x{target.d_out}"


def test_gpt2_conv1d_weight_is_stored_in_by_out():
    model, _ = tiny_model("gpt2")
    fc = resolve_targets(model)[0]  # c_fc: hidden 32 -> 4*32
    assert (fc.d_in, fc.d_out, fc.transposed) == (32, 128, True)
    assert tuple(dict(model.named_parameters())[fc.name].shape) == (32, 128)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("n", [1, 2, 4])
def test_last_n_blocks_selects_that_many_blocks(family, tiny, n):
    model, _ = tiny
    names = [t.name for t in resolve_targets(model, last_n_blocks=n)]
    assert names == expected_names(family, range(N_LAYERS - n, N_LAYERS))


def test_more_blocks_than_the_model_has_is_refused():
    model, _ = tiny_model("gpt2")
    with pytest.raises(ValueError, match="4"):
        default_edit_params(model, last_n_blocks=5)


def test_an_image_text_model_edits_its_language_model_not_its_vision_tower():
    model, _ = tiny_gemma3_image_text()
    names = default_edit_params(model)
    assert names == [f"model.language_model.layers.{i}.mlp.{m}.weight" for i in (1, 2, 3)
                     for m in ("gate_proj", "up_proj", "down_proj")]
    assert [t.layer for t in resolve_targets(model)] == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_unknown_model_type_falls_back_to_the_structural_search(family, tiny):
    model, _ = tiny
    expected = default_edit_params(model)
    model.config.model_type = "brand_new_arch"  # not in the per-architecture table
    assert default_edit_params(model) == expected


# ---------------------------------------------------------------- explicit edit_params
@pytest.mark.parametrize(
    "family, names",
    [
        ("gpt2", ["transformer.h.0.attn.c_attn.weight", "transformer.h.2.mlp.c_proj.weight"]),
        ("llama", ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.mlp.down_proj.weight"]),
        ("gpt_neox", ["gpt_neox.layers.1.attention.query_key_value.weight"]),
        ("gemma3", ["model.layers.0.self_attn.o_proj.weight", "model.layers.2.mlp.gate_proj.weight"]),
    ],
)
def test_explicit_edit_params_override_the_default(family, tiny, names):
    model, _ = tiny
    targets = resolve_targets(model, list(reversed(names)))
    assert [t.name for t in targets] == names  # in model order, whatever order they were given in
    assert [t.layer for t in targets] == [int(n.split(".")[2]) for n in names]


@pytest.mark.parametrize(
    "family, bad, why",
    [
        ("gpt2", "transformer.h.3.mlp.c_fcc.weight", "does not exist"),  # typo
        ("gpt2", "transformer.h.9.mlp.c_fc.weight", "does not exist"),  # no such block
        ("gpt2", "transformer.h.3.ln_2.weight", "not a 2-D"),  # layernorm weight (1-D)
        ("gpt2", "transformer.h.3.mlp.c_fc.bias", "not a 2-D"),  # a bias
        ("gpt2", "transformer.wte.weight", "not a 2-D"),  # 2-D, but an embedding, not a projection
        ("llama", "model.layers.3.post_attention_layernorm.weight", "not a 2-D"),
        ("llama", "model.layers.3.mlp.up.weight", "does not exist"),
        ("gpt_neox", "gpt_neox.layers.3.mlp.dense_h_to_4h.bias", "not a 2-D"),
        ("gemma3", "model.layers.3.pre_feedforward_layernorm.weight", "not a 2-D"),
        ("gemma3", "model.embed_tokens.weight", "not a 2-D"),  # the (tied) scaled embedding
    ],
)
def test_invalid_edit_params_are_refused_with_valid_candidates(family, tiny, bad, why):
    model, _ = tiny
    candidates = editable_candidates(model)
    with pytest.raises(ValueError, match=why) as info:
        resolve_targets(model, [bad])
    message = str(info.value)
    assert repr(bad) in message
    assert any(candidate in message for candidate in candidates), message


def test_the_nearest_valid_name_is_suggested_for_a_typo():
    model, _ = tiny_model("llama")
    with pytest.raises(ValueError, match=r"model\.layers\.3\.mlp\.down_proj\.weight"):
        resolve_targets(model, ["model.layers.3.mlp.down_prj.weight"])


def test_a_parameter_listed_twice_is_refused():
    model, _ = tiny_model("gpt2")
    name = "transformer.h.3.mlp.c_fc.weight"
    with pytest.raises(ValueError, match="twice"):
        resolve_targets(model, [name, name])


def test_candidates_are_exactly_the_linear_and_conv1d_weights(family, tiny):
    from transformers.pytorch_utils import Conv1D

    model, _ = tiny
    params = dict(model.named_parameters())
    candidates = editable_candidates(model)
    expected = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    assert candidates == expected
    assert all(name.endswith(".weight") for name in candidates)
    assert all(params[name].dim() == 2 for name in candidates if name in params)


# ---------------------------------------------------------------- weight layout helpers
def test_layout_is_decided_by_module_type():
    from transformers.pytorch_utils import Conv1D

    assert is_transposed(nn.Linear(3, 5)) is False
    assert is_transposed(Conv1D(5, 3)) is True
    with pytest.raises(TypeError, match="Embedding"):
        is_transposed(nn.Embedding(4, 3))


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_an_out_in_update_lands_in_the_storage_layout(family, tiny):
    model, _ = tiny
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    target = resolve_targets(model)[0]
    update = torch.randn(target.d_out, target.d_in)  # (d_out, d_in)
    stored = to_storage(update, target)
    assert stored.shape == params[target.name].shape
    assert torch.equal(as_out_in(stored, target), update)
    # The module really computes y = (W + dW) u with dW the (d_out, d_in) update.
    module = modules[target.module_name]
    u = torch.randn(2, target.d_in)
    before = module(u)
    with torch.no_grad():
        params[target.name].add_(stored)
    torch.testing.assert_close(module(u) - before, u @ update.t(), rtol=1e-4, atol=1e-5)
