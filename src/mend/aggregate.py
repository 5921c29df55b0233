"""Aggregation: the facts of one edit become one low-rank update per edited matrix.

Fact i brings keys ``U_i`` (n_i, d_in), its transformed layer inputs u~, and the editor's
transformed output gradients ``D_i`` (n_i, d_out), so that its own MEND update is
``dW_i = -lr D_i^T U_i``. Its value shifts are what that update does to its own keys:

    V_i = U_i dW_i^T = -lr (U_i U_i^T) D_i                                        (n_i, d_out)

``sum`` (the MEND paper) adds the facts' updates, ``dW = sum_i dW_i``. ``ridge`` (MALMEN's normal
equation) finds the one matrix that maps every fact's keys to its value shifts, in least squares:

    dW = argmin_S  sum_i ||U_i S^T - V_i||^2 + lambda ||S||^2 + tr(S C S^T)
       = V^T (U U^T + lambda I_n)^-1 U                 C = 0, n x n solve (push-through form)
       = V^T U (U^T U + C + lambda I_d)^-1             any C, d_in x d_in solve

U and V stack the facts' keys and values; ``lambda = rho_l * mean_t ||u~_t||^2`` with rho_l learned
per matrix (`MendNetworks.ridges`); C is the key second moment a lifelong editor remembers
(`mend.memory`: earlier edits' keys, preserved knowledge), which makes the new update leave the
outputs at those keys alone. Both forms keep MEND's low-rank shape ``dW = -lr D'^T K``:

    n-space:  K = U,                              D' = (U U^T + lambda I)^-1 G D
    d-space:  K = U (U^T U + C + lambda I)^-1,    D' = G D

with ``G = blockdiag_i(U_i U_i^T)`` (n, n), so an aggregated edit is applied, replayed and added to
rows by hooks (`mend.grouped_edit`) exactly like a single one. What the maths says:

* one fact whose keys are linearly independent: as lambda -> 0, D' -> D, the edit is MEND's;
* facts with mutually orthogonal keys: U U^T = G, each fact's block solves on its own, so every
  fact's keys are mapped exactly as its own aggregated update maps them;
* k copies of one fact: the solution of one copy with lambda / k; the sum would move it k times.

``editor.solve_keys = predictions`` fits only the positions that predict a target token: U_s (the
rows of U there) replaces U in the solve, and each fact's value shifts are those its own update makes
at those rows, ``V_s = blockdiag_i(U_s,i U_i^T) D``. The positions before the answer (the template
"The mother tongue of ...", shared by many facts) then neither compete for the solve nor enter a
lifelong memory; with one fact and lambda -> 0 the update is the smallest one that does at the
prediction positions what MEND's does there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import Aggregation, SolveKeys
from .grouped_edit import group_slots, pad_by_group


def ridge_lambda(keys: torch.Tensor, rho: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """``rho * mean ||k||^2`` over the (valid) keys, the scale detached: keys (..., n, d) -> (...)."""
    norms = keys.detach().double().pow(2).sum(-1)  # (..., n)
    if valid is None:
        mean = norms.mean(-1)
    else:
        mean = (norms * valid).sum(-1) / valid.sum(-1).clamp(min=1)
    return rho.double() * mean.clamp(min=torch.finfo(torch.float32).tiny)


def solve_spd(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``lhs^-1 rhs`` for symmetric positive definite ``lhs`` (..., m, m), by Cholesky; a system that
    is not (NaN or inf in it) gives NaN, never an exception, so the caller's finite check sees it."""
    chol, info = torch.linalg.cholesky_ex(lhs)
    out = torch.cholesky_solve(rhs, chol)
    bad = (info != 0)[..., None, None] if info.dim() else info != 0
    return torch.where(bad, torch.full_like(out, float("nan")), out)


