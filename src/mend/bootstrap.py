"""Percentile-bootstrap confidence intervals over records, for means and for differences of means.

A metric's value is the mean over the records that have it (`mend.eval_metrics.aggregate`). Its
interval resamples the records with replacement ``samples`` times, takes the same mean in each
resample and reports the ``(1 - confidence) / 2`` and ``(1 + confidence) / 2`` quantiles of those
means. One resampling (the same record indices, from ``seed``) serves every metric and every method
of a report, so intervals are reproducible and methods are resampled alike.

    means, intervals = summarize(rows, ["reliability_tf_acc", ...], Bootstrap(samples=1000, seed=0))

Differences (`difference_interval`) are paired when both sides scored the same records: the
per-record differences are resampled; otherwise each side is resampled on its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_SAMPLES = 1000
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class Bootstrap:
    """How intervals are drawn: ``samples`` resamples (0 = no intervals), ``seed``, ``confidence``."""

    samples: int = DEFAULT_SAMPLES
    seed: int = 0
    confidence: float = DEFAULT_CONFIDENCE

    def __post_init__(self):
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 0:
            raise ValueError(f"bootstrap samples must be an integer >= 0 (0 = no intervals), got {self.samples!r}")
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"bootstrap confidence must lie strictly between 0 and 1, got {self.confidence!r}")

    def indices(self, n: int, stream: int = 0) -> torch.Tensor:
        """(samples, n) record indices drawn with replacement; the same for the same (n, stream)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + stream)
        return torch.randint(0, n, (self.samples, n), generator=generator)

    def quantiles(self, means: torch.Tensor) -> tuple[float, float] | None:
        """The interval's ends from (samples,) resampled statistics (NaN ones, with no record, dropped)."""
        means = means[~means.isnan()]
        if means.numel() == 0:
            return None
        alpha = (1.0 - self.confidence) / 2
        lo, hi = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=means.dtype)).tolist()
        return lo, hi


def _column(rows: Sequence[dict], name: str) -> torch.Tensor:
    """(n,) float64 values of ``name``, NaN where a row lacks it."""
    return torch.tensor([float("nan") if r.get(name) is None else float(r[name]) for r in rows], dtype=torch.float64)


def _resampled_means(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """(samples,) mean of the non-NaN values picked by each row of ``index`` (NaN when none is)."""
    picked = values[index]  # (samples, n)
    present = ~picked.isnan()
    total = torch.where(present, picked, torch.zeros_like(picked)).sum(1)
    count = present.sum(1)
    return torch.where(count > 0, total / count.clamp(min=1), torch.full_like(total, float("nan")))


def mean_interval(values: torch.Tensor, bootstrap: Bootstrap, index: torch.Tensor | None = None):
    """(mean, (lo, hi) or None) of the non-NaN ``values``; mean None when there are none."""
    present = values[~values.isnan()]
    if present.numel() == 0:
        return None, None
    mean = present.mean().item()
    if bootstrap.samples == 0:
        return mean, None
    index = bootstrap.indices(len(values)) if index is None else index
    return mean, bootstrap.quantiles(_resampled_means(values, index))


def summarize(rows: Sequence[dict], names: Sequence[str], bootstrap: Bootstrap) -> tuple[dict, dict]:
    """Per metric name: the mean over the rows that have it, and its interval ([lo, hi] or None)."""
    index = bootstrap.indices(len(rows)) if rows and bootstrap.samples else None
    means, intervals = {}, {}
    for name in names:
        mean, interval = mean_interval(_column(rows, name), bootstrap, index)
        means[name] = mean
        intervals[name] = None if interval is None else list(interval)
    return means, intervals


def difference_interval(rows_a: Sequence[dict], rows_b: Sequence[dict], name: str, bootstrap: Bootstrap,
                        paired: bool) -> tuple[float | None, tuple[float, float] | None]:
    """(mean_B - mean_A of metric ``name``, its interval). Paired: ``rows_a[i]`` and ``rows_b[i]`` are
    the same record, and records missing the metric on either side are left out."""
    a, b = _column(rows_a, name), _column(rows_b, name)
    if paired:
        if len(a) != len(b):
            raise ValueError(f"a paired difference needs as many rows on both sides, got {len(a)} and {len(b)}")
        return mean_interval(b - a, bootstrap)  # NaN - x is NaN: a record missing on either side drops out
    mean_a, _ = mean_interval(a, Bootstrap(0))
    mean_b, _ = mean_interval(b, Bootstrap(0))
    if mean_a is None or mean_b is None:
        return None, None
    if bootstrap.samples == 0:
        return mean_b - mean_a, None
    diffs = _resampled_means(b, bootstrap.indices(len(b), stream=1)) - _resampled_means(a, bootstrap.indices(len(a)))
    return mean_b - mean_a, bootstrap.quantiles(diffs)
