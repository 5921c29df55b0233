"""Edit-time step calibration: scale an edit's update to the least that makes its targets lead.

A trained editor's step sizes push each edit as far as meta-training found worth it on average, so
most single edits overshoot: the edited prompt's target ends far above every other token, and the
excess also moves the prompts that share the edited keys (CounterFact's neighbours). With
``editor.edit_margin`` set, an edit's update ``dW`` (the trained step times ``editor.edit_scale``)
becomes ``s * dW`` with the least ``s`` in ``[0, editor.edit_max_scale]`` at which every target token
of the edit leads the next-best token by ``edit_margin`` logits (teacher-forced on the edited
prompts), as far as ``editor.edit_margin_passes`` tries can find it. Each try is one forward pass
per ``editor.edit_chunk`` facts, no backward. The search brackets the goal and narrows the bracket by
false position (Illinois). When the goal is reachable it ends on a scale it measured to reach it;
when it is not, on the measured step (never 0) with the largest margin. The update is linear in
``s`` (the step size scales it), so a calibrated edit is replayed and reverted exactly like any other.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .batching import TokenBatch

SHRINK_GUARD = 0.05  # a false-position step lands at least this fraction of the bracket inside it


@dataclass(frozen=True)
class Calibration:
    """What the search chose.

    Attributes:
        scale: the factor the update was multiplied by (0: the model already led by the margin).
        margin: the edit's margin at that scale (the least over its facts' target tokens).
        margin_before: the same margin on the unedited model.
        tries: the scales tried on edited weights.
        reached: whether ``margin`` reaches the goal.
    """

    scale: float
    margin: float
    margin_before: float
    tries: int
    reached: bool


def fact_margins(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """(B,) each row's least margin over its target tokens: logit of the target minus the largest
    other logit. ``logits`` (N, V) are `mend.scoring.target_logits` of ``batch``; a positive margin
    on every token means greedy decoding with teacher forcing reproduces the whole target."""
    logits = logits.float()
    target_ids = batch.target_ids.to(logits.device)  # (N,)
    chosen = logits.gather(1, target_ids[:, None]).squeeze(1)  # (N,)
    top2 = logits.topk(2, dim=1)  # the best other token is the first or, where that is the target, the second
    others = torch.where(top2.indices[:, 0] == target_ids, top2.values[:, 1], top2.values[:, 0])  # (N,)
    margins = chosen - others
    out = torch.full((len(batch),), float("inf"), device=logits.device)
    return out.scatter_reduce(0, batch.target_rows.to(logits.device), margins, reduce="amin")


def search_scale(margin_at: Callable[[float], float], goal: float, margin_before: float, *,
                 max_scale: float, passes: int) -> Calibration:
    """The least scale in ``[0, max_scale]`` whose margin reaches ``goal``, in at most ``passes`` calls
    of ``margin_at``. The margin is assumed to grow with the scale (it does for an edit that works).
    A non-finite margin counts as -inf.

    - Already at the goal unedited: scale 0 (the edit changes nothing).
    - The step (scale 1) reaches it: false position on [0, 1], ending on the least scale measured to
      reach it.
    - It does not, and ``max_scale > 1``: the largest step is tried; if it reaches the goal, false
      position on [1, max_scale].
    - Out of reach: the measured scale above 0 with the largest margin (1 when ``max_scale`` is 1), so
      an edit is never silently dropped.
    """
    if passes < 1:
        raise ValueError(f"passes must be >= 1, got {passes}")
    if margin_before >= goal:
        return Calibration(0.0, margin_before, margin_before, 0, True)
    seen = {0.0: margin_before}

    def probe(scale: float) -> float:
        margin = float(margin_at(scale))
        seen[scale] = margin if math.isfinite(margin) else float("-inf")
        return seen[scale]

    def tries() -> int:
        return len(seen) - 1

    if probe(1.0) >= goal:
        low, high = 0.0, 1.0
    elif max_scale > 1.0 and tries() < passes and probe(max_scale) >= goal:
        low, high = 1.0, max_scale
    else:
        scale = max((s for s in sorted(seen) if s > 0), key=lambda s: seen[s])
        return Calibration(scale, seen[scale], margin_before, tries(), False)
    # false position in its Illinois form: when the same end moves twice running, the other end's excess
    # over the goal is halved for the next guess, so a curved margin cannot pin one end of the bracket
    excess_low, excess_high = seen[low] - goal, seen[high] - goal  # < 0 and >= 0
    moved = None
    while tries() < passes:
        span = high - low
        guess = low - excess_low * span / (excess_high - excess_low)
        if not math.isfinite(guess):  # an end at -inf (a non-finite try): bisect
            guess = low + span / 2
        guess = min(max(guess, low + SHRINK_GUARD * span), high - SHRINK_GUARD * span)
        excess = probe(guess) - goal
        if excess >= 0:
            high, excess_high = guess, excess
            if moved == "high":
                excess_low /= 2
            moved = "high"
        else:
            low, excess_low = guess, excess
            if moved == "low":
                excess_high /= 2
            moved = "low"
    return Calibration(high, seen[high], margin_before, tries(), True)
