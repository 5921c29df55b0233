"""Edit methods compared by the evaluation harness, behind one small interface.

* ``none``: no edit; the unedited model's scores.
* ``mend``: a `mend.Editor` (trained or untrained), stateless, the facts of one edit aggregated by
  ridge least squares (`mend.aggregate`).
* ``mend-sum``: the same editor summing the facts' rank-1 updates (the MEND paper).
* ``mend-lifelong``: the same editor remembering its edits (`mend.memory`); in sequential mode each
  edit is computed knowing the ones before it.
* ``ft``: fine-tune the editor's target matrices on the edit's target NLL with Adam for a fixed
  number of steps.
* ``ft-l``: the same, with each matrix's change clamped after every step to an L-infinity ball of
  radius ``ftl_norm`` around its value at the start of the edit (FT-L of Meng et al. 2022, ROME).

Every method edits the model in place and reverts bit for bit: FT snapshots the target matrices the
first time it changes them and copies the snapshot back on `revert`. FT runs the frozen model through
``torch.func.functional_call`` with float32 copies of the target matrices as the only trainable
tensors, so no model parameter gets a ``.grad`` and no ``requires_grad`` flag changes. The blocks below
the lowest fine-tuned matrix never change, so FT computes the hidden states entering that block once
per edit and every step runs only the blocks from there on (`mend.prefix_forward.starting_at_block`).
"""

from __future__ import annotations

import abc
import contextlib

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .batching import check_pairs, encode_pairs
from .config import ConfigError, EvalConfig
from .editor import EditFailedError, Editor
from .prefix_forward import hidden_states_entering, lowest_edited_block, probe_block_output, starting_at_block
from .scoring import autocast_for, mean_nll, target_logits
from .targets import EditTarget, resolve_targets

METHOD_NAMES = ("none", "mend", "mend-sum", "mend-lifelong", "ft", "ft-l")
MEND_VARIANTS = {"mend": dict(aggregation="ridge", lifelong=False), "mend-sum": dict(aggregation="sum", lifelong=False),
                 "mend-lifelong": dict(aggregation="ridge", lifelong=True)}


class EditMethod(abc.ABC):
    """An edit method as the harness sees it: apply (prompt, target) pairs to the model in place,
    then revert every edit it applied. Applying again without reverting stacks edits (sequential)."""

    name: str
    # False for a method that never changes the model: the harness then scores it with the pre-edit
    # pass's predictions instead of predicting again (the same numbers, bit for bit, for no work)
    changes_model: bool = True

    @abc.abstractmethod
    def apply(self, pairs: list[tuple[str, str]]) -> None:
        """Edit the model so it continues each prompt with its target (all pairs together)."""

    @abc.abstractmethod
    def revert(self) -> None:
        """Undo every edit applied since construction or the last revert, bit for bit."""

    def settings(self) -> dict:
        """The method's hyperparameters, recorded in the summary."""
        return {}


class NoEdit(EditMethod):
    """The unedited model."""

    name = "none"
    changes_model = False

    def apply(self, pairs) -> None:
        check_pairs(pairs)  # same input checks as the other methods

    def revert(self) -> None:
        pass


class MendMethod(EditMethod):
    """Edits made by a `mend.Editor` (``Editor.edit_many``)."""

    def __init__(self, editor: Editor, checkpoint: str | None = None, name: str = "mend"):
        self.editor = editor
        self.checkpoint = checkpoint
        self.name = name
        self._results = []

    def apply(self, pairs) -> None:
        self._results.append(self.editor.edit_many(pairs))

    @property
    def calibrated_scale(self) -> float | None:
        """The multiple of the step (trained step x ``editor.edit_scale``) the latest edit applied,
        as ``editor.edit_margin`` chose it; None when the editor does not calibrate its step."""
        if not self._results or self._results[-1].calibration is None:
            return None
        return self._results[-1].calibration.scale

    def revert(self) -> None:
        ours = [r for r in self.editor.applied if any(r is mine for mine in self._results)]
        if len(ours) == len(self.editor.applied):
            self.editor.revert()
        else:  # the editor also holds edits made outside the harness: keep those
            for result in ours:
                self.editor.revert(result)
        self._results.clear()

    def settings(self) -> dict:
        config = OmegaConf.to_container(self.editor.networks.config, enum_to_str=True)
        config.update(aggregation=self.editor.aggregation.value, lifelong=self.editor.remembers,
                      preserved=bool(self.editor.preserved))
        return {"checkpoint": self.checkpoint, "editor": config, "targets": [t.name for t in self.editor.targets]}