def own_values(keys: torch.Tensor, deltas: torch.Tensor, facts: torch.Tensor,
               rows: torch.Tensor | None = None) -> torch.Tensor:
    """``G D``: each position's (U_i U_i^T D_i) row within its own fact, float64 (n, d_out).

    keys (n, d_in), deltas (n, d_out), facts (n,) fact index of each position. ``rows`` (n,) bool keeps
    only those positions' shifts (each still made by its fact's update over all its positions):
    (rows.sum(), d_out).
    """
    n_facts = int(facts.max()) + 1 if facts.numel() else 0
    k = pad_by_group(keys.double(), facts, n_facts)  # (F, m, d_in)
    d = pad_by_group(deltas.double(), facts, n_facts)  # (F, m, d_out)
    gd = torch.bmm(torch.bmm(k, k.transpose(1, 2)), d)  # (F, m, d_out)
    out = gd[facts, group_slots(facts, n_facts)[0]]  # (n, d_out), back in the rows' order
    return out if rows is None else out[rows]


def aggregate_facts(keys: torch.Tensor, deltas: torch.Tensor, lr: torch.Tensor, facts: torch.Tensor, *,
                    aggregation: Aggregation, rho: torch.Tensor, moment: torch.Tensor | None = None,
                    space: str = "auto", solve: torch.Tensor | None = None, guard: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One matrix's update from every fact of an edit: (K (m, d_in), D' (m, d_out), lr), dW = -lr D'^T K.

    Args:
        keys: (n, d_in) transformed inputs u~ of every captured position of every fact.
        deltas: (n, d_out) transformed output gradients delta~ of the same positions.
        facts: (n,) the fact each position belongs to.
        rho: the matrix's relative ridge regulariser (scalar).
        moment: (d_in, d_in) key second moment C to keep in the solve (lifelong), a `MomentBasis` of a
            fixed one (the same solve in n-space, much cheaper for a few facts), or None.
        space: "n" or "d" forces a form of the solve (tests); "auto" takes the smaller one.
        solve: (n,) bool, the positions the ridge solve fits (`SolveKeys`); None = all. The result
            then has one row per fitted position (m = solve.sum()), else m = n.
        guard: (g, d_in) raw keys whose outputs the update should keep (retrieved neighbours), as if
            ``guard^T guard`` were added to C. With a `MomentBasis` they join the n-space solve as rows
            with zero value shift (the same solution, exactly), and the result has m + g rows.
    """
    if Aggregation(aggregation) == Aggregation.sum:
        return keys, deltas, lr
    if solve is not None and bool(solve.all()):
        solve = None
    if isinstance(moment, MomentBasis) and guard is not None and len(guard) + len(keys) > keys.shape[1]:
        moment = moment.dense()  # more rows than inputs: the d-space solve is the smaller one
    if isinstance(moment, MomentBasis):  # a fixed moment in its eigenbasis: the n-space push-through form
        counted = None
        if guard is not None and len(guard):  # zero-value rows of a fact of their own, left out of lambda
            n = keys.shape[0]
            keys = torch.cat([keys, guard.to(keys.dtype)])
            deltas = torch.cat([deltas, deltas.new_zeros(len(guard), deltas.shape[1])])
            facts = torch.cat([facts, facts.new_full((len(guard),), int(facts.max()) + 1)])
            counted = torch.arange(len(keys), device=keys.device) < n
            if solve is not None:
                solve = torch.cat([solve, solve.new_ones(len(guard))])
        k_new, d_new, _ = aggregate_grouped(keys[None], deltas[None], facts[None], lr, aggregation=aggregation,
                                            rho=rho, moment=moment, solve=None if solve is None else solve[None],
                                            counted=None if counted is None else counted[None])
        if solve is not None:
            return k_new[0][solve], d_new[0][solve], lr
        return k_new[0], d_new[0], lr
    if guard is not None and len(guard):
        g64 = guard.double()
        moment = g64.t() @ g64 if moment is None else moment.double() + g64.t() @ g64  # (d_in, d_in)
    values = own_values(keys, deltas, facts, rows=solve)  # (m, d_out) = blockdiag(U_s,i U_i^T) D
    if solve is not None:
        keys = keys[solve]
    n, d_in = keys.shape
    lam = ridge_lambda(keys, rho)
    k64 = keys.double()
    if space == "n" or (space == "auto" and moment is None and n <= d_in):
        if moment is not None:
            raise ValueError("a solve with a key moment C is only in d_in space (space='d' or 'auto')")
        gram = k64 @ k64.t()  # (m, m)
        gram.diagonal().add_(lam)
        return keys, solve_spd(gram, values).to(deltas.dtype), lr
    lhs = moment.to(torch.float64, copy=True) if moment is not None else k64.new_zeros(d_in, d_in)
    lhs.addmm_(k64.t(), k64).diagonal().add_(lam)  # (d_in, d_in) = U^T U + C + lam I
    k_new = solve_spd(lhs, k64.t()).t()  # (m, d_in) = U (U^T U + C + lam I)^-1
    return k_new.to(keys.dtype), values.to(deltas.dtype), lr


@dataclass
class MomentBasis:
    """A fixed key moment C = Q diag(e) Q^T in its eigenbasis, so that ``(C + lambda I)^-1`` costs two
    (n, d) x (d, d) products for any lambda, differentiably (meta-training with preserved knowledge).

    Attributes: basis Q (d, d) float32, eigenvalues e (d,) float64, clamped at 0.
    """

    basis: torch.Tensor
    eigenvalues: torch.Tensor
    _dense: torch.Tensor | None = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of(cls, moment: torch.Tensor) -> "MomentBasis":
        """The eigenbasis of a symmetric positive semi-definite (d, d) moment."""
        eigenvalues, basis = torch.linalg.eigh(moment.double())
        return cls(basis.float(), eigenvalues.clamp(min=0))

    def dense(self) -> torch.Tensor:
        """The moment itself, ``Q diag(e) Q^T`` (d, d) float64, computed once (a d^3 product) and kept:
        an editor holds its basis across edits. Treat it as read-only."""
        if self._dense is None:
            basis = self.basis.double()
            self._dense = (basis * self.eigenvalues) @ basis.t()
        return self._dense

    def to(self, device) -> "MomentBasis":
        return MomentBasis(self.basis.to(device), self.eigenvalues.to(device))


def aggregate_grouped(keys: torch.Tensor, deltas: torch.Tensor, facts: torch.Tensor, lr: torch.Tensor, *,
                      aggregation: Aggregation, rho: torch.Tensor, moment: MomentBasis | None = None,
                      solve: torch.Tensor | None = None, counted: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The n-space solve for G independent edits at once, differentiable (meta-training).

    Args:
        keys: (G, n, d_in), deltas: (G, n, d_out), zero-padded per group (`pad_by_group`).
        facts: (G, n) the fact of each position, -1 on padding.
        moment: a fixed key moment C kept in every group's solve (preserved knowledge), or None.
        solve: (G, n) bool, the positions the solve fits (`SolveKeys`); None = every valid one.
        counted: (G, n) bool, the positions whose key norms set lambda; None = every fitted one.

    Returns:
        (K (G, n, d_in), D' (G, n, d_out), lr) for `mend.grouped_edit.edits_by_row_group`. Padding rows
        and rows left out of the solve are zero: their row of the system is lambda (or 1) on the
        diagonal and their value is zero.

    With C, the update is the d-space solve `aggregate_facts` makes at edit time,
    ``dW = -lr (G D)^T U (U^T U + C + lambda I)^-1``, computed in n-space by the push-through identity
    ``U (U^T U + A)^-1 = (I + U A^-1 U^T)^-1 U A^-1`` with ``A = C + lambda I``:
    K = U A^-1 and D' = (I + U A^-1 U^T)^-1 G D. Padding keys are zero, so they stay out of the solve.
    """
    if Aggregation(aggregation) == Aggregation.sum:
        return keys, deltas, lr
    valid = facts >= 0  # (G, n)
    k64, d64 = keys.double(), deltas.double()
    gram = torch.bmm(k64, k64.transpose(1, 2))  # (G, n, n)
    same = (facts[:, :, None] == facts[:, None, :]) & valid[:, :, None]  # (G, n, n)
    values = torch.bmm(gram * same, d64)  # (G, n, d_out) = G D per group
    if solve is not None:  # rows left out of the solve become padding: zero key, zero value
        valid = valid & solve
        fitted = valid.double()  # (G, n)
        values = values * fitted[..., None]
        keys = keys * valid[..., None].to(keys.dtype)
        gram = gram * (fitted[:, :, None] * fitted[:, None, :])  # the Gram matrix of the masked keys
    lam = ridge_lambda(keys, rho, valid if counted is None else valid & counted)  # (G,)
    eye = torch.eye(keys.shape[1], dtype=torch.float64, device=keys.device)
    if moment is None:
        lhs = gram + lam[:, None, None] * eye  # (G, n, n)
        return keys, solve_spd(lhs, values).to(deltas.dtype), lr
    rotated = keys.float() @ moment.basis  # (G, n, d_in): U Q
    inverse = 1.0 / (moment.eigenvalues[None, :] + lam[:, None])  # (G, d_in): (e + lambda)^-1
    scaled = rotated.double() * inverse[:, None, :]  # (G, n, d_in): U Q (E + lambda)^-1
    k_new = scaled.float() @ moment.basis.t()  # (G, n, d_in) = U A^-1
    lhs = eye + torch.bmm(scaled, rotated.double().transpose(1, 2))  # (G, n, n) = I + U A^-1 U^T
    return k_new.to(keys.dtype), solve_spd(lhs, values).to(deltas.dtype), lr


