"""Weight fingerprints: a light fine-tune of the base model is refused, a dtype cast of it is not."""

from __future__ import annotations

import pytest
import torch

from mend import CheckpointError, Editor
from mend.fingerprint import N_PROJECTIONS, _signs, fingerprint, mismatch
from tiny_models import tiny_model

PERTURBED = "model.layers.3.mlp.down_proj.weight"  # llama; one of the editor's matrices


def untrained_editor(family="llama"):
    return Editor.untrained(*tiny_model(family), {"editor": {"rank": 4}})


def add_relative_noise(weight: torch.Tensor, relative: float, seed: int = 1) -> None:
    """weight += N(0, (relative * rms(weight))^2), in place."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(weight.shape, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        weight.add_((noise * relative * weight.double().pow(2).mean().sqrt()).to(weight.dtype))


# ---------------------------------------------------------------- the fingerprint itself
def test_the_projection_vectors_are_a_fixed_function_of_the_shape():
    # Python's Mersenne Twister is stable across versions; these are its first bits for this seed
    assert _signs(12, 7).tolist() == _signs(12, 7).tolist()
    assert _signs(12, 7).tolist() == [-1.0, 1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -1.0, 1.0, -1.0]
    weight = torch.randn(6, 5)
    assert fingerprint(weight) == fingerprint(weight.clone())
    assert len(fingerprint(weight)["projections"]) == N_PROJECTIONS


@pytest.mark.parametrize("relative, dtype, accepted", [
    (0.0, torch.float32, True),
    (1e-3, torch.float32, False),  # a light fine-tune
    (1e-5, torch.float32, False),
    (0.0, torch.bfloat16, True),  # the same weights, cast
    (0.0, torch.float16, True),
    (0.05, torch.bfloat16, False),  # beyond what rounding to bf16 explains
])
def test_a_fingerprint_tolerates_rounding_to_a_dtype_and_nothing_more(relative, dtype, accepted):
    weight = torch.randn(48, 32) * 0.02
    saved = fingerprint(weight)
    other = weight.clone()
    add_relative_noise(other, relative)
    other = other.to(dtype)
    assert (mismatch(other, saved) is None) == accepted, mismatch(other, saved)


def test_a_wrong_shape_or_scale_is_a_mismatch():
    weight = torch.randn(48, 32)
    assert mismatch(weight * 1.01, fingerprint(weight)) is not None
    assert mismatch(weight.t().contiguous(), fingerprint(weight)) is not None
    assert mismatch(torch.full((48, 32), float("nan")), fingerprint(weight)) is not None


# ---------------------------------------------------------------- Editor.load
@pytest.mark.parametrize("family, name", [("llama", PERTURBED), ("gpt2", "transformer.h.3.mlp.c_proj.weight")])
def test_a_copy_with_one_matrix_perturbed_by_1e_3_relative_noise_is_refused(tmp_path, family, name):
    path = untrained_editor(family).save(tmp_path / "editor")
    model, tokenizer = tiny_model(family)  # the same weights ...
    add_relative_noise(dict(model.named_parameters())[name], 1e-3)  # ... but lightly changed in one matrix
    with pytest.raises(CheckpointError, match=f"{name}: weights differ") as info:
        Editor.load(path, model, tokenizer)
    assert "random projections" in str(info.value) or "norm" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_cast_of_the_same_weights_is_accepted_both_ways(tmp_path, dtype):
    path = untrained_editor().save(tmp_path / "fp32")
    model, tokenizer = tiny_model("llama")
    Editor.load(path, model.to(dtype), tokenizer)  # saved in float32, loaded on a cast
    path = Editor.untrained(model, tokenizer, {"editor": {"rank": 4}}).save(tmp_path / "cast")
    Editor.load(path, *tiny_model("llama"))  # saved on the cast, loaded in float32


def test_checkpoints_with_the_older_sum_fingerprint_still_load(tmp_path):
    import yaml

    editor = untrained_editor()
    path = editor.save(tmp_path / "editor")
    meta = yaml.safe_load((path / "editor.yaml").read_text())
    params = dict(editor.model.named_parameters())
    for target in meta["targets"]:
        w = params[target["name"]].double()
        target["fingerprint"] = [float(w.sum()), float((w * w).sum())]
    (path / "editor.yaml").write_text(yaml.safe_dump(meta))
    Editor.load(path, *tiny_model("llama"))
    with pytest.raises(CheckpointError, match="weights differ"):
        Editor.load(path, *tiny_model("llama", seed=2))
