"""Which weight matrices an editor edits, and how each stores its weight.

Defaults are found from the model's structure: the ``ModuleList`` of transformer blocks (the one with
``config.num_hidden_layers`` entries), then each block's MLP sub-module, then its 2-D projections.
The per-architecture table below only names the MLP sub-module and orders its matrices; a model type
missing from the table falls back to the structural search.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch
from torch import nn

# model_type -> (name of the MLP sub-module inside a block, its matrices in data-flow order)
MLP_LAYOUTS = {
    "gpt2": ("mlp", ("c_fc", "c_proj")),
    "gpt_neo": ("mlp", ("c_fc", "c_proj")),
    "gptj": ("mlp", ("fc_in", "fc_out")),
    "gpt_neox": ("mlp", ("dense_h_to_4h", "dense_4h_to_h")),
    "llama": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "mistral": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen2": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    "qwen3": ("mlp", ("gate_proj", "up_proj", "down_proj")),
    # GeGLU MLP (gelu(gate) * up -> down) between pre- and post-feed-forward RMSNorms
    "gemma3_text": ("mlp", ("gate_proj", "up_proj", "down_proj")),
}
_MLP_NAMES = ("mlp", "feed_forward", "ffn", "ff")


def _conv1d_type():
    from transformers.pytorch_utils import Conv1D

    return Conv1D


def is_transposed(module: nn.Module) -> bool:
    """True when the module stores its weight as (in, out) (GPT-2's Conv1D), False for (out, in)."""
    if isinstance(module, nn.Linear):
        return False
    if isinstance(module, _conv1d_type()):
        return True
    raise TypeError(f"{type(module).__name__} is neither nn.Linear nor Conv1D; cannot edit its weight")


@dataclass(frozen=True)
class EditTarget:
    """One edited matrix.

    Attributes:
        name: the parameter name in ``model.named_parameters()`` (ends in ``.weight``).
        module_name: the owning module's name.
        layer: index of the transformer block it belongs to (-1 when unknown).
        transposed: stored as (d_in, d_out) instead of (d_out, d_in).
        d_in, d_out: the matrix's input and output widths.
    """

    name: str
    module_name: str
    layer: int
    transposed: bool
    d_in: int
    d_out: int

    @property
    def shape_key(self) -> str:
        """Key of the editor network shared by all matrices of this (d_in, d_out) shape."""
        return f"{self.d_in}x{self.d_out}"


def find_blocks(model: nn.Module):
    """Return ``(prefix, ModuleList)`` of the transformer blocks, found from the structure.

    In a multimodal model (e.g. Gemma 3's image-text class) the blocks are the language model's: the
    search keeps to ``model.get_decoder()`` and counts layers by the text config.
    """
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    n_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    in_decoder = {id(module) for module in decoder.modules()}
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers)
        and id(module) in in_decoder
    ]
    if not candidates:
        raise ValueError(
            f"could not find the transformer blocks of {type(model).__name__}: no ModuleList with "
            f"{n_layers} entries; pass model.edit_params explicitly"
        )
    return candidates[0]


def _mlp_of(block: nn.Module, model_type: str):
    if model_type in MLP_LAYOUTS:
        mlp_name, matrix_names = MLP_LAYOUTS[model_type]
        mlp = getattr(block, mlp_name, None)
        if mlp is not None and all(hasattr(mlp, m) for m in matrix_names):
            return mlp_name, list(matrix_names)
    for mlp_name in _MLP_NAMES:
        mlp = getattr(block, mlp_name, None)
        if mlp is None:
            continue
        conv1d = _conv1d_type()
        names = [n for n, m in mlp.named_children() if isinstance(m, (nn.Linear, conv1d))]
        if names:
            return mlp_name, names
    raise ValueError(f"could not find the MLP of block {type(block).__name__}; pass model.edit_params explicitly")


def default_edit_params(model: nn.Module, last_n_blocks: int = 3) -> list[str]:
    """Names of the MLP weight matrices of the last ``last_n_blocks`` transformer blocks."""
    prefix, blocks = find_blocks(model)
    if last_n_blocks > len(blocks):
        raise ValueError(f"cannot edit the last {last_n_blocks} blocks of a model with {len(blocks)}")
    names = []
    for index in range(len(blocks) - last_n_blocks, len(blocks)):
        mlp_name, matrix_names = _mlp_of(blocks[index], model.config.model_type)
        names += [f"{prefix}.{index}.{mlp_name}.{m}.weight" for m in matrix_names]
    return names


def editable_candidates(model: nn.Module) -> list[str]:
    """Every parameter name an editor could edit: 2-D weights of Linear or Conv1D modules."""
    conv1d = _conv1d_type()
    return [
        f"{name}.weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, conv1d)) and module.weight.dim() == 2
    ]


def resolve_targets(model: nn.Module, edit_params=None, last_n_blocks: int = 3) -> list[EditTarget]:
    """Turn parameter names (or the default) into checked `EditTarget`s, in model order."""
    names = list(edit_params) if edit_params else default_edit_params(model, last_n_blocks)
    if len(set(names)) != len(names):
        raise ValueError(f"edit_params lists a parameter twice: {names}")
    parameters = dict(model.named_parameters())
    candidates = editable_candidates(model)
    modules = dict(model.named_modules())
    try:
        prefix = find_blocks(model)[0]
    except ValueError:  # explicit names on a model without a recognisable block list
        prefix = None
    order = {name: i for i, name in enumerate(parameters)}
    targets = []
    for name in names:
        if not isinstance(name, str) or name not in parameters or name not in candidates:
            what = "does not exist" if name not in parameters else "is not a 2-D Linear/Conv1D weight"
            near = difflib.get_close_matches(str(name), candidates, n=5, cutoff=0.5) or candidates[:5]
            raise ValueError(f"edit parameter {name!r} {what}; nearest valid names: {near}")
        module_name = name[: -len(".weight")]
        module = modules[module_name]
        transposed = is_transposed(module)
        weight = module.weight
        d_out, d_in = (weight.shape[1], weight.shape[0]) if transposed else tuple(weight.shape)
        layer = -1
        if prefix is not None and module_name.startswith(prefix + "."):
            head = module_name[len(prefix) + 1 :].split(".", 1)[0]
            layer = int(head) if head.isdigit() else -1
        targets.append(EditTarget(name, module_name, layer, transposed, int(d_in), int(d_out)))
    return sorted(targets, key=lambda t: order[t.name])


def as_out_in(weight_like: torch.Tensor, target: EditTarget) -> torch.Tensor:
    """View a tensor stored in the target's layout as (d_out, d_in)."""
    return weight_like.t() if target.transposed else weight_like


def to_storage(update_out_in: torch.Tensor, target: EditTarget) -> torch.Tensor:
    """Turn a (d_out, d_in) update into the parameter's storage layout."""
    return update_out_in.t() if target.transposed else update_out_in