def grouped_updates(networks, capture, groups_of_rows: torch.Tensor, n_groups: int, aggregation=None,
                    moments: dict[str, MomentBasis] | None = None) -> dict:
    """Transform a capture's factors and aggregate each edit group's facts (one batch row = one fact):
    name -> (K (G, n, d_in), D' (G, n, d_out), lr) for `mend.grouped_edit.edits_by_row_group`.

    With ``aggregation`` sum this is the plain per-group padding of the transformed factors. The
    capture should give every fact its own loss (``row_groups`` = one group per row), so that no
    fact's gradient is divided by the number of facts in its edit. ``moments``: name -> the key moment
    each matrix's solve keeps (preserved knowledge, already weighted), for ridge aggregation.
    """
    aggregation = Aggregation(aggregation if aggregation is not None else networks.config.aggregation)
    position_groups = groups_of_rows[capture.rows]  # (N,)
    facts = pad_by_group((capture.rows + 1).double()[:, None], position_groups, n_groups)[..., 0].long() - 1  # (G, n)
    solve = None
    if SolveKeys(networks.config.solve_keys) == SolveKeys.predictions:
        solve = pad_by_group(capture.predicting.double()[:, None], position_groups, n_groups)[..., 0] > 0  # (G, n)
    ridges = networks.ridges()
    out = {}
    for name, (u_t, delta_t, lr) in networks.transform_factors(capture.factors).items():
        keys = pad_by_group(u_t, position_groups, n_groups)  # (G, n, d_in)
        deltas = pad_by_group(delta_t, position_groups, n_groups)  # (G, n, d_out)
        out[name] = aggregate_grouped(keys, deltas, facts, lr, aggregation=aggregation, rho=ridges[name],
                                      moment=None if moments is None else moments.get(name), solve=solve)
    return out


