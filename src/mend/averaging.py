"""An exponential moving average of the editor networks' parameters (Polyak averaging), for
``train.ema_decay``.

Meta-training's editor moves by several points of validation accuracy between checks; the mean of the
weights over the last stretch of steps is a smoother editor than any one of them. With an average the
trainer validates and saves the averaged weights, and keeps training the live ones.

Only parameters are averaged. Buffers (the running normalisation statistics of the editor's inputs)
are statistics of the data, not of the optimisation, so the averaged editor uses the live ones.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch


class WeightAverage:
    """The running average ``a <- d a + (1 - d) p`` of every parameter ``p`` of ``networks``.

    ``d`` is ``min(decay, (1 + n) / (10 + n))`` at the n-th update, so the first steps' weights, far from
    where training goes, fade within tens of steps rather than ``1 / (1 - decay)``.
    """

    def __init__(self, networks: torch.nn.Module, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"the averaging decay must lie strictly between 0 and 1, got {decay}")
        self.decay = float(decay)
        self.updates = 0
        # float32 whatever the parameters' dtype: a bf16 average would round the small steps away
        self.averaged = {name: p.detach().float().clone() for name, p in networks.named_parameters()}

    def restart(self) -> None:
        """Begin afresh from the next update's weights (a new stage of a curriculum: the average should
        not reach back into what was trained for another size). The earlier weights fade as at the start."""
        self.updates = 0

    def update(self, networks: torch.nn.Module) -> None:
        """Fold the networks' current parameters into the average (call after each optimiser step)."""
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        with torch.no_grad():
            for name, p in networks.named_parameters():
                self.averaged[name].lerp_(p.detach().float(), 1.0 - decay)

    @contextmanager
    def applied(self, networks: torch.nn.Module):
        """Within the block the networks hold the averaged parameters; the live ones come back after it,
        exactly, even if the block raises."""
        live = {name: p.detach().clone() for name, p in networks.named_parameters()}
        with torch.no_grad():
            for name, p in networks.named_parameters():
                p.copy_(self.averaged[name])  # copy_ casts to the parameter's dtype
        try:
            yield networks
        finally:
            with torch.no_grad():
                for name, p in networks.named_parameters():
                    p.copy_(live[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged parameters and the update count, as tensors (for a safetensors file)."""
        return {**{f"averaged.{k}": v for k, v in self.averaged.items()},
                "updates": torch.tensor(self.updates, dtype=torch.int64)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore from `state_dict`; ValueError naming what does not fit these networks' parameters."""
        names = {k[len("averaged."):] for k in state if k.startswith("averaged.")}
        if names != set(self.averaged):
            missing, unexpected = sorted(set(self.averaged) - names), sorted(names - set(self.averaged))
            raise ValueError(f"the saved weight average does not fit these networks: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        updates = state.get("updates")
        if updates is None or updates.numel() != 1:
            raise ValueError("the saved weight average lacks its update count (one integer, 'updates')")
        for name, value in self.averaged.items():
            saved = state[f"averaged.{name}"]
            if saved.shape != value.shape:
                raise ValueError(f"the saved weight average's {name} has shape {tuple(saved.shape)}, "
                                 f"the networks' {tuple(value.shape)}")
        # every check passed: only now replace anything
        self.averaged = {name: state[f"averaged.{name}"].to(value).clone() for name, value in self.averaged.items()}
        self.updates = int(updates.item())
