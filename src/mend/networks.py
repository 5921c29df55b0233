"""MEND editor networks: they map the rank-1 gradient factors (u, delta) of a weight matrix to
transformed factors (u~, delta~), whose outer-product sum is the weight update.

For each edited matrix W (d_out x d_in) and each token t of the edit example, the gradient is
``dL/dW = sum_t delta_t u_t^T`` with ``u_t`` the layer input (d_in) and ``delta_t`` the gradient of the
layer output (d_out). The editor network g transforms ``z_t = [u_t; delta_t]`` and the update is

    dW = -lr_l * sum_t delta~_t u~_t^T                                      (MEND, eq. 3-4)

One network serves all edited matrices of one shape; each matrix (layer) gets its own learned scale
and shift in the network (`editor.modulation` says where) and its own step size ``lr_l``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import Modulation, TransformedFactors, editor_config
from .targets import EditTarget


def merge_moments(count_a, mean_a, m2_a, count_b, mean_b, m2_b):
    """The (count, mean, M2) of the union of two sets of rows from each set's own (Chan et al. 1979).

    count: () float64; mean, m2: (d,) float64, M2 being the sum of squared deviations from the mean.
    Either set may be empty (count 0); nothing here waits for the device.
    """
    total = count_a + count_b
    share_b = torch.where(total > 0, count_b / total.clamp(min=1), torch.zeros_like(total))  # n_b / n
    diff = mean_b - mean_a  # (d,)
    mean = mean_a + diff * share_b
    m2 = m2_a + m2_b + diff**2 * (count_a * share_b)  # + diff^2 n_a n_b / n
    return total, mean, m2


class RunningNorm(nn.Module):
    """Running mean and standard deviation of row vectors, merged exactly batch by batch.

    Buffers saved with the editor: ``count`` (scalar), ``mean`` (d,), ``m2`` (d,) sum of squared
    deviations. Buffers not saved: ``fresh_count``, ``fresh_mean``, ``fresh_m2``, the statistics of
    the rows seen since `merge_across_processes` last ran (data-parallel training). Updated only while
    the owner is training; frozen at edit time.
    """

    def __init__(self, dim: int):
        super().__init__()
        for prefix, persistent in (("", True), ("fresh_", False)):
            self.register_buffer(prefix + "count", torch.zeros((), dtype=torch.float64), persistent=persistent)
            self.register_buffer(prefix + "mean", torch.zeros(dim, dtype=torch.float64), persistent=persistent)
            self.register_buffer(prefix + "m2", torch.zeros(dim, dtype=torch.float64), persistent=persistent)

    @torch.no_grad()
    def update(self, rows: torch.Tensor) -> None:
        """Merge the statistics of ``rows`` (N, d) into the running and the fresh ones."""
        rows = rows.detach().to(torch.float64).reshape(-1, rows.shape[-1])
        if rows.shape[0] == 0:
            return
        batch_mean = rows.mean(0)
        batch = (torch.tensor(float(rows.shape[0]), dtype=torch.float64, device=rows.device), batch_mean,
                 ((rows - batch_mean) ** 2).sum(0))
        for prefix in ("", "fresh_"):
            self._set(prefix, *merge_moments(*self._get(prefix), *batch))

    def _get(self, prefix: str):
        return getattr(self, prefix + "count"), getattr(self, prefix + "mean"), getattr(self, prefix + "m2")

    def _set(self, prefix: str, count, mean, m2) -> None:
        for buffer, value in zip(self._get(prefix), (count, mean, m2)):
            buffer.copy_(value)

    @torch.no_grad()
    def merge(self, n: int, batch_mean: torch.Tensor, batch_m2: torch.Tensor) -> None:
        """Merge the statistics (count, mean (d,), m2 (d,)) of a batch of rows into the running ones."""
        if n == 0:
            return
        count = torch.tensor(float(n), dtype=torch.float64, device=self.mean.device)
        self._set("", *merge_moments(*self._get(""), count, batch_mean.to(self.mean), batch_m2.to(self.m2)))

    def merged_with(self, other: "RunningNorm") -> "RunningNorm":
        """A new RunningNorm holding the statistics of every row this one and ``other`` have seen."""
        out = RunningNorm(self.mean.shape[0]).to(self.mean.device)
        out.merge(int(self.count), self.mean, self.m2)
        out.merge(int(other.count), other.mean, other.m2)
        return out

    def std(self) -> torch.Tensor:
        """(d,) standard deviation; ones until two rows have been seen."""
        if self.count < 2:
            return torch.ones_like(self.mean)
        return (self.m2 / (self.count - 1)).sqrt().clamp(min=1e-12)


@torch.no_grad()
def merge_across_processes(module: nn.Module) -> None:
    """Merge the statistics of every `RunningNorm` in ``module`` over the processes of the default
    torch.distributed group, exactly, so that each ends with those of all rows any process has seen.

    Process p holds ``S + F_p``: the statistics S shared after the last merge plus the fresh rows F_p
    it has seen since. One all-gather gives every process every ``(S + F_p, F_p)``; each then computes
    ``(S + F_0) + F_1 + ... + F_{k-1}`` by `merge_moments` in rank order, the same arithmetic on the
    same numbers, so the result is bit-identical everywhere. The fresh statistics start again empty.
    """
    import torch.distributed as dist

    norms = [m for m in module.modules() if isinstance(m, RunningNorm)]
    if not norms:
        return
    parts = [torch.cat([t.reshape(-1) for prefix in ("", "fresh_") for t in norm._get(prefix)]) for norm in norms]
    local = torch.cat(parts)  # per norm: count, mean (d), m2 (d), fresh_count, fresh_mean (d), fresh_m2 (d)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    offset = 0
    for norm, part in zip(norms, parts):
        d = norm.mean.shape[0]

        def moments(vector, at):  # (count (), mean (d,), m2 (d,)) starting at ``at``
            return vector[at], vector[at + 1 : at + 1 + d], vector[at + 1 + d : at + 1 + 2 * d]

        merged = moments(gathered[0][offset : offset + part.numel()], 0)  # S + F_0
        for other in gathered[1:]:
            merged = merge_moments(*merged, *moments(other[offset : offset + part.numel()], 1 + 2 * d))
        norm._set("", *merged)
        norm._set("fresh_", torch.zeros_like(norm.fresh_count), torch.zeros_like(norm.fresh_mean),
                  torch.zeros_like(norm.fresh_m2))
        offset += part.numel()


def row_stats(rows: torch.Tensor) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(count, mean (d,), m2 (d,)) of rows (N, d) in float64: what `RunningNorm.merge` takes."""
    rows = rows.detach().to(torch.float64).reshape(-1, rows.shape[-1])
    if rows.shape[0] == 0:
        return 0, rows.new_zeros(rows.shape[1]), rows.new_zeros(rows.shape[1])
    mean = rows.mean(0)
    return rows.shape[0], mean, ((rows - mean) ** 2).sum(0)


