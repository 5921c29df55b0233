"""Fingerprints of weight matrices: tell one base model's weights from another's, tolerate a dtype cast.

A matrix W (d_out x d_in) is summarised by its Frobenius norm and K fixed random projections

    p_j = a_j^T W b_j / ||W||_F        (a_j, b_j: fixed random +-1 vectors, j = 1..K)

A perturbation E of W moves p_j by a_j^T E b_j / ||W||_F, a zero-mean variable with standard deviation
||E||_F / ||W||_F: the relative size of the change, whatever its shape. Rounding W to a dtype with
machine epsilon eps changes each entry by at most eps/2 relative, so ||E||_F / ||W||_F <= eps/2 and
|dp_j| stays below a few eps. Two checkpoints match when every |dp_j| and the relative change of the
norm are within ``TOLERANCE_EPS`` epsilons of the coarser of the two dtypes: a float32 model must
match to ~1e-6 (so 1e-3 relative noise in one matrix is refused), a bfloat16 cast of it to ~3e-2.

The +-1 vectors come from Python's Mersenne Twister (``random.Random(seed).getrandbits``), whose
output is fixed across Python versions, so a fingerprint written on one machine is checked the same
way on another.
"""

from __future__ import annotations

import math
import random

import torch

N_PROJECTIONS = 16
SEED = 20220413  # any fixed number; changing it invalidates every saved fingerprint
TOLERANCE_EPS = 8  # allowed change, in machine epsilons of the coarser dtype


def _signs(n: int, seed: int) -> torch.Tensor:
    """(n,) float64 +-1, a fixed function of (n, seed)."""
    bits = random.Random(seed).getrandbits(n) if n else 0
    as_bytes = bits.to_bytes((n + 7) // 8, "little")
    unpacked = torch.frombuffer(bytearray(as_bytes), dtype=torch.uint8) if as_bytes else torch.zeros(0, dtype=torch.uint8)
    flags = ((unpacked[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)[:n]  # little-endian bits
    return flags.to(torch.float64) * 2 - 1


def _projection_vectors(d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, d_out) and (K, d_in) +-1 matrices, fixed by the shape."""
    a = _signs(N_PROJECTIONS * d_out, SEED + 2 * d_out).reshape(N_PROJECTIONS, d_out)
    b = _signs(N_PROJECTIONS * d_in, SEED + 2 * d_in + 1).reshape(N_PROJECTIONS, d_in)
    return a, b


@torch.no_grad()
def fingerprint(weight: torch.Tensor) -> dict:
    """``{"dtype", "norm", "projections"}`` of a 2-D weight, computed in float64 (plain YAML types)."""
    w = weight.detach().to(torch.float64)  # (d_out, d_in) as stored; the layout only has to be the same
    a, b = _projection_vectors(*w.shape)
    a, b = a.to(w.device), b.to(w.device)
    norm = float(w.norm())
    projections = ((a @ w) * b).sum(-1) / (norm if norm > 0 else 1.0)  # (K,)
    return {"dtype": str(weight.dtype).removeprefix("torch."), "norm": norm,
            "projections": [float(p) for p in projections.cpu()]}


def _eps(dtype_name: str) -> float:
    dtype = getattr(torch, str(dtype_name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        return torch.finfo(torch.float32).eps
    return torch.finfo(dtype).eps


def mismatch(weight: torch.Tensor, saved: dict) -> str | None:
    """None if ``weight`` matches the ``saved`` fingerprint up to dtype rounding, else what differs."""
    current = fingerprint(weight)
    tolerance = TOLERANCE_EPS * max(_eps(saved.get("dtype", "float32")), _eps(current["dtype"]))
    saved_norm = float(saved["norm"])
    norm_change = abs(current["norm"] - saved_norm) / max(saved_norm, 1e-30)
    if not norm_change <= tolerance:  # also catches NaN
        return f"norm {current['norm']:.6g} vs {saved_norm:.6g} (relative change {norm_change:.2e} > {tolerance:.1e})"
    if len(saved["projections"]) != len(current["projections"]):
        return f"{len(saved['projections'])} saved projections, {len(current['projections'])} computed"
    worst = max(abs(p - float(q)) for p, q in zip(current["projections"], saved["projections"]))
    if not worst <= tolerance:
        return f"random projections differ by {worst:.2e} of the norm (> {tolerance:.1e})"
    return None


def legacy_mismatch(weight: torch.Tensor, saved: list) -> str | None:
    """The check of checkpoints written before projections: [sum, sum of squares] within 1e-3."""
    w = weight.detach().double()
    got_sum, got_sq = float(w.sum()), float((w * w).sum())
    want_sum, want_sq = float(saved[0]), float(saved[1])
    if math.isclose(got_sq, want_sq, rel_tol=1e-3) and abs(got_sum - want_sum) <= 1e-2 * math.sqrt(abs(want_sq)) + 1e-6:
        return None
    return "sum and sum of squares differ"