class FineTune(EditMethod):
    """FT / FT-L: Adam on the target matrices, minimising the mean NLL of the edit's targets.

    Args:
        targets: the matrices to fine-tune (the editor's, for a fair comparison).
        steps: Adam steps per `apply` call.
        lr: Adam learning rate.
        linf_norm: None for FT; for FT-L the radius of the L-infinity ball each matrix stays in around
            its value at the start of the `apply` call.
    """

    def __init__(self, model, tokenizer, targets: list[EditTarget], *, steps: int, lr: float,
                 linf_norm: float | None = None, max_length: int = 128):
        if steps < 0:
            raise ValueError(f"ft_steps must be >= 0, got {steps}")
        if not lr > 0:
            raise ValueError(f"ft_lr must be > 0, got {lr}")
        if linf_norm is not None and not linf_norm > 0:
            raise ValueError(f"ftl_norm must be > 0, got {linf_norm}")
        if not targets:
            raise ValueError("FT needs at least one target matrix")
        self.name = "ft" if linf_norm is None else "ft-l"
        self.model, self.tokenizer, self.targets = model, tokenizer, list(targets)
        self.steps, self.lr, self.linf_norm, self.max_length = int(steps), float(lr), linf_norm, int(max_length)
        self._params = dict(model.named_parameters())
        self._originals: dict[str, torch.Tensor] | None = None
        self._block_output = None  # how the block below the lowest fine-tuned one returns its states

    def settings(self) -> dict:
        return {"steps": self.steps, "lr": self.lr, "linf_norm": self.linf_norm,
                "targets": [t.name for t in self.targets]}

    def apply(self, pairs) -> None:
        prompts, answers = zip(*check_pairs(pairs))
        device = next(self.model.parameters()).device
        batch = encode_pairs(self.tokenizer, list(prompts), list(answers), max_length=self.max_length).to(device)
        names = [t.name for t in self.targets]
        start = {n: self._params[n].detach().float().clone() for n in names}  # fp32 master copies
        weights = {n: w.clone().requires_grad_(True) for n, w in start.items()}
        optimizer = torch.optim.Adam(list(weights.values()), lr=self.lr)
        with self._unchanged_prefix(batch) if self.steps > 0 else contextlib.nullcontext():
            for _ in range(self.steps):
                # forward with the trainable copies in place of the model's matrices
                current = {n: w.to(self._params[n].dtype) for n, w in weights.items()}
                with autocast_for(device, False):  # FT in the model's own precision
                    logits = target_logits(self.model, batch, current)  # (N, V)
                loss = mean_nll(logits, batch.target_ids)
                # gradients only for the copies: nothing is accumulated on model parameters
                grads = torch.autograd.grad(loss, list(weights.values()))
                for w, g in zip(weights.values(), grads):
                    w.grad = g
                optimizer.step()
                if self.linf_norm is not None:  # project back into the L-inf ball around the start
                    with torch.no_grad():
                        for n, w in weights.items():
                            w.copy_(torch.minimum(torch.maximum(w, start[n] - self.linf_norm), start[n] + self.linf_norm))
        with torch.no_grad():
            for n, w in weights.items():
                if not torch.isfinite(w).all():
                    raise EditFailedError(f"fine-tuning made {n} NaN or inf; the model was not changed")
            if self._originals is None:
                self._originals = {n: self._params[n].detach().clone() for n in names}
            for n, w in weights.items():
                self._params[n].copy_(w.to(self._params[n].dtype))

    def _unchanged_prefix(self, batch):
        """A context, held over all of an edit's steps, in which the model starts at the lowest
        fine-tuned block from the hidden states entering it, computed once: no block below it changes
        during the edit, so every step would compute them again to the same values. A nullcontext
        when there is nothing below to skip."""
        start = lowest_edited_block(self.targets)
        if start is None:
            return contextlib.nullcontext()
        if self._block_output is None:
            self._block_output = probe_block_output(self.model, start)
        hidden = hidden_states_entering(self.model, start, batch.input_ids, batch.attention_mask, batch.position_ids)
        return starting_at_block(self.model, start, hidden, self._block_output)

    @torch.no_grad()
    def revert(self) -> None:
        if self._originals is None:
            return
        for n, original in self._originals.items():
            self._params[n].copy_(original)
        self._originals = None


