"""Stages of meta-training: how many facts each edit solves together, step by step (a curriculum).

``train.stages`` lists ``{at: step, n_edits: n, warmup_steps: w, lr_scale: s}``. From step ``at`` on,
every edit of a step solves ``n`` facts together; before the first stage, ``train.n_edits``. The use: many cheap small
edits first, then a few at the size the editor is for (a 100-fact step costs about as much as six
20-fact steps on CPU). Each stage restarts the learning-rate schedule: a warm-up of its own
``warmup_steps`` (the first segment takes ``train.warmup_steps``), then constant or, with
``train.lr_decay=cosine``, a cosine that reaches 0 where the stage ends (the next stage, or
``train.max_steps``). A stage's ``lr_scale`` (default 1) multiplies the editor networks' rate
(``train.lr``) within it, and leaves the rate of the step sizes and ridge regularisers (``train.lr_lr``)
alone: a later stage can adapt those to its size without undoing what the networks learned before.
Validation always edits at the last stage's size: the editor is selected for what it is trained to do
in the end, with one yardstick for the whole run.

Without stages a run is one segment: ``train.n_edits`` facts per edit, one schedule to ``max_steps``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Steps ``start`` (inclusive) to ``end`` (exclusive) edit ``n_edits`` facts together, with a
    learning-rate warm-up over the first ``warmup`` of them."""

    start: int
    end: int
    n_edits: int
    warmup: int
    lr_scale: float = 1.0  # multiplies the networks' rate (train.lr) within the segment


def segments(train) -> list[Segment]:
    """The run's segments, in step order, from a ``train`` config section."""
    bounds = [(0, int(train.n_edits), int(train.warmup_steps), 1.0)]
    bounds += [(int(s.at), int(s.n_edits), int(s.warmup_steps), float(s.get("lr_scale", 1.0))) for s in train.stages]
    ends = [start for start, _, _, _ in bounds[1:]] + [int(train.max_steps)]
    return [Segment(start, end, n, warmup, scale) for (start, n, warmup, scale), end in zip(bounds, ends)]


def segment_index(step: int, found: list[Segment]) -> int:
    """Which of the run's segments ``found`` step ``step`` (0-based) belongs to; steps past ``max_steps``
    belong to the last."""
    return max((i for i, segment in enumerate(found) if step >= segment.start), default=0)


def segment_at(step: int, train) -> Segment:
    """The segment step ``step`` (0-based) belongs to; steps past ``max_steps`` belong to the last."""
    found = segments(train)
    return found[segment_index(step, found)]


def final_n_edits(train) -> int:
    """Facts per edit of the last segment: what validation edits with."""
    return segments(train)[-1].n_edits


def learning_rate_factor(step: int, train, minutes: float = 0.0) -> float:
    """The multiplier of both learning rates at ``step``: within the step's segment, a linear warm-up,
    then constant or a cosine decay to 0 at the segment's end. With ``train.schedule_minutes`` the
    cosine runs in time instead: it is at ``minutes / schedule_minutes`` of its way (``minutes``: the
    run's training time so far)."""
    segment = segment_at(step, train)
    local, length = step - segment.start, segment.end - segment.start
    if local < segment.warmup:
        return (local + 1) / segment.warmup
    if train.lr_decay == "cosine":
        if train.get("schedule_minutes") is not None:
            progress = min(1.0, minutes / train.schedule_minutes)
        else:
            progress = min(1.0, (local - segment.warmup) / max(1, length - segment.warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def check_stages(train) -> None:
    """Raise ValueError naming the first bad stage: steps must increase strictly inside (0, max_steps),
    facts per edit be >= 1, warm-ups >= 0 and rate scales > 0."""
    previous = 0
    for i, stage in enumerate(train.stages):
        where = f"train.stages[{i}]"
        if not previous < stage.at < train.max_steps:
            raise ValueError(f"{where}.at must lie strictly between {previous} (the stage before) and "
                             f"train.max_steps={train.max_steps}, got {stage.at}")
        if stage.n_edits < 1:
            raise ValueError(f"{where}.n_edits must be >= 1, got {stage.n_edits}")
        if stage.warmup_steps < 0:
            raise ValueError(f"{where}.warmup_steps must be >= 0, got {stage.warmup_steps}")
        scale = float(stage.get("lr_scale", 1.0))
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"{where}.lr_scale must be a finite number > 0, got {stage.get('lr_scale')}")
        previous = stage.at


class StagedSampler:
    """The records of every step of a staged run: one `mend.meta_batch.EditSampler` per segment, drawing
    ``batch_size x n_edits`` records per step in its own seeded order from the segment's first step.
    Without stages it is exactly the run's single `EditSampler`."""

    def __init__(self, records, train, rank: int = 0, world: int = 1):
        from .meta_batch import EditSampler

        self.segments = segments(train)
        self.samplers = [EditSampler(records, int(train.batch_size) * s.n_edits, int(train.seed) + 7919 * i, rank, world)
                         for i, s in enumerate(self.segments)]

    def records_for_step(self, step: int):
        i = segment_index(step, self.segments)
        return self.samplers[i].records_for_step(step - self.segments[i].start)

    def choose(self, step: int, records, loc_probes: int = 1, same_answer: int = 0):
        return self.samplers[segment_index(step, self.segments)].choose(step, records, loc_probes, same_answer)
