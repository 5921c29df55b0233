"""What a lifelong editor remembers across edits: statistics that keep updating and key moments.

For every edited matrix, statistics of the keys and value shifts the edits' ridge solves fitted,
never prompts (`mend.aggregate`; keys U are transformed layer inputs u~, values V the value shifts):

    gram[l]  = sum over every position of every remembered edit of u~ u~^T        (d_in, d_in)
    cross[l] = sum over the same positions of u~ v^T                               (d_in, d_out)
    ridge[l] = the lambda of the run's first edit, kept so that every later solve is the same problem

With ``editor.memory_solve = refit`` (the default) the next edit's update is the change of the one
ridge fit of all of them and the new edit (`mend.aggregate.refit_increment`, recursive least squares):
after t edits the model carries what one `edit_many` of the t facts would have fitted, so an
edit's update repeats nothing earlier edits already did, and nothing stacks.

With ``memory_solve = hold`` the solve instead adds a penalty that keeps the outputs at earlier edits'
raw inputs where they are, from the raw key moment

    edits[l] = sum over every position of every remembered edit of u_t u_t^T     (raw layer inputs)

as ``C_l = memory_weight * edits[l] + preserve_weight * preserved[l]`` in its normal equation
(AlphaEdit / UltraEdit, here as a penalty in one ridge solve rather than a null-space projection).
Every solve of either form also keeps ``preserve_weight * preserved[l]``, the editor's preserved
knowledge, E[u u^T] over generic text (`key_moments`, `Editor.preserve`; any editor may hold it,
lifelong or not), so a new update is pushed to leave the outputs at generic text alone.

For every editor network, the rows (u, delta) seen at edit time are merged into running statistics; the network standardises with its trained statistics merged with these
(lifelong normalisation). Each edit is absorbed after it is applied, so the first edit of an empty
memory is exactly the stateless edit.

Each edit's contribution is a `MemoryEntry`; the memory as it was plus the entries of the edits
kept, replayed in order, rebuild it exactly, which is how `Editor.revert` keeps it bit-exact.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .networks import RunningNorm, row_stats
from .targets import EditTarget


@dataclass
class MemoryEntry:
    """What one edit adds to a memory.

    Attributes:
        keys: name -> (n, d_in) the raw layer inputs of the edit's captured positions.
        stats: (network key, u row stats, delta row stats) per matrix and capture chunk, in the
            order they are merged; row stats are `mend.networks.row_stats` triples.
        fitted: name -> (U (n, d_in), V (n, d_out)) the keys and value shifts the edit's solve fitted.
        ridges: name -> the lambda of that solve (kept by the memory from its first edit).
    """

    keys: dict[str, torch.Tensor] = field(default_factory=dict)
    stats: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    fitted: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    ridges: dict[str, torch.Tensor] = field(default_factory=dict)

    def add(self, name: str, network_key: str, u: torch.Tensor, delta: torch.Tensor,
            keep: torch.Tensor | None = None) -> None:
        """Record one chunk's raw factors of matrix ``name``: u (n, d_in), delta (n, d_out). The
        statistics take every row; the key moment only the rows ``keep`` (n,) bool (None: all)."""
        previous = self.keys.get(name)
        u = u.detach().float()
        self.stats.append((network_key, row_stats(u), row_stats(delta)))
        u = u if keep is None else u[keep]
        self.keys[name] = u if previous is None else torch.cat([previous, u])


class EditMemory:
    """The lifelong state of one editor: see the module docstring.

    Args:
        targets: the editor's matrices.
        network_of: name -> key of the editor network serving it (`MendNetworks.network_of`).
        widths: network key -> (d_in, d_out).
    """

    def __init__(self, targets: list[EditTarget], network_of: dict[str, str], widths: dict[str, tuple[int, int]],
                 device=None):
        self.targets = list(targets)
        self.network_of = dict(network_of)
        self.widths = dict(widths)
        self.device = torch.device(device or "cpu")
        self.version = 0  # changes with every change of the memory (reset, absorb, load_tensors)
        self.reset()

    @classmethod
    def for_networks(cls, networks, device=None) -> "EditMemory":
        widths = {key: (net.d_in, net.d_out) for key, net in networks.networks.items()}
        return cls(networks.targets, networks.network_of, widths, device)

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget every edit (statistics and key moments)."""
        self.version += 1
        self.n_edits = 0
        self.edits: dict[str, torch.Tensor] = {}  # allocated by the first edit that reaches a matrix
        self.gram: dict[str, torch.Tensor] = {}  # float64 (d_in, d_in), likewise
        self.cross: dict[str, torch.Tensor] = {}  # float64 (d_in, d_out)
        self.ridges: dict[str, torch.Tensor] = {}  # float64 scalars
        self.norms = {key: (RunningNorm(d_in).to(self.device), RunningNorm(d_out).to(self.device))
                      for key, (d_in, d_out) in self.widths.items()}

    def absorb(self, entry: MemoryEntry) -> None:
        """Add one edit's keys and statistics."""
        for name, keys in entry.keys.items():
            keys = keys.to(self.device)
            moment = keys.t() @ keys  # (d_in, d_in)
            self.edits[name] = moment if name not in self.edits else self.edits[name] + moment
        for name, (keys, values) in entry.fitted.items():
            k64, v64 = keys.to(self.device, torch.float64), values.to(self.device, torch.float64)
            gram, cross = k64.t() @ k64, k64.t() @ v64  # (d_in, d_in), (d_in, d_out)
            self.gram[name] = gram if name not in self.gram else self.gram[name] + gram
            self.cross[name] = cross if name not in self.cross else self.cross[name] + cross
        for name, lam in entry.ridges.items():
            self.ridges.setdefault(name, lam.detach().to(self.device, torch.float64).clone())
        for key, u_stats, delta_stats in entry.stats:
            u_norm, delta_norm = self.norms[key]
            u_norm.merge(*(s.to(self.device) if torch.is_tensor(s) else s for s in u_stats))
            delta_norm.merge(*(s.to(self.device) if torch.is_tensor(s) else s for s in delta_stats))
        self.n_edits += 1
        self.version += 1

    def moment(self, name: str) -> torch.Tensor | None:
        """The remembered raw key moment of matrix ``name`` (d_in, d_in), or None before any edit reached it."""
        return self.edits.get(name)

    def fit(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(gram S, cross R, ridge lambda) of matrix ``name`` for a refit (float64), or None before any
        edit reached it."""
        if name not in self.gram:
            return None
        return self.gram[name], self.cross[name], self.ridges[name]

    def norms_for(self, networks) -> dict[str, tuple[RunningNorm, RunningNorm]] | None:
        """Network key -> (u norm, delta norm): trained statistics merged with the edit-time ones;
        None while no edit has been absorbed (the networks' own statistics are then exactly these)."""
        if self.n_edits == 0:
            return None
        out = {}
        for key, network in networks.networks.items():
            u_norm, delta_norm = self.norms[key]
            out[key] = (network.u_norm.merged_with(u_norm), network.delta_norm.merged_with(delta_norm))
        return out

    # ------------------------------------------------------------------ snapshots and files
    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the memory by a flat name (safetensors), copies."""
        out = {"n_edits": torch.tensor(self.n_edits, dtype=torch.int64)}
        for name, moment in self.edits.items():
            out[f"edits.{name}"] = moment.clone()
        for name in self.gram:
            out[f"gram.{name}"] = self.gram[name].clone()
            out[f"cross.{name}"] = self.cross[name].clone()
            out[f"ridge.{name}"] = self.ridges[name].clone()
        for key, (u_norm, delta_norm) in self.norms.items():
            for side, norm in (("u", u_norm), ("delta", delta_norm)):
                for stat in ("count", "mean", "m2"):
                    out[f"norms.{key}.{side}.{stat}"] = getattr(norm, stat).clone()
        return out

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Set the memory to ``tensors`` (from `tensors`); a name it does not know is an error."""
        names = {t.name: t for t in self.targets}
        self.reset()
        for flat, value in tensors.items():
            value = value.to(self.device)
            kind, _, rest = flat.partition(".")
            if flat == "n_edits":
                self.n_edits = int(value)
            elif kind == "edits" and rest in names:
                d_in = names[rest].d_in
                if tuple(value.shape) != (d_in, d_in):
                    raise ValueError(f"memory tensor {flat} has shape {tuple(value.shape)}, expected ({d_in}, {d_in})")
                self.edits[rest] = value.clone()
            elif kind in ("gram", "cross", "ridge") and rest in names:
                target = names[rest]
                want = {"gram": (target.d_in, target.d_in), "cross": (target.d_in, target.d_out), "ridge": ()}[kind]
                if tuple(value.shape) != want:
                    raise ValueError(f"memory tensor {flat} has shape {tuple(value.shape)}, expected {want}")
                store = {"gram": self.gram, "cross": self.cross, "ridge": self.ridges}[kind]
                store[rest] = value.to(torch.float64).clone()
            elif kind == "norms":
                key, side, stat = rest.rsplit(".", 2)
                if key not in self.norms or side not in ("u", "delta") or stat not in ("count", "mean", "m2"):
                    raise ValueError(f"unknown memory tensor {flat!r}")
                norm = self.norms[key][0 if side == "u" else 1]
                if getattr(norm, stat).shape != value.shape:
                    raise ValueError(f"memory tensor {flat} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(getattr(norm, stat).shape)}")
                getattr(norm, stat).copy_(value)
            else:
                raise ValueError(f"unknown memory tensor {flat!r}")
        if not set(self.gram) == set(self.cross) == set(self.ridges):
            raise ValueError(f"memory tensors gram, cross and ridge must come together for every matrix; got gram "
                             f"{sorted(self.gram)}, cross {sorted(self.cross)}, ridge {sorted(self.ridges)}")


def check_moments(moments: dict[str, torch.Tensor], targets: list[EditTarget]) -> dict[str, torch.Tensor]:
    """Float32 copies of ``moments`` (name -> (d_in, d_in)); a name or shape that does not fit is an error."""
    by_name = {t.name: t for t in targets}
    out = {}
    for name, moment in moments.items():
        if name not in by_name:
            raise ValueError(f"no edited matrix named {name!r}; the editor edits {sorted(by_name)}")
        d_in = by_name[name].d_in
        if tuple(moment.shape) != (d_in, d_in):
            raise ValueError(f"the key moment of {name} must be ({d_in}, {d_in}), got {tuple(moment.shape)}")
        out[name] = moment.detach().float().clone()
    return out


@torch.no_grad()
def recorded_inputs(model, targets: list[EditTarget], batches, prefix_cache=None):
    """For each of ``batches`` (input_ids, attention_mask, position_ids, selected (B, T) bool): name ->
    (selected positions, d_in), every target's raw input there. One forward each, the logits of the
    last position only, no backward.

    With a `mend.prefix_cache.PrefixCache` in the model's own dtype that starts at or below the lowest
    target's block, a batch whose rows are all cached starts from their cached states and runs only
    the blocks from the cache's on (the same inputs up to floating-point rounding, about a tenth of
    the work when 3 of 30 blocks are edited); any other batch runs the whole model."""
    from .capture import ModuleRecorder
    from .prefix_forward import lowest_edited_block, starting_at_block

    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    lowest = lowest_edited_block(targets)
    usable = (prefix_cache is not None and prefix_cache.hidden.dtype == dtype and lowest is not None
              and prefix_cache.start <= lowest)  # a cache above a target would skip the block it reads
    for ids, mask, positions, selected in batches:
        skip = contextlib.nullcontext()
        if usable:
            try:
                skip = starting_at_block(model, prefix_cache.start, prefix_cache.states(ids, mask), prefix_cache.block_output)
            except KeyError:  # a row the cache does not hold: this batch runs the whole model
                pass
        with skip, ModuleRecorder(model, targets) as recorder:
            model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                  use_cache=False, logits_to_keep=1)
        selected = selected.to(device)
        by_storage: dict[tuple, torch.Tensor] = {}  # matrices reading one tensor get one selection of it
        out = {}
        for t in targets:
            raw = recorder.inputs[t.name]
            key = (raw.data_ptr(), tuple(raw.shape))
            if key not in by_storage:
                by_storage[key] = raw[selected]
            out[t.name] = by_storage[key]
        yield out


def pair_batches(tokenizer, pairs: list[tuple[str, str]], positions, *, batch_size: int, max_length: int,
                 what: tuple[str, str]):
    """``pairs`` encoded ``batch_size`` at a time as `recorded_inputs` takes them, ``positions(batch)``
    -> (B, T) bool choosing the positions to read (`mend.batching.TokenBatch` masks)."""
    from .batching import encode_pairs

    for start in range(0, len(pairs), batch_size):
        prompts, answers = zip(*pairs[start : start + batch_size])
        batch = encode_pairs(tokenizer, list(prompts), list(answers), max_length=max_length, what=what)
        yield batch.input_ids, batch.attention_mask, batch.position_ids, positions(batch)


def _outer_product_sums(model, targets: list[EditTarget], batches, prefix_cache=None) -> tuple[dict[str, torch.Tensor], int]:
    """Sum of u u^T (float64) of every target's raw input over the selected positions of ``batches``
    (as `recorded_inputs` takes them), and how many positions that was. Matrices that read the same
    input (a gated MLP's gate and up projections) share one product."""
    device = next(model.parameters()).device
    sums = {t.name: torch.zeros(t.d_in, t.d_in, dtype=torch.float64, device=device) for t in targets}
    count = 0
    for inputs in recorded_inputs(model, targets, batches, prefix_cache):
        products: dict[int, torch.Tensor] = {}  # id of an input -> its product, this batch
        for name, u in inputs.items():
            if id(u) not in products:
                u64 = u.double()  # (selected positions, d_in)
                products[id(u)] = u64.t() @ u64
            sums[name] += products[id(u)]
        count += len(next(iter(inputs.values()), ()))
    return sums, count


def key_moments(model, targets: list[EditTarget], tokenizer, texts: list[str], *, max_length: int = 128,
                batch_size: int = 8, prefix_cache=None) -> dict[str, torch.Tensor]:
    """E[u u^T] of every target matrix's raw input over the tokens of ``texts`` (generic text, for the
    preserved-knowledge term): name -> (d_in, d_in) float32. One forward per batch, no backward;
    batches whose rows ``prefix_cache`` holds start from it (`recorded_inputs`)."""
    if isinstance(texts, str) or not texts:
        raise ValueError("texts must be a non-empty list of strings")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def batches():
        for start in range(0, len(texts), batch_size):
            rows = [tokenizer(text)["input_ids"][:max_length] for text in texts[start : start + batch_size]]
            rows = [r for r in rows if r]
            if not rows:
                continue
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                ids[i, : len(r)] = torch.tensor(r)
                mask[i, : len(r)] = 1
            yield ids, mask, (mask.cumsum(1) - 1).clamp(min=0), mask.bool()

    sums, count = _outer_product_sums(model, targets, batches(), prefix_cache)
    if count == 0:
        raise ValueError("the texts tokenise to nothing")
    return {name: (s / count).float() for name, s in sums.items()}


def answer_key_moments(model, targets: list[EditTarget], tokenizer, pairs: list[tuple[str, str]], *,
                       max_length: int = 128, batch_size: int = 16, prefix_cache=None) -> dict[str, torch.Tensor]:
    """E[u u^T] of every target matrix's raw input at the positions that predict an answer token of
    (prompt, answer) ``pairs``, the last prompt token first: name -> (d_in, d_in) float32.

    These are the keys a fact edit writes to and a neighbouring fact reads from ("X's mother tongue
    is" -> the answer): a preserved moment over whole texts gives them the weight of one token in
    ten, this one gives them all of it (`Editor.preserve` with ``answers``). One forward per batch,
    from ``prefix_cache`` where it holds the batch's rows (`recorded_inputs`)."""
    if isinstance(pairs, (str, tuple)) or not pairs:
        raise ValueError("pairs must be a non-empty list of (prompt, answer) pairs")
    batches = pair_batches(tokenizer, list(pairs), lambda batch: batch.prediction_mask, batch_size=batch_size,
                           max_length=max_length, what=("preserved prompt", "preserved answer"))
    sums, count = _outer_product_sums(model, targets, batches, prefix_cache)  # every answer has a token: count > 0
    return {name: (s / count).float() for name, s in sums.items()}


def mix_moments(text_moments: dict[str, torch.Tensor], answer_moments: dict[str, torch.Tensor] | None,
                answer_weight: float) -> dict[str, torch.Tensor]:
    """The preserved moment of every matrix: ``C_text + answer_weight * C_answers`` (float32)."""
    if answer_weight < 0:
        raise ValueError(f"answer_weight must be >= 0, got {answer_weight}")
    if not answer_moments or answer_weight == 0:
        return dict(text_moments)
    if set(answer_moments) != set(text_moments):
        raise ValueError(f"the answer moments are for {sorted(answer_moments)}, the text moments for {sorted(text_moments)}")
    return {name: (moment.double() + answer_weight * answer_moments[name].to(moment.device).double()).float()
            for name, moment in text_moments.items()}