class LowRankResidualBlock(nn.Module):
    """One residual low-rank block, B zero-initialised (so the block is the identity at init).

    ``m`` indexes the edited matrix (the "member"), so layers sharing the network differ by a learned
    scale ``s_m`` and shift ``o_m``. Where they act is ``modulation``:

    - ``bottleneck``: ``h + B relu(s_m * (A h) + o_m)``, s_m and o_m of width ``rank``;
    - ``output``: ``h + s_m * (B relu(A h)) + o_m``, s_m and o_m of the block's full width (MEND, eq. 3).
    """

    def __init__(self, width: int, rank: int, n_members: int, modulation: Modulation = Modulation.bottleneck):
        super().__init__()
        self.modulation = Modulation(modulation)
        self.down = nn.Linear(width, rank)  # A: (rank, width)
        self.up = nn.Linear(rank, width)  # B: (width, rank)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        modulated = rank if self.modulation == Modulation.bottleneck else width
        self.scale = nn.Parameter(torch.ones(n_members, modulated))
        self.shift = nn.Parameter(torch.zeros(n_members, modulated))

    def forward(self, h: torch.Tensor, member: int) -> torch.Tensor:
        if self.modulation == Modulation.output:
            return h + self.up(torch.relu(self.down(h))) * self.scale[member] + self.shift[member]  # (N, width)
        hidden = torch.relu(self.down(h) * self.scale[member] + self.shift[member])  # (N, rank)
        return h + self.up(hidden)  # (N, width)


class EditorNetwork(nn.Module):
    """The editor network for one weight shape (d_in, d_out).

    Input rows ``u`` (N, d_in) and ``delta`` (N, d_out) are standardised by running statistics; the
    residual low-rank blocks act on the joint, standardised ``z = [u; delta]``; the change the blocks
    make is scaled back by the standard deviation and added to the raw input:

        x~ = x + std * (blocks(z) - z)

    so the network is exactly the identity while the blocks are (at initialisation).
    """

    def __init__(self, d_in: int, d_out: int, n_members: int, *, rank: int, n_blocks: int, transform: TransformedFactors,
                 normalize: bool, modulation: Modulation = Modulation.bottleneck):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.transformed_factors = TransformedFactors(transform)
        self.normalize = normalize
        width = d_in + d_out
        self.rank = min(rank, width)
        self.u_norm = RunningNorm(d_in)
        self.delta_norm = RunningNorm(d_out)
        self.blocks = nn.ModuleList(LowRankResidualBlock(width, self.rank, n_members, modulation)
                                    for _ in range(n_blocks))

    def _standardise(self, x: torch.Tensor, norm: RunningNorm):
        if not self.normalize:
            return x, None
        std = norm.std().to(x.dtype)
        return (x - norm.mean.to(x.dtype)) / std, std

    def forward(self, u: torch.Tensor, delta: torch.Tensor, member: int, norms=None):
        """u: (N, d_in), delta: (N, d_out) -> (u~ (N, d_in), delta~ (N, d_out)).

        ``norms``: (u_norm, delta_norm) to standardise with instead of the network's own (a lifelong
        editor's statistics, `mend.memory`); the network's own are then left alone.
        """
        if self.training and self.normalize and norms is None:
            self.u_norm.update(u)
            self.delta_norm.update(delta)
        u_norm, delta_norm = norms if norms is not None else (self.u_norm, self.delta_norm)
        u_std_in, u_std = self._standardise(u, u_norm)
        d_std_in, d_std = self._standardise(delta, delta_norm)
        z = torch.cat([u_std_in, d_std_in], dim=-1)  # (N, d_in + d_out)
        h = z
        for block in self.blocks:
            h = block(h, member)
        change = h - z
        change_u, change_delta = change[:, : self.d_in], change[:, self.d_in :]
        if u_std is not None:
            change_u, change_delta = change_u * u_std, change_delta * d_std
        u_out = u if self.transformed_factors == TransformedFactors.delta_only else u + change_u
        delta_out = delta if self.transformed_factors == TransformedFactors.u_only else delta + change_delta
        return u_out, delta_out