@dataclass
class RefitState:
    """One matrix's joint fit so far, for cheap lifelong edits: ``inverse`` = A^-1 (d_in, d_in) and
    ``fit`` = F = A^-1 w R (d_in, d_out), both float64 (`refit_increment`)."""

    inverse: torch.Tensor
    fit: torch.Tensor


def refit_state(*, lam: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, moment: torch.Tensor | None = None,
                memory_weight: float = 1.0) -> RefitState:
    """A^-1 and F of ``A = w S + C + lambda I``, ``F = A^-1 w R``, computed from scratch: one Cholesky
    factorisation of the (d_in, d_in) system (float64). A system that is not positive definite gives NaN."""
    lhs = memory_weight * gram.double()  # (d_in, d_in)
    if moment is not None:
        lhs = lhs + moment.double()
    lhs = lhs + lam.double() * torch.eye(lhs.shape[0], dtype=torch.float64, device=lhs.device)
    inverse = solve_spd(lhs, torch.eye(lhs.shape[0], dtype=torch.float64, device=lhs.device))  # NaN if not SPD
    return RefitState(inverse, inverse @ (memory_weight * cross.double()))


def refit_increment(keys: torch.Tensor, values: torch.Tensor, lr: torch.Tensor, *, lam: torch.Tensor,
                    gram: torch.Tensor, cross: torch.Tensor, moment: torch.Tensor | None = None,
                    memory_weight: float = 1.0, guard: torch.Tensor | None = None,
                    state: RefitState | None = None):
    """A lifelong edit as recursive least squares: the change of the joint ridge fit when one more
    edit's keys and value shifts join those remembered (`mend.memory`, ``memory_solve = refit``).

    After edits 1..t the cumulative update of a matrix is the one ridge fit of every remembered key to
    its value shift, ``F_t = A_t^-1 w R_t`` (d_in, d_out), ``dW = -lr F^T``, with

        A_t = w S_t + C + lambda I,   S_t = sum_s U_s^T U_s,   R_t = sum_s U_s^T V_s    (w = memory_weight)

    the same solve one `edit_many` of every fact so far makes. Its change when edit t joins is exactly
    rank n_t (the recursive least-squares identity, for w = 1):

        F_t - F_{t-1} = K^T D',   K = U_t A_t^-1,   D' = V_t - U_t F_{t-1}

    so an edit asks only for what the model does not already do at its keys (D' is the residual of
    the fit so far), and a value shift that every edit repeats is fitted once instead of stacking.

    The new edit's keys join A with weight 1 (``A_t = A_{t-1} + U_t^T U_t``), so w < 1 discounts the
    edits remembered against the new one, and w = 0 makes every edit as if it were the first.
    ``U_t A_t^-1 = (I + P U_t^T)^-1 P`` with ``P = U_t A_{t-1}^-1`` (push-through), and A_t^-1 follows
    from A_{t-1}^-1 by the Woodbury identity: given ``state`` (A_{t-1}^-1 and F_{t-1}, `RefitState`) an
    edit of n keys costs O(n d_in^2) instead of the O(d_in^3) of a fresh factorisation. The state it
    returns is the next edit's only for w = 1 (otherwise the next A weighs this edit by w).

    Args:
        keys: (n, d_in) the new edit's fitted keys U_t; values: (n, d_out) their value shifts V_t.
        lam: the run's ridge lambda (fixed by its first edit, so that the fit is one problem).
        gram, cross: S_{t-1} (d_in, d_in) and R_{t-1} (d_in, d_out), float64, of the edits remembered.
        moment: C (d_in, d_in), the preserved knowledge kept in every solve, or None.
        guard: (g, d_in) raw keys whose outputs the update should keep (`Editor.edit(..., keep=...)`): they
            join the fit with the value shift the fit so far gives them, so their residual is zero.
        state: A_{t-1}^-1 and F_{t-1} when the caller holds them for exactly these gram, cross, moment,
            lambda and w; None computes them (`refit_state`).

    Returns ((K (m, d_in), D' (m, d_out), lr) for `update_from`, like `aggregate_facts`; (U, V), the
    m = n + g keys and value shifts fitted, for the memory to absorb; the `RefitState` after this edit).
    """
    if state is None:
        state = refit_state(lam=lam, gram=gram, cross=cross, moment=moment, memory_weight=memory_weight)
    k64, v64 = keys.to(state.fit.device, torch.float64), values.to(state.fit.device, torch.float64)
    if guard is not None and len(guard):
        g64 = guard.to(k64.device, torch.float64)
        k64, v64 = torch.cat([k64, g64]), torch.cat([v64, g64 @ state.fit])
    residual = v64 - k64 @ state.fit  # (m, d_out) D' = V_t - U_t F_{t-1}
    pushed = k64 @ state.inverse  # (m, d_in) P = U_t A_{t-1}^-1 (A^-1 is symmetric)
    small = torch.eye(len(k64), dtype=torch.float64, device=k64.device) + pushed @ k64.t()  # (m, m) SPD
    k_new = solve_spd(small, pushed)  # (m, d_in) K = U_t A_t^-1
    inverse = state.inverse - pushed.t() @ k_new  # (d_in, d_in) A_t^-1 (Woodbury)
    inverse = 0.5 * (inverse + inverse.t())  # keep it symmetric against rounding
    after = RefitState(inverse, state.fit + k_new.t() @ residual)  # F_t = F_{t-1} + K^T D'
    return (k_new.to(keys.dtype), residual.to(values.dtype), lr), (k64.to(keys.dtype), v64.to(values.dtype)), after
