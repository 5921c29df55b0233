"""CUDA: an edit on the GPU is the CPU's edit, bf16 meta-training is sound, reverting is exact.

Run with ``python -m pytest -q -m gpu``; every test here is skipped where CUDA is not available.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mend import Editor
from mend.meta_batch import build_meta_batch
from mend.networks import MendNetworks
from mend.objective import meta_objective
from mend.targets import resolve_targets
from tiny_models import tiny_model, tiny_records

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

PAIRS = [("The Eiffel Tower is in", "Rome"), ("Water boils at", "42 degrees")]
CONFIG = {"editor": {"rank": 8, "init_lr": 0.5}}


@pytest.fixture(autouse=True)
def exact_cuda_matmuls():
    """No TF32 on CUDA while comparing with the CPU (float32 matmuls in full precision)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def trained_looking(editor: Editor) -> Editor:
    """Give the editor non-identity networks, the same on every device (seeded, on the CPU)."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for network in editor.networks.networks.values():
            for block in network.blocks:
                block.up.weight.copy_(torch.randn(block.up.weight.shape, generator=generator) * 0.05)
    return editor


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_an_edit_on_cuda_equals_the_edit_on_cpu(family):
    cpu = trained_looking(Editor.untrained(*tiny_model(family), CONFIG))
    model, tokenizer = tiny_model(family)
    cuda = trained_looking(Editor.untrained(model.to("cuda"), tokenizer, CONFIG))
    assert cuda.device.type == "cuda" and next(cuda.networks.parameters()).device.type == "cuda"

    updates_cpu, _, loss_cpu = cpu.compute_updates(PAIRS)
    updates_cuda, _, loss_cuda = cuda.compute_updates(PAIRS)
    assert loss_cuda == pytest.approx(loss_cpu, rel=1e-5)
    for name, update in updates_cpu.items():
        torch.testing.assert_close(updates_cuda[name].cpu(), update, rtol=1e-4, atol=1e-6)

    cpu.edit_many(PAIRS)
    cuda.edit_many(PAIRS)
    cuda_params = dict(cuda.model.named_parameters())
    for name, param in cpu.model.named_parameters():
        torch.testing.assert_close(cuda_params[name].cpu(), param, rtol=1e-5, atol=1e-6)


def test_revert_is_bit_exact_on_cuda():
    model, tokenizer = tiny_model("llama")
    editor = trained_looking(Editor.untrained(model.to("cuda"), tokenizer, CONFIG))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    first = editor.edit(*PAIRS[0])
    second = editor.edit(*PAIRS[1])
    third = editor.edit(*PAIRS[0])  # the same fact again: a result of its own
    assert first.changed and second.changed
    editor.revert(second)
    editor.revert(first)
    assert editor.applied == [third]
    editor.revert()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def _meta_step(model, networks, tokenizer, bf16: bool):
    records = tiny_records(4)
    batch = build_meta_batch(tokenizer, records, [r.equivalents[0] for r in records],
                             [r.locality[0] for r in records], max_length=64).to("cuda")
    networks.zero_grad(set_to_none=True)
    out = meta_objective(model, networks, batch, c_edit=1.0, c_loc=1.0, bf16=bf16)
    out.loss.backward()
    grads = torch.cat([p.grad.reshape(-1) for p in networks.parameters() if p.grad is not None])
    return out.loss.detach().float(), grads.float()


def test_a_bf16_training_step_is_finite_and_close_to_float32():
    model, tokenizer = tiny_model("llama")
    model.to("cuda")
    torch.manual_seed(0)
    networks = MendNetworks(resolve_targets(model, None, 2), {"rank": 8, "init_lr": 0.5}).to("cuda").train()
    with torch.no_grad():  # non-identity networks, so every parameter gets a gradient
        for network in networks.networks.values():
            for block in network.blocks:
                block.up.weight.normal_(0, 0.05)
    snapshot = copy.deepcopy(networks.state_dict())
    loss32, grads32 = _meta_step(model, networks, tokenizer, bf16=False)
    networks.load_state_dict(snapshot)  # the same running statistics for the second pass
    loss16, grads16 = _meta_step(model, networks, tokenizer, bf16=True)

    assert torch.isfinite(loss16) and torch.isfinite(grads16).all()
    assert float(loss16) == pytest.approx(float(loss32), rel=0.05)
    cosine = torch.nn.functional.cosine_similarity(grads16, grads32, dim=0)
    assert cosine > 0.9, float(cosine)
    assert float(grads16.norm()) == pytest.approx(float(grads32.norm()), rel=0.25)


def test_an_editor_saved_on_cpu_loads_on_a_cuda_model(tmp_path):
    path = Editor.untrained(*tiny_model("llama"), CONFIG).save(tmp_path / "editor")
    model, tokenizer = tiny_model("llama")
    loaded = Editor.load(path, model.to("cuda"), tokenizer)
    assert next(loaded.networks.parameters()).device.type == "cuda"
    loaded.revert(loaded.edit(*PAIRS[0]))
