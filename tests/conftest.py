"""Shared fixtures: seeding, the table of tiny model families, and the autograd reference gradient."""

from __future__ import annotations

import copy
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `from tiny_models import tiny_model`

from tiny_models import tiny_model  # noqa: E402

from mend.scoring import mean_nll, target_logits  # noqa: E402

# Every architecture family mend supports, each as a tiny randomly initialised model.
FAMILIES = ["gpt2", "gptj", "gpt_neo", "gpt_neox", "llama", "mistral", "qwen2", "gemma3"]

torch.set_num_threads(1)  # tiny models; keep CPU use modest and results reproducible


@pytest.fixture(autouse=True)
def seed():
    """Every test starts from the same random state."""
    random.seed(0)
    torch.manual_seed(0)
    yield


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    """One tiny model family per test instance (override with @pytest.mark.parametrize('family', ...))."""
    return request.param


@pytest.fixture
def tiny(family):
    """``(model, tokenizer)``: a fresh tiny model of ``family`` (frozen, eval mode) and a CharTokenizer."""
    return tiny_model(family)


def snapshot(model) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer of ``model``."""
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def changed_tensors(model, saved: dict[str, torch.Tensor]) -> list[str]:
    """Names of the tensors of ``model`` that are not bit-for-bit what ``snapshot`` recorded."""
    current = model.state_dict()
    assert set(saved) <= set(current)
    return [name for name, tensor in saved.items() if not torch.equal(current[name], tensor)]


@pytest.fixture
def unchanged():
    """``check = unchanged(model)`` records every tensor of ``model``; ``check()`` then asserts that
    all of them are still bit-for-bit the same. ``unchanged(model, ignore=names)`` skips ``names``."""

    def record(model, ignore=()):
        saved = {name: tensor for name, tensor in snapshot(model).items() if name not in set(ignore)}

        def check():
            changed = changed_tensors(model, saved)
            assert not changed, f"tensors changed: {changed}"

        return check

    return record


@pytest.fixture
def autograd_gradients():
    """``f(model, names, batch) -> (loss, {name: dL/dW})``: the reference gradient of the edit loss
    (mean NLL over the batch's target tokens), by plain autograd on a deep copy of the model whose
    ``names`` parameters require grad. Gradients are in the parameter's storage layout."""

    def compute(model, names, batch):
        reference = copy.deepcopy(model)
        params = dict(reference.named_parameters())
        for name in names:
            params[name].requires_grad_(True)
        loss = mean_nll(target_logits(reference, batch), batch.target_ids)
        loss.backward()
        return loss.detach(), {name: params[name].grad.detach().clone() for name in names}

    return compute