def _eval_config(eval_cfg):
    try:
        return OmegaConf.merge(OmegaConf.structured(EvalConfig), eval_cfg if eval_cfg is not None else {})
    except OmegaConfBaseException as error:  # an unknown key or a wrong type
        raise ConfigError(f"eval config: {error}") from None


def build_methods(names, editor: Editor | None, model, tokenizer, eval_cfg=None, *,
                  targets: list[EditTarget] | None = None, checkpoint: str | None = None) -> dict[str, EditMethod]:
    """Build the named edit methods, in the order given.

    Args:
        names: method names, each one of `METHOD_NAMES` ("none", "mend", "mend-sum", "mend-lifelong",
            "ft", "ft-l").
        editor: the `mend.Editor` for the mend methods (None when none is asked for); each mend method
            uses it, or a variant of it sharing its networks (`Editor.variant`), set as its name says.
            Its target matrices and max_length are also FT's.
        eval_cfg: an EvalConfig, DictConfig or dict (``ft_steps``, ``ft_lr``, ``ftl_norm``); None = defaults.
        targets: FT's matrices when there is no editor (default: `resolve_targets(model)`).
        checkpoint: the editor's checkpoint path, recorded in the method's settings.

    Raises:
        ValueError: an unknown or repeated name (the message names it and the valid ones), "mend"
            without an editor, or an editor built for another model object.
    """
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in METHOD_NAMES:
            raise ValueError(f"unknown edit method {name!r}; valid methods are {', '.join(METHOD_NAMES)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"edit method(s) {repeated} listed more than once in {names}")
    if not names:
        raise ValueError(f"no edit methods given; choose from {', '.join(METHOD_NAMES)}")
    if editor is not None and editor.model is not model:
        raise ValueError("the editor edits another model object than the one being evaluated")
    wanted = [n for n in names if n in MEND_VARIANTS]
    if wanted and editor is None:
        raise ValueError(f"method {wanted[0]!r} needs an editor: pass a mend.Editor "
                         f"(Editor.load(path) or Editor.untrained)")
    cfg = _eval_config(eval_cfg)
    ft_targets = editor.targets if editor is not None else (targets or resolve_targets(model))
    max_length = editor.max_length if editor is not None else 128
    methods: dict[str, EditMethod] = {}
    for name in names:
        if name == "none":
            methods[name] = NoEdit()
        elif name in MEND_VARIANTS:
            variant = MEND_VARIANTS[name]
            same = editor.aggregation.value == variant["aggregation"] and editor.remembers == variant["lifelong"]
            methods[name] = MendMethod(editor if same else editor.variant(**variant), checkpoint, name)
        else:
            methods[name] = FineTune(model, tokenizer, ft_targets, steps=cfg.ft_steps, lr=cfg.ft_lr,
                                     linf_norm=cfg.ftl_norm if name == "ft-l" else None, max_length=max_length)
    return methods
