"""Capturing the rank-1 gradient factors of edited matrices in one forward/backward pass.

For an edited matrix W with layer input ``u_t`` and output ``y_t = W u_t`` at token t, the gradient of
a loss L is ``dL/dW = sum_t delta_t u_t^T`` where ``delta_t = dL/dy_t``. Forward hooks on the edited
modules record ``u`` and make their outputs part of the autograd graph; ``torch.autograd.grad`` then
returns ``delta`` for each output directly. The base model's parameters stay frozen, so nothing gets
a ``.grad`` and the backward pass stops at the lowest edited module.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .batching import TokenBatch
from .scoring import autocast_for, mean_nll, select_rows, target_logits, token_nll
from .targets import EditTarget


class ModuleRecorder(contextlib.AbstractContextManager):
    """Context manager recording the input and output of each target module's forward call.

    Inside the context, every target module's output is made to require grad (a frozen model's
    lowest edited layer would otherwise produce a constant). The hooks are removed on exit, and the
    recorder owns the tensors it captured.
    """

    def __init__(self, model, targets: list[EditTarget]):
        self.model = model
        self.targets = targets
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._handles = []

    def __enter__(self):
        modules = dict(self.model.named_modules())
        try:
            for target in self.targets:
                self._handles.append(modules[target.module_name].register_forward_hook(self._hook(target.name)))
        except Exception:
            self._remove()
            raise
        return self

    def _hook(self, name):
        def hook(module, args, output):
            if name in self.outputs:
                raise RuntimeError(f"{name} was called twice in one forward pass; cannot attribute its gradient")
            self.inputs[name] = args[0].detach()
            if not output.requires_grad:
                output = output.detach().requires_grad_(True)
            self.outputs[name] = output
            return output

        return hook

    def _remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc):
        self._remove()
        return False


@dataclass
class Rank1Capture:
    """What one capture pass yields.

    Attributes:
        factors: name -> (u (N, d_in), delta (N, d_out)) in float32, N = the positions that matter.
        rows: (N,) the batch row each captured position comes from.
        predicting: (N,) bool, True where the position predicts a target token (its loss positions).
        loss: the edit loss (mean target NLL of the loss rows; averaged over groups), detached.
        logits: (n_targets_all_rows, V) the pass's target logits, detached (pre-edit logits for free).
    """

    factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rows: torch.Tensor
    loss: torch.Tensor
    logits: torch.Tensor
    predicting: torch.Tensor


def capture_rank1(
    model, targets: list[EditTarget], batch: TokenBatch, loss_rows: torch.Tensor | None = None,
    row_groups: torch.Tensor | None = None, *, bf16: bool = False,
) -> Rank1Capture:
    """One forward/backward of the frozen base model; returns the rank-1 factors of the edit loss.

    Args:
        batch: the (prompt, target) batch; the loss is on its target tokens.
        loss_rows: (B,) bool, the rows the loss is taken on (default: all). Other rows (for instance
            locality examples riding along to get their pre-edit logits) contribute no factors.
        row_groups: (B,) edit group of each row (default: one group). The loss is the sum over groups
            of each group's mean target NLL, so every group's factors are exactly those it would get
            in a pass of its own.
        bf16: run the forward under bf16 autocast (CUDA only).
    """
    if loss_rows is None:
        loss_rows = torch.ones(len(batch), dtype=torch.bool, device=batch.input_ids.device)
    device = batch.input_ids.device
    with torch.enable_grad():  # works inside a caller's no_grad (validation)
        with ModuleRecorder(model, targets) as recorder, autocast_for(device, bf16):
            logits = target_logits(model, batch)  # (N_all, V)
        in_loss = loss_rows[batch.target_rows]
        if row_groups is None:
            loss = mean_nll(select_rows(logits, in_loss), batch.target_ids[in_loss])
            n_groups = 1
        else:
            token_groups = row_groups[batch.target_rows][in_loss]
            nll = token_nll(select_rows(logits, in_loss), batch.target_ids[in_loss])
            n_groups = int(token_groups.max()) + 1
            sums = torch.zeros(n_groups, device=device).index_add_(0, token_groups, nll)
            counts = torch.zeros(n_groups, device=device).index_add_(0, token_groups, torch.ones_like(nll))
            loss = (sums / counts.clamp(min=1)).sum()
        outputs = [recorder.outputs[t.name] for t in targets]
        grads = torch.autograd.grad(loss, outputs, allow_unused=True)
    positions = batch.positions_with_gradient & loss_rows[:, None]  # (B, T)
    factors = {}
    for target, grad in zip(targets, grads):
        u = recorder.inputs[target.name]
        if grad is None:
            grad = torch.zeros_like(recorder.outputs[target.name])
        factors[target.name] = (u[positions].float(), grad[positions].float())  # (N, d_in), (N, d_out)
    rows = torch.arange(len(batch), device=device)[:, None].expand_as(positions)[positions]
    predicting = batch.prediction_mask[positions]  # (N,)
    return Rank1Capture(factors, rows, loss.detach() / n_groups, logits.detach(), predicting)