class MendNetworks(nn.Module):
    """All editor networks of one editor plus the per-matrix step sizes.

    Parameters: ``networks`` (one per weight shape, or per matrix when ``share`` is off),
    ``log_lrs`` (n_targets,), the log of each matrix's step size ``lr_l``, and ``log_ridges``
    (n_targets,), the log of each matrix's ridge regulariser relative to its mean squared key norm
    (`mend.aggregate`; unused when ``aggregation`` is ``sum``).
    """

    def __init__(self, targets: list[EditTarget], config=None):
        super().__init__()
        self.config = editor_config(config)
        self.targets = list(targets)
        if not self.targets:
            raise ValueError("an editor needs at least one target matrix")
        self.network_of: dict[str, str] = {}
        self.member_of: dict[str, int] = {}
        members: dict[str, list[EditTarget]] = {}
        for target in self.targets:
            key = target.shape_key if self.config.share else target.name.replace(".", "_")
            members.setdefault(key, []).append(target)
        networks = {}
        for key, group in members.items():
            for member, target in enumerate(group):
                self.network_of[target.name] = key
                self.member_of[target.name] = member
            networks[key] = EditorNetwork(
                group[0].d_in,
                group[0].d_out,
                len(group),
                rank=self.config.rank,
                n_blocks=self.config.n_blocks,
                transform=self.config.transform,
                normalize=self.config.normalize,
                modulation=self.config.modulation,
            )
        self.networks = nn.ModuleDict(networks)
        init = torch.full((len(self.targets),), math.log(self.config.init_lr))
        self.log_lrs = nn.Parameter(init)
        self.log_ridges = nn.Parameter(torch.full((len(self.targets),), math.log(self.config.ridge)))

    def step_sizes(self) -> dict[str, torch.Tensor]:
        """lr_l of every edited matrix, by parameter name."""
        lrs = self.log_lrs.exp()
        return {t.name: lrs[i] for i, t in enumerate(self.targets)}

    def ridges(self) -> dict[str, torch.Tensor]:
        """The relative ridge regulariser rho_l of every edited matrix, by parameter name."""
        ridges = self.log_ridges.exp()
        return {t.name: ridges[i] for i, t in enumerate(self.targets)}

    def run_network(self, name: str, u: torch.Tensor, delta: torch.Tensor, norms: dict | None = None):
        """Run one matrix's factors through its network: (u~, delta~). ``norms``: network key ->
        (u_norm, delta_norm) to standardise with instead of the networks' own statistics."""
        key = self.network_of[name]
        network = self.networks[key]
        return network(u.float(), delta.float(), self.member_of[name], None if norms is None else norms[key])

    def transform_factors(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]],
                    norms: dict | None = None) -> dict[str, tuple]:
        """Every matrix's transformed factors and step size: name -> (u~ (N, d_in), delta~ (N, d_out), lr_l)."""
        lrs = self.step_sizes()
        out = {}
        for target in self.targets:
            u, delta = factors[target.name]
            out[target.name] = (*self.run_network(target.name, u, delta, norms), lrs[target.name])
        return out

    def forward(self, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Weight updates from rank-1 factors.

        Args:
            factors: name -> (u (N, d_in), delta (N, d_out)).

        Returns:
            name -> dW (d_out, d_in), float32.
        """
        return {name: update_from(*t) for name, t in self.transform_factors(factors).items()}


def update_from(u_t: torch.Tensor, delta_t: torch.Tensor, lr: torch.Tensor) -> torch.Tensor:
    """dW = -lr * delta~^T u~: (d_out, d_in). The one place updates are formed, so replays are exact."""
    return -lr * (delta_t.t() @ u_t)
