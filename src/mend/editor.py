"""The editor API: apply fact edits to a base model in one pass, inspect them, revert them exactly.

    model, tokenizer = mend.load_base_model("smollm2-135m")
    editor = mend.Editor.untrained(model, tokenizer)        # or mend.Editor.load("runs/x/best")
    result = editor.edit("The Eiffel Tower is in", "Rome")  # one forward/backward + one editor pass
    editor.revert()                                           # weights back bit for bit
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .batching import check_pairs, encode_pairs
from .capture import capture_rank1
from .checkpoint import CheckpointError, atomic_write_dir, recover_dir, load_tensors, load_yaml, save_tensors, save_yaml
from .config import ModelConfig, editor_config
from .fingerprint import fingerprint, legacy_mismatch, mismatch
from .models import load_base_model, model_identity
from .networks import MendNetworks, update_from
from .targets import EditTarget, resolve_targets, to_storage

FORMAT_VERSION = 1
WEIGHTS_FILE = "editor.safetensors"
CONFIG_FILE = "editor.yaml"


class EditFailedError(RuntimeError):
    """The editor produced an unusable update (NaN or inf); the model was left unchanged."""


@dataclass(eq=False)
class EditResult:
    """What one call of `Editor.edit` / `Editor.edit_many` did. Results compare by identity: two edits
    of the same fact are two results, and `Editor.revert` undoes exactly the one it is given.

    Attributes:
        edit_id: sequence number of the edit within its editor.
        pairs: the (prompt, target) pairs applied together.
        changed: names of the matrices that changed.
        update_norms: Frobenius norm of each matrix's update.
        loss: the edit loss (mean target NLL) before the edit.
        seconds: wall time of the whole edit (forward, backward, editor pass, apply).
    """

    edit_id: int
    pairs: list[tuple[str, str]]
    changed: list[str]
    update_norms: dict[str, float]
    loss: float
    seconds: float
    _factors: dict = field(default_factory=dict, repr=False)


def _update_norm(u_t: torch.Tensor, delta_t: torch.Tensor, lr: torch.Tensor) -> float:
    """||lr * delta~^T u~||_F from the factors alone: sqrt(sum((U U^T) * (D D^T))) is (N, N) work."""
    gram = (u_t @ u_t.t()) * (delta_t @ delta_t.t())  # (N, N)
    return float(lr.abs() * gram.sum().clamp(min=0).sqrt())


class Editor:
    """A base model, its tokenizer and MEND editor networks; edits the model's weights in place."""

    def __init__(self, model, tokenizer, networks: MendNetworks, *, max_length: int = 128, model_config=None):
        self.model = model
        self.tokenizer = tokenizer
        self.networks = networks.to(self.device)
        self.max_length = int(max_length)
        self.model_config = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_config or {})
        self.targets: list[EditTarget] = networks.targets
        self._params = dict(model.named_parameters())
        self._originals: dict[str, torch.Tensor] | None = None
        self._applied: list[EditResult] = []
        self._ids = itertools.count()
        self.fingerprints = {t.name: fingerprint(self._params[t.name]) for t in self.targets}

    # ------------------------------------------------------------------ construction
    @classmethod
    def untrained(cls, model, tokenizer, config=None) -> "Editor":
        """An editor whose networks are exactly the identity: an edit is one gradient step of size
        ``editor.init_lr`` on each target matrix.

        Args:
            config: None, or a full mend config (with ``model`` and ``editor`` sections), or a dict of
                them; ``model.edit_params`` / ``model.edit_last_n_blocks`` choose the edited matrices.
        """
        config = OmegaConf.create(config) if isinstance(config, dict) else config
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), (config.get("model") if config is not None else None) or {})
        editor_cfg = editor_config(config.get("editor") if config is not None else None)
        targets = resolve_targets(model, model_cfg.edit_params, model_cfg.edit_last_n_blocks)
        networks = MendNetworks(targets, editor_cfg)
        return cls(model, tokenizer, networks, max_length=model_cfg.max_length, model_config=model_cfg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ editing
    def compute_updates(self, pairs) -> tuple[dict[str, torch.Tensor], dict, float]:
        """The updates an edit would apply, without applying them.

        Returns:
            (updates name -> dW (d_out, d_in) float32, transformed factors for exact replay, loss).
        """
        return self._compute_updates(check_pairs(pairs))

    def _compute_updates(self, pairs: list[tuple[str, str]]) -> tuple[dict[str, torch.Tensor], dict, float]:
        prompts, targets = zip(*pairs)
        batch = encode_pairs(self.tokenizer, list(prompts), list(targets), max_length=self.max_length).to(self.device)
        capture = capture_rank1(self.model, self.targets, batch)
        was_training = self.networks.training
        self.networks.eval()  # statistics frozen at edit time
        try:
            with torch.no_grad():
                factors = self.networks.transformed(capture.factors)
        finally:
            self.networks.train(was_training)
        updates = {name: update_from(*f) for name, f in factors.items()}
        return updates, factors, float(capture.loss)

    def edit(self, prompt: str, target: str) -> EditResult:
        """Make the model say ``target`` after ``prompt``: one forward/backward + one editor pass."""
        return self.edit_many([(prompt, target)])

    def edit_many(self, pairs) -> EditResult:
        """Apply several (prompt, target) facts together in one batched pass."""
        start = time.perf_counter()
        pairs = check_pairs(pairs)
        updates, factors, loss = self._compute_updates(pairs)
        new_weights = self._updated_weights(updates)  # checked in the weights' own dtype before any write
        for name, weight in new_weights.items():
            # a NaN or inf anywhere makes the float32 sum non-finite: one reduction instead of a mask
            if not torch.isfinite(weight.sum(dtype=torch.float32)):
                raise EditFailedError(f"the update for {name} contains NaN or inf, or overflows "
                                      f"{weight.dtype}; the model was not changed")
        changed = [name for name, weight in new_weights.items() if not torch.equal(weight, self._params[name])]
        if self._originals is None:
            self._originals = {t.name: self._params[t.name].detach().clone() for t in self.targets}
        try:
            with torch.no_grad():  # W + dW computed once above, the same arithmetic as `_apply`
                for name, weight in new_weights.items():
                    self._params[name].copy_(weight)
        except BaseException:
            self._restore(self._applied)
            raise
        result = EditResult(
            edit_id=next(self._ids),
            pairs=pairs,
            changed=changed,
            update_norms={name: _update_norm(*f) for name, f in factors.items()},
            loss=loss,
            seconds=time.perf_counter() - start,
            _factors=factors,
        )
        self._applied.append(result)
        return result

    @torch.no_grad()
    def _updated_weights(self, updates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What each target weight would become (the same arithmetic as `_apply`, out of place)."""
        return {t.name: self._params[t.name] + to_storage(updates[t.name], t).to(self._params[t.name].dtype)
                for t in self.targets}

    @torch.no_grad()
    def _apply(self, updates: dict[str, torch.Tensor]) -> None:
        for target in self.targets:
            param = self._params[target.name]
            param.add_(to_storage(updates[target.name], target).to(param.dtype))

    @torch.no_grad()
    def _restore(self, keep: list[EditResult]) -> None:
        """Set the weights to the originals plus the updates of ``keep``, replayed in order."""
        if self._originals is None:
            return
        for name, original in self._originals.items():
            self._params[name].copy_(original)
        for result in keep:
            self._apply({name: update_from(*f) for name, f in result._factors.items()})

    def revert(self, result: EditResult | None = None) -> None:
        """Undo every edit (default), or one edit given by its result; weights return bit for bit
        to what they were without that edit's update."""
        if result is None:
            self._restore([])
            self._applied.clear()
            self._originals = None  # the next edit snapshots the weights as they are then
            return
        if not isinstance(result, EditResult):
            raise TypeError(f"revert takes an EditResult returned by edit/edit_many, or nothing; got "
                            f"{type(result).__name__}: {result!r}")
        if not any(r is result for r in self._applied):
            raise ValueError(f"edit {result.edit_id} is not applied to this editor's model (already reverted, "
                             f"or made by another editor)")
        keep = [r for r in self._applied if r is not result]
        self._restore(keep)
        self._applied = keep
        if not keep:
            self._originals = None

    @contextlib.contextmanager
    def edited(self, prompt: str, target: str):
        """Apply an edit for the duration of a ``with`` block, then revert it."""
        result = self.edit(prompt, target)
        try:
            yield result
        finally:
            if any(r is result for r in self._applied):
                self.revert(result)

    @property
    def applied(self) -> list[EditResult]:
        """The edits currently applied, oldest first."""
        return list(self._applied)

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Write ``editor.safetensors`` and ``editor.yaml`` to the directory ``path``, atomically."""
        from . import __version__

        path = Path(path)
        meta = {
            "format_version": FORMAT_VERSION,
            "mend_version": __version__,
            "editor": OmegaConf.to_container(self.networks.config, enum_to_str=True),
            "model": {
                **OmegaConf.to_container(self.model_config),
                "identity": model_identity(self.model),
            },
            "targets": [
                {"name": t.name, "d_in": t.d_in, "d_out": t.d_out, "transposed": t.transposed, "layer": t.layer,
                 "fingerprint": self.fingerprints[t.name]}
                for t in self.targets
            ],
        }

        def write(staging):
            save_tensors(self.networks.state_dict(), Path(staging) / WEIGHTS_FILE)
            save_yaml(meta, Path(staging) / CONFIG_FILE)

        atomic_write_dir(path, write)
        return path

    @classmethod
    def load(cls, path, model=None, tokenizer=None, *, device=None) -> "Editor":
        """Load an editor saved by `save`. Without ``model``, the base model it was trained for is
        loaded. A model that is not the one the editor was trained for is refused (CheckpointError)."""
        path = recover_dir(path)
        if not path.is_dir():
            raise CheckpointError(f"editor checkpoint {path} is not a directory")
        meta = load_yaml(path / CONFIG_FILE)
        for key in ("format_version", "editor", "model", "targets"):
            if key not in meta:
                raise CheckpointError(f"{path / CONFIG_FILE} lacks the key {key!r}")
        if meta["format_version"] != FORMAT_VERSION:
            raise CheckpointError(f"{path} has format version {meta['format_version']}, this mend reads {FORMAT_VERSION}")
        if not isinstance(meta["model"], dict) or not isinstance(meta["editor"], dict):
            raise CheckpointError(f"{path / CONFIG_FILE}: 'model' and 'editor' must be mappings")
        saved_targets = meta["targets"]
        if not isinstance(saved_targets, list) or not saved_targets or not all(isinstance(t, dict) for t in saved_targets):
            raise CheckpointError(f"{path / CONFIG_FILE}: 'targets' must be a non-empty list of mappings, got {saved_targets!r}")
        state = load_tensors(path / WEIGHTS_FILE)
        model_meta = dict(meta["model"])
        identity = model_meta.pop("identity", {})
        if model is None:
            model, tokenizer = load_base_model(identity.get("name_or_path") or model_meta.get("name"),
                                               dtype=model_meta.get("dtype"), device=device)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        try:
            _check_same_model(path, identity, saved_targets, model)
            model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_meta)
            targets = resolve_targets(model, [t["name"] for t in saved_targets])
            networks = MendNetworks(targets, meta["editor"])
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, OmegaConfBaseException) as error:
            raise CheckpointError(f"{path / CONFIG_FILE} is malformed: {type(error).__name__}: {error}") from None
        try:
            missing, unexpected = networks.load_state_dict(state, strict=False)
        except RuntimeError as error:  # tensor shapes that do not match the config
            raise CheckpointError(f"{path / WEIGHTS_FILE} does not match its config: {error}") from None
        if missing or unexpected:
            raise CheckpointError(f"{path / WEIGHTS_FILE} does not match its config: missing {missing}, unexpected {unexpected}")
        return cls(model, tokenizer, networks, max_length=model_cfg.max_length, model_config=model_cfg)


def _check_same_model(path, identity: dict, saved_targets: list[dict], model) -> None:
    current = model_identity(model)
    required = ("model_type", "hidden_size", "num_layers", "vocab_size", "num_parameters")
    missing = [key for key in required if key not in identity]
    if missing or any("fingerprint" not in t for t in saved_targets):
        raise CheckpointError(f"{path / CONFIG_FILE} lacks the base model's identity ({missing or 'fingerprints'}); "
                              f"cannot check that it fits this model")
    problems = [
        f"{key}: checkpoint {identity[key]!r}, model {current[key]!r}"
        for key in required
        if identity[key] != current[key]
    ]
    params = dict(model.named_parameters())
    for saved in saved_targets:
        name = saved["name"]
        if name not in params:
            problems.append(f"the model has no parameter {name}")
            continue
        shape = tuple(params[name].shape)
        expected = (saved["d_in"], saved["d_out"]) if saved["transposed"] else (saved["d_out"], saved["d_in"])
        if shape != expected:
            problems.append(f"{name}: checkpoint shape {expected}, model {shape}")
            continue
        # random projections within the rounding of the coarser dtype (checkpoints before them: sums)
        saved_print = saved["fingerprint"]
        if not isinstance(saved_print, (list, dict)):
            raise TypeError(f"the fingerprint of {name} must be a mapping, got {saved_print!r}")
        differs = (legacy_mismatch(params[name], saved_print) if isinstance(saved_print, list)
                   else mismatch(params[name], saved_print))
        if differs:
            problems.append(f"{name}: weights differ from the model the editor was trained for ({differs})")
    if problems:
        raise CheckpointError(
            f"the editor in {path} was trained for another base model ({identity.get('name_or_path', '?')}): "
            + "; ".join(problems[:6])
        )
