"""The editor API: apply fact edits to a base model in one pass, inspect them, revert them exactly.

    model, tokenizer = mend.load_base_model("smollm2-135m")
    editor = mend.Editor.untrained(model, tokenizer)        # or mend.Editor.load("runs/x/best")
    result = editor.edit("The Eiffel Tower is in", "Rome")  # one forward/backward + one editor pass
    editor.revert()                                           # weights back bit for bit

Several facts in one `edit_many` are captured each with its own loss (in chunks of
``editor.edit_chunk`` facts per pass) and aggregated into one update per matrix (`mend.aggregate`).
A lifelong editor (``lifelong=True``, `remembers`) keeps an `mend.memory.EditMemory` across edits.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .aggregate import MomentBasis, RefitState, aggregate_facts, own_values, refit_increment, ridge_lambda
from .batching import EditInputError, TokenBatch, check_pairs, encode_pairs
from .calibration import Calibration, fact_margins, search_scale
from .capture import capture_rank1
from .checkpoint import CheckpointError, atomic_write_dir, recover_dir, load_tensors, load_yaml, save_tensors, save_yaml
from .config import Aggregation, MemorySolve, ModelConfig, SolveKeys, editor_config
from .fingerprint import N_PROJECTIONS, fingerprint, legacy_mismatch, mismatch
from .memory import (EditMemory, MemoryEntry, answer_key_moments, check_moments, key_moments, mix_moments, pair_batches,
                     recorded_inputs)
from .models import load_base_model, model_identity
from .networks import MendNetworks, update_from
from .scoring import target_logits
from .targets import EditTarget, resolve_targets, to_storage

FORMAT_VERSION = 1
WEIGHTS_FILE = "editor.safetensors"
CONFIG_FILE = "editor.yaml"
MEMORY_FILE = "memory.safetensors"  # a lifelong editor's memory
REFIT_REFRESH = 100  # a lifelong refit factorises afresh every this many edits, bounding rounding drift
# editor config keys that only change how an edit is solved, not the trained networks (`Editor.configure`)
EDIT_TIME_SETTINGS = ("preserve_weight", "memory_weight", "memory_solve", "solve_keys", "edit_chunk", "edit_scale", "keep_weight",
                      "edit_margin", "edit_margin_passes", "edit_max_scale")
PRESERVED_FILE = "preserved.safetensors"  # preserved knowledge: E[u u^T] of generic text per matrix
KEEP_LABELS = ("keep prompt", "keep target")  # how input errors name a fact to keep
ADDED_PARAMETERS = {"log_ridges"}  # absent from older checkpoints; they start at their config value


class EditFailedError(RuntimeError):
    """The editor produced an unusable update (NaN or inf); the model was left unchanged."""


@dataclass(eq=False)
class EditResult:
    """What one call of `Editor.edit` / `Editor.edit_many` did. Results compare by identity: two edits
    of the same fact are two results, and `Editor.revert` undoes exactly the one it is given.

    Attributes:
        edit_id: sequence number of the edit within its editor.
        pairs: the (prompt, target) pairs applied together.
        changed: names of the matrices that changed.
        update_norms: Frobenius norm of each matrix's update.
        loss: the edit loss (mean target NLL) before the edit.
        seconds: wall time of the whole edit (forward, backward, editor pass, calibration, apply).
        calibration: how ``editor.edit_margin`` scaled the update (`mend.calibration.Calibration`);
            None when the editor applies its trained step as it is.
    """

    edit_id: int
    pairs: list[tuple[str, str]]
    changed: list[str]
    update_norms: dict[str, float]
    loss: float
    seconds: float
    calibration: Calibration | None = None
    _factors: dict = field(default_factory=dict, repr=False)
    _memory: MemoryEntry | None = field(default=None, repr=False)


def _update_norm(u_t: torch.Tensor, delta_t: torch.Tensor, lr: torch.Tensor) -> float:
    """||lr * delta~^T u~||_F from the factors alone: sqrt(sum((U U^T) * (D D^T))) is (N, N) work."""
    gram = (u_t @ u_t.t()) * (delta_t @ delta_t.t())  # (N, N)
    return float(lr.abs() * gram.sum().clamp(min=0).sqrt())


class Editor:
    """A base model, its tokenizer and MEND editor networks; edits the model's weights in place.

    Args:
        aggregation: "ridge" or "sum", how the facts of one edit become one update (default: the
            editor config's ``aggregation``).
        lifelong: remember edits across calls (default: the editor config's ``lifelong``); see
            `remembers`, `reset_memory` and `mend.memory`.
    """

    def __init__(self, model, tokenizer, networks: MendNetworks, *, max_length: int = 128, model_config=None,
                 aggregation: str | Aggregation | None = None, lifelong: bool | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.networks = networks.to(self.device)
        self.max_length = int(max_length)
        self.model_config = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_config or {})
        self.targets: list[EditTarget] = networks.targets
        config = networks.config
        try:
            self.aggregation = Aggregation(config.aggregation if aggregation is None else aggregation)
        except ValueError:
            raise ValueError(f"aggregation must be one of {[a.value for a in Aggregation]}, "
                             f"got {aggregation!r}") from None
        lifelong = bool(config.lifelong if lifelong is None else lifelong)
        if lifelong and self.aggregation != Aggregation.ridge:
            raise ValueError(f"a lifelong editor needs aggregation='ridge', got {self.aggregation.value!r}")
        self.memory: EditMemory | None = EditMemory.for_networks(networks, self.device) if lifelong else None
        self._memory_base: dict[str, torch.Tensor] | None = None  # the memory when _originals was taken
        # the weights the memory's first edit was made to: a refit captures every later edit on them
        self._fit_base: dict[str, torch.Tensor] | None = None
        # name -> ((memory, its version, preserved basis, lambda), A^-1 and F of the joint fit): lets the
        # next refit update A^-1 by Woodbury instead of factorising; unused once anything it depends on changes
        self._refit_states: dict[str, tuple[tuple, RefitState]] = {}
        self._pending_refit: dict[str, tuple] = {}  # (preserved basis, lambda, state) the edit being made leaves
        self.preserved: dict[str, torch.Tensor] = {}  # name -> (d_in, d_in) E[u u^T] of generic text
        self._basis_cache: dict[str, tuple] = {}  # name -> (moment, weight, its MomentBasis)
        self._params = dict(model.named_parameters())
        self._originals: dict[str, torch.Tensor] | None = None
        self._applied: list[EditResult] = []
        self._ids = itertools.count()
        self.fingerprints = {t.name: fingerprint(self._params[t.name]) for t in self.targets}

    # ------------------------------------------------------------------ construction
    @classmethod
    def untrained(cls, model, tokenizer, config=None) -> "Editor":
        """An editor whose networks are exactly the identity: an edit is one gradient step of size
        ``editor.init_lr`` on each target matrix.

        Args:
            config: None, or a full mend config (with ``model`` and ``editor`` sections), or a dict of
                them; ``model.edit_params`` / ``model.edit_last_n_blocks`` choose the edited matrices.
        """
        config = OmegaConf.create(config) if isinstance(config, dict) else config
        model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), (config.get("model") if config is not None else None) or {})
        editor_cfg = editor_config(config.get("editor") if config is not None else None)
        targets = resolve_targets(model, model_cfg.edit_params, model_cfg.edit_last_n_blocks)
        networks = MendNetworks(targets, editor_cfg)
        return cls(model, tokenizer, networks, max_length=model_cfg.max_length, model_config=model_cfg)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def configure(self, **settings) -> None:
        """Change how later edits are solved, keeping the trained networks: any of `EDIT_TIME_SETTINGS`
        (``preserve_weight``, ``memory_weight``, ``solve_keys``, ``edit_chunk``, ``edit_scale``, ``keep_weight``,
        ``edit_margin``, ``edit_margin_passes``, ``edit_max_scale``), validated as in a
        config and saved with the editor. Variants (`variant`) share the setting; applied edits stay."""
        unknown = sorted(set(settings) - set(EDIT_TIME_SETTINGS))
        if unknown:
            raise ValueError(f"{unknown} cannot be changed on a trained editor; the edit-time settings are "
                             f"{list(EDIT_TIME_SETTINGS)}")
        self.networks.config = editor_config(OmegaConf.merge(self.networks.config, settings))
        self._basis_cache.clear()

    def variant(self, *, aggregation: str | Aggregation | None = None, lifelong: bool | None = None) -> "Editor":
        """Another editor of the same model with the same networks (shared, not copied), with its own
        edit history and, when lifelong, a copy of this editor's memory (or an empty one)."""
        other = Editor(self.model, self.tokenizer, self.networks, max_length=self.max_length,
                       model_config=self.model_config, aggregation=aggregation or self.aggregation,
                       lifelong=self.remembers if lifelong is None else lifelong)
        if other.memory is not None and self.memory is not None:
            other.memory.load_tensors(self.memory.tensors())
        other.preserved = dict(self.preserved)
        return other

    # ------------------------------------------------------------------ lifelong memory
    @property
    def remembers(self) -> bool:
        """True for a lifelong editor: each edit is computed knowing the edits made before it."""
        return self.memory is not None

    def reset_memory(self) -> None:
        """Forget the edits remembered so far (the weights stay as they are; `revert` still undoes
        applied edits but no longer changes the memory for them). Preserved knowledge stays."""
        self._require_memory("reset_memory")
        self.memory.reset()
        self._fit_base = None
        self._refit_states = {}  # the held joint fit was of the memory just forgotten (no use, ~d_in^2 per matrix)
        for result in self._applied:
            result._memory = None
        if self._memory_base is not None:
            self._memory_base = self.memory.tensors()

    def preserve(self, texts: list[str], *, answers: list[tuple[str, str]] | None = None, answer_weight: float = 1.0,
                 batch_size: int = 8) -> None:
        """Keep the outputs at the layer inputs of generic ``texts`` in every later ridge solve
        (preserved knowledge): their key second moment E[u u^T], weighted by ``editor.preserve_weight``,
        computed on the model as it is now and saved with the editor. ``editor.preserved = {}`` drops it.

        ``answers``: (prompt, answer) facts whose answer positions to keep as well: their moment
        (`mend.memory.answer_key_moments`) is added with ``answer_weight``. Those are the keys an edit
        of a neighbouring fact (same relation, another subject) would otherwise move."""
        moments = key_moments(self.model, self.targets, self.tokenizer, list(texts), max_length=self.max_length,
                              batch_size=batch_size)
        if answers:
            moments = mix_moments(moments, answer_key_moments(self.model, self.targets, self.tokenizer, list(answers),
                                                              max_length=self.max_length, batch_size=batch_size),
                                  answer_weight)
        self.preserved = check_moments(moments, self.targets)

    def _moment(self, name: str):
        """C of matrix ``name`` for the next solve (float64), or None when there is nothing to keep.
        Preserved knowledge alone comes as its `MomentBasis` (computed once), for the cheaper solve."""
        config = self.networks.config
        parts = []
        remembered = self.memory.moment(name) if self._holds_memory else None
        if remembered is not None and config.memory_weight > 0:
            parts.append(config.memory_weight * remembered.double())
        if name in self.preserved and config.preserve_weight > 0:
            if not parts:
                return self._preserved_basis(name, config.preserve_weight)
            parts.append(config.preserve_weight * self.preserved[name].to(self.device, torch.float64))
        return sum(parts[1:], parts[0]) if parts else None

    @property
    def _holds_memory(self) -> bool:
        """A lifelong editor whose solves hold the outputs at earlier edits' inputs (``memory_solve=hold``)."""
        return self.memory is not None and MemorySolve(self.networks.config.memory_solve) == MemorySolve.hold

    @contextlib.contextmanager
    def _on_fit_base(self):
        """Within the block, the edited matrices hold the weights the memory's first edit was made to,
        when this editor refits (``memory_solve=refit``): every remembered edit is then captured on the
        same model, and the memory's fit is exactly the one solve of all of them. Restored bit for bit."""
        base = self._fit_base if self.memory is not None and not self._holds_memory else None
        if base is None:
            yield
            return
        current = {name: self._params[name].detach().clone() for name in base}
        try:
            with torch.no_grad():
                for name, weight in base.items():
                    self._params[name].copy_(weight)
            yield
        finally:
            with torch.no_grad():
                for name, weight in current.items():
                    self._params[name].copy_(weight)

    def _refit(self, name: str, keys: torch.Tensor, deltas: torch.Tensor, facts: torch.Tensor, lr, rho,
               solve: torch.Tensor | None, guard: torch.Tensor | None, entry: MemoryEntry):
        """One matrix's lifelong update by recursive least squares (`mend.aggregate.refit_increment`);
        what it fitted goes into ``entry``. The first edit of an empty memory is the stateless solve."""
        config = self.networks.config
        values = own_values(keys, deltas, facts, rows=solve).to(deltas.dtype)  # (m, d_out)
        fitted_keys = keys if solve is None else keys[solve]  # (m, d_in)
        remembered = self.memory.fit(name)
        if remembered is None:
            factors = aggregate_facts(keys, deltas, lr, facts, aggregation=self.aggregation, rho=rho,
                                      moment=self._moment(name), solve=solve, guard=guard)
            lam = ridge_lambda(fitted_keys, rho)
            if guard is not None and len(guard):  # the fit so far is zero: kept keys keep a zero shift
                fitted_keys = torch.cat([fitted_keys, guard.to(fitted_keys.dtype)])
                values = torch.cat([values, values.new_zeros(len(guard), values.shape[1])])
            fitted = (fitted_keys, values)
        else:
            gram, cross, lam = remembered
            preserved = None
            if name in self.preserved and config.preserve_weight > 0:
                preserved = self._preserved_basis(name, config.preserve_weight)
            weight = float(config.memory_weight)
            state = None  # the held A^-1 and F serve only this memory state and these solve settings
            held = self._refit_states.get(name)
            if weight == 1.0 and held is not None and self.memory.n_edits % REFIT_REFRESH != 0:
                (memory, version, basis, held_lam), held_state = held
                if memory is self.memory and version == self.memory.version and basis is preserved \
                        and held_lam == float(lam):
                    state = held_state
            factors, fitted, after = refit_increment(
                fitted_keys, values, lr, lam=lam, gram=gram, cross=cross,
                moment=None if preserved is None else preserved.dense(), memory_weight=weight, guard=guard,
                state=state)
            if weight == 1.0:
                self._pending_refit[name] = (preserved, float(lam), after)
        entry.fitted[name] = tuple(t.detach().float() for t in fitted)
        entry.ridges[name] = lam.detach().double() if torch.is_tensor(lam) else torch.tensor(float(lam))
        return factors

    def _preserved_basis(self, name: str, weight: float) -> MomentBasis:
        """The eigenbasis of ``weight * preserved[name]``, kept until either changes."""
        moment = self.preserved[name]
        held = self._basis_cache.get(name)
        if held is None or held[0] is not moment or held[1] != weight:
            held = (moment, weight, MomentBasis.of(weight * moment.to(self.device, torch.float64)))
            self._basis_cache[name] = held
        return held[2]

    def _kept_keys(self, keep: list[tuple[str, str]]) -> dict[str, torch.Tensor] | None:
        """name -> (n, d_in): the raw input of every matrix at every position of the ``keep`` facts
        (prompt and answer), on the model as it is now, times ``sqrt(keep_weight)``; None for no facts."""
        weight = float(self.networks.config.keep_weight)
        if not keep or weight == 0:
            return None
        # every real position up to the last answer prediction, edit_chunk facts per forward
        batches = pair_batches(self.tokenizer, keep, lambda batch: batch.positions_with_gradient,
                               batch_size=int(self.networks.config.edit_chunk), max_length=self.max_length,
                               what=KEEP_LABELS)
        rows = {t.name: [] for t in self.targets}
        for inputs in recorded_inputs(self.model, self.targets, batches):
            for name, u in inputs.items():
                rows[name].append(u.float() * weight ** 0.5)
        return {name: torch.cat(parts) for name, parts in rows.items()}

    def _require_memory(self, what: str) -> None:
        if self.memory is None:
            raise ValueError(f"{what} needs a lifelong editor: build it with lifelong=True "
                             f"(Editor(..., lifelong=True), Editor.load(path, lifelong=True) or editor.lifelong=true)")

    # ------------------------------------------------------------------ editing
    def compute_updates(self, pairs, *, keep=None) -> tuple[dict[str, torch.Tensor], dict, float]:
        """The updates an edit would apply, without applying them (nor touching the memory). With
        ``editor.edit_margin`` the search tries scaled updates on the model and puts it back bit for bit.

        Returns:
            (updates name -> dW (d_out, d_in) float32, factors name -> (K, D', lr) for exact replay,
            loss: the mean over facts of each fact's mean target NLL).
        """
        pairs = check_pairs(pairs)
        self._check_calibration()
        factors, loss, _, before = self._prepare(pairs, self._check_keep(keep))
        factors, _ = self._calibrate(factors, before)
        return {name: update_from(*f) for name, f in factors.items()}, factors, loss

    def _check_keep(self, keep) -> list[tuple[str, str]]:
        """The facts to keep as checked (prompt, answer) pairs, tokenised once here so that a bad one is
        refused before any work; [] for None or an empty collection."""
        if keep is None:
            return []
        if isinstance(keep, tuple) and len(keep) == 2 and all(isinstance(x, str) for x in keep):
            raise EditInputError(f"keep must be a list of (prompt, answer) pairs; wrap one fact in a list: "
                                 f"keep=[{keep!r}]")
        if not isinstance(keep, (str, bytes, dict)) and hasattr(keep, "__iter__"):
            keep = list(keep)
            if not keep:
                return []
        if self.aggregation != Aggregation.ridge:
            raise ValueError(f"keep needs aggregation='ridge' (a sum of rank-1 updates has no solve to keep "
                             f"facts in), this editor's is {self.aggregation.value!r}")
        keep = check_pairs(keep, what="keep")
        encode_pairs(self.tokenizer, [p for p, _ in keep], [a for _, a in keep], max_length=self.max_length,
                     what=KEEP_LABELS)
        return keep

    def _prepare(self, pairs: list[tuple[str, str]], kept_facts: list[tuple[str, str]] = ()
                 ) -> tuple[dict, float, MemoryEntry | None, tuple[list[TokenBatch], torch.Tensor] | None]:
        """Capture every fact with its own loss, chunk by chunk, transform, aggregate; the keys of the
        ``kept_facts`` join every solve (`_kept_keys`).

        Returns (factors name -> (K (n, d_in), D' (n, d_out), lr), loss, what the edit adds to the memory,
        what the calibration starts from: the chunks' batches and (n_facts,) each fact's least target
        margin on the unedited model (`mend.calibration.fact_margins`); None unless ``editor.edit_margin``
        is set).
        """
        config = self.networks.config
        chunk = int(config.edit_chunk)
        entry = MemoryEntry() if self.memory is not None else None
        norms = self.memory.norms_for(self.networks) if self.memory is not None else None
        keys, deltas, facts, solve = {t.name: [] for t in self.targets}, {t.name: [] for t in self.targets}, [], []
        calibrating = config.edit_margin is not None
        batches, margins = [], []  # per capture pass: its batch and (chunk,) pre-edit margins from its own logits
        fit_predictions = SolveKeys(config.solve_keys) == SolveKeys.predictions
        loss_sum = 0.0
        self._pending_refit = {}
        with self._on_fit_base():  # a refit captures every edit on the same weights
            was_training = self.networks.training
            self.networks.eval()  # the networks' own statistics are frozen at edit time
            try:
                for start in range(0, len(pairs), chunk):
                    prompts, targets = zip(*pairs[start : start + chunk])
                    batch = encode_pairs(self.tokenizer, list(prompts), list(targets), max_length=self.max_length)
                    batch = batch.to(self.device)
                    own_loss = torch.arange(len(batch), device=self.device)  # each fact its own loss: no 1/k
                    capture = capture_rank1(self.model, self.targets, batch, row_groups=own_loss)
                    loss_sum += float(capture.loss) * len(batch)
                    if calibrating:
                        batches.append(batch)
                        margins.append(fact_margins(capture.logits, batch))
                    facts.append(capture.rows + start)
                    keep = capture.predicting if fit_predictions else None  # (n,) the positions the solve fits
                    if keep is not None:
                        solve.append(keep)
                    with torch.no_grad():
                        for name, (u_t, delta_t, _) in self.networks.transform_factors(capture.factors, norms).items():
                            keys[name].append(u_t)
                            deltas[name].append(delta_t)
                    if entry is not None:  # the memory keeps the keys the solve fits
                        for target in self.targets:
                            u, delta = capture.factors[target.name]
                            entry.add(target.name, self.networks.network_of[target.name], u, delta, keep=keep)
                    del capture
            finally:
                self.networks.train(was_training)
            facts, solve = torch.cat(facts), torch.cat(solve) if fit_predictions else None
            kept = self._kept_keys(list(kept_facts))
        lrs, ridges = self.networks.step_sizes(), self.networks.ridges()
        lrs = {name: lr * float(config.edit_scale) for name, lr in lrs.items()}  # the update is linear in lr
        factors = {}
        with torch.no_grad():
            for target in self.targets:
                name = target.name
                if self.memory is not None and not self._holds_memory:
                    factors[name] = tuple(t.detach() for t in self._refit(
                        name, torch.cat(keys[name]), torch.cat(deltas[name]), facts, lrs[name], ridges[name], solve,
                        None if kept is None else kept[name], entry))
                    continue
                factors[name] = tuple(t.detach() for t in aggregate_facts(
                    torch.cat(keys[name]), torch.cat(deltas[name]), lrs[name], facts,
                    aggregation=self.aggregation, rho=ridges[name], moment=self._moment(name),
                    solve=solve, guard=None if kept is None else kept[name]))
        return factors, loss_sum / len(pairs), entry, (batches, torch.cat(margins)) if calibrating else None

    def _check_calibration(self) -> None:
        if self.memory is not None and self.networks.config.edit_margin is not None:
            raise ValueError("editor.edit_margin needs a stateless editor: a lifelong edit refits the whole memory, "
                             "which one edit's margin cannot scale; configure(edit_margin=None) or edit with a "
                             "stateless variant (variant(lifelong=False))")

    def _calibrate(self, factors: dict, before: tuple[list[TokenBatch], torch.Tensor] | None
                   ) -> tuple[dict, Calibration | None]:
        """Scale the update by ``editor.edit_margin``'s search (`mend.calibration`): the least multiple of
        the trained step at which every fact's target leads by the margin. ``before`` is what `_prepare`
        captured: the facts' batches and their pre-edit margins (None: no calibration). The weights are
        set to each tried ``W + s dW`` and back, bit for bit, whatever happens; the factors come back
        with ``lr * s``."""
        if before is None:
            return factors, None
        config = self.networks.config
        batches, margins_before = before
        originals = {name: self._params[name].detach().clone() for name in factors}

        @torch.no_grad()
        def margin_at(scale: float) -> float:
            scaled = {name: update_from(keys, values, lr * scale) for name, (keys, values, lr) in factors.items()}
            for name, weight in self._updated_weights(scaled, base=originals).items():
                self._params[name].copy_(weight)
            return min(float(fact_margins(target_logits(self.model, batch), batch).min()) for batch in batches)

        try:
            calibration = search_scale(margin_at, float(config.edit_margin), float(margins_before.min()),
                                       max_scale=float(config.edit_max_scale), passes=int(config.edit_margin_passes))
        finally:
            with torch.no_grad():
                for name, original in originals.items():
                    self._params[name].copy_(original)
        return {name: (keys, values, lr * calibration.scale) for name, (keys, values, lr) in factors.items()}, calibration

    def edit(self, prompt: str, target: str, *, keep=None) -> EditResult:
        """Make the model say ``target`` after ``prompt``: one forward/backward + one editor pass (and, with
        ``editor.edit_margin``, a few forward passes that scale the update).
        ``keep``: (prompt, answer) facts the edit must leave alone (see `edit_many`)."""
        return self.edit_many([(prompt, target)], keep=keep)

    def edit_many(self, pairs, *, keep=None) -> EditResult:
        """Apply several (prompt, target) facts together as one edit: each fact is captured with its
        own loss, and the facts' updates are aggregated (``aggregation``) into one per matrix.

        ``keep``: (prompt, answer) facts to leave alone, for instance the edited fact's neighbours (same
        relation, another subject). The layer inputs at every position of each of them join the ridge
        solve with weight ``editor.keep_weight``, so the update barely changes what the edited
        matrices output there: one more forward pass, no backward.

        With ``editor.edit_margin`` set, the update is then scaled to the least multiple of the trained
        step at which every fact's target leads by that margin (`mend.calibration`; up to
        ``editor.edit_margin_passes`` tries of a forward pass each, no backward); ``result.calibration`` says how."""
        start = time.perf_counter()
        pairs = check_pairs(pairs)
        self._check_calibration()
        factors, loss, entry, before = self._prepare(pairs, self._check_keep(keep))
        if before is not None:  # the trained step must be usable before the search tries multiples of it
            self._finite_weights({name: update_from(*f) for name, f in factors.items()})
        factors, calibration = self._calibrate(factors, before)
        updates = {name: update_from(*f) for name, f in factors.items()}
        new_weights = self._finite_weights(updates)  # checked in the weights' own dtype before any write
        changed = [name for name, weight in new_weights.items() if not torch.equal(weight, self._params[name])]
        if self._originals is None:
            self._originals = {t.name: self._params[t.name].detach().clone() for t in self.targets}
            self._memory_base = self.memory.tensors() if self.memory is not None else None
        before = None
        if self.memory is not None and self.memory.n_edits == 0:  # the weights a refit captures on from now
            before = {t.name: self._params[t.name].detach().clone() for t in self.targets}
        try:
            with torch.no_grad():  # W + dW computed once above, the same arithmetic as `_apply`
                for name, weight in new_weights.items():
                    self._params[name].copy_(weight)
        except BaseException:
            self._restore(self._applied)
            raise
        if self.memory is not None:
            if self.memory.n_edits == 0:
                self._fit_base = before
            self.memory.absorb(entry)
            # the joint fit after this edit, for the next one (a stale entry is never used: versions differ)
            self._refit_states = {name: ((self.memory, self.memory.version, preserved, lam), state)
                                  for name, (preserved, lam, state) in self._pending_refit.items()}
            self._pending_refit = {}
        result = EditResult(
            edit_id=next(self._ids),
            pairs=pairs,
            changed=changed,
            update_norms={name: _update_norm(*f) for name, f in factors.items()},
            loss=loss,
            seconds=time.perf_counter() - start,
            calibration=calibration,
            _factors=factors,
            _memory=entry,
        )
        self._applied.append(result)
        return result

    def _finite_weights(self, updates: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`_updated_weights`, refused with `EditFailedError` if any is not finite."""
        new_weights = self._updated_weights(updates)
        for name, weight in new_weights.items():
            # a NaN or inf anywhere makes the float32 sum non-finite: one reduction instead of a mask
            if not torch.isfinite(weight.sum(dtype=torch.float32)):
                raise EditFailedError(f"the update for {name} contains NaN or inf, or overflows "
                                      f"{weight.dtype}; the model was not changed")
        return new_weights

    @torch.no_grad()
    def _updated_weights(self, updates: dict[str, torch.Tensor], base: dict[str, torch.Tensor] | None = None
                         ) -> dict[str, torch.Tensor]:
        """What each target weight would become (the same arithmetic as `_apply`, out of place), from the
        weights as they are now or from ``base`` (name -> weight)."""
        base = self._params if base is None else base
        return {t.name: base[t.name] + to_storage(updates[t.name], t).to(base[t.name].dtype) for t in self.targets}

    @torch.no_grad()
    def _apply(self, updates: dict[str, torch.Tensor]) -> None:
        for target in self.targets:
            param = self._params[target.name]
            param.add_(to_storage(updates[target.name], target).to(param.dtype))

    @torch.no_grad()
    def _restore(self, keep: list[EditResult]) -> None:
        """Set the weights to the originals plus the updates of ``keep``, replayed in order; the
        memory likewise to what it was then plus the entries of ``keep``."""
        if self._originals is None:
            return
        for name, original in self._originals.items():
            self._params[name].copy_(original)
        for result in keep:
            self._apply({name: update_from(*f) for name, f in result._factors.items()})
        if self.memory is not None and self._memory_base is not None:
            self.memory.load_tensors(self._memory_base)
            for result in keep:
                if result._memory is not None:
                    self.memory.absorb(result._memory)
            if self.memory.n_edits == 0:
                self._fit_base = None

    def revert(self, result: EditResult | None = None) -> None:
        """Undo every edit (default), or one edit given by its result; weights return bit for bit
        to what they were without that edit's update."""
        if result is None:
            self._restore([])
            self._applied.clear()
            self._originals = self._memory_base = None  # the next edit snapshots the weights as they are then
            return
        if not isinstance(result, EditResult):
            raise TypeError(f"revert takes an EditResult returned by edit/edit_many, or nothing; got "
                            f"{type(result).__name__}: {result!r}")
        if not any(r is result for r in self._applied):
            raise ValueError(f"edit {result.edit_id} is not applied to this editor's model (already reverted "
                             f"or committed, or made by another editor)")
        keep = [r for r in self._applied if r is not result]
        self._restore(keep)
        self._applied = keep
        if not keep:
            self._originals = self._memory_base = None

    @contextlib.contextmanager
    def edited(self, prompt: str, target: str):
        """Apply an edit for the duration of a ``with`` block, then revert it."""
        result = self.edit(prompt, target)
        try:
            yield result
        finally:
            if any(r is result for r in self._applied):
                self.revert(result)

    @property
    def applied(self) -> list[EditResult]:
        """The edits currently applied, oldest first."""
        return list(self._applied)

    def commit(self) -> None:
        """Keep the edits applied so far for good: the weights and the memory stay as they are, but
        the editor forgets how to undo them, so `revert` no longer goes back past this point (the
        model as it is now becomes the one `revert` restores). Each applied edit keeps its factors
        and memory entry for `revert` (about 2 MB per edit for SmolLM2's 9 matrices); a long lifelong
        run that will not revert calls this now and then to free them. The refit's base weights and
        held solve state stay, so later edits are computed exactly as without the commit."""
        for result in self._applied:
            result._factors, result._memory = {}, None
        self._applied = []
        self._originals = self._memory_base = None

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> Path:
        """Write ``editor.safetensors`` and ``editor.yaml`` to the directory ``path``, atomically; a
        lifelong editor also writes its memory (``memory.safetensors``) and loads as lifelong."""
        from . import __version__

        path = Path(path)
        editor_meta = OmegaConf.to_container(self.networks.config, enum_to_str=True)
        editor_meta.update(aggregation=self.aggregation.value, lifelong=self.remembers)
        meta = {
            "format_version": FORMAT_VERSION,
            "mend_version": __version__,
            "editor": editor_meta,
            "model": {
                **OmegaConf.to_container(self.model_config),
                "identity": model_identity(self.model),
            },
            "targets": [
                {"name": t.name, "d_in": t.d_in, "d_out": t.d_out, "transposed": t.transposed, "layer": t.layer,
                 "fingerprint": self.fingerprints[t.name]}
                for t in self.targets
            ],
        }

        def write(staging):
            save_tensors(self.networks.state_dict(), Path(staging) / WEIGHTS_FILE)
            if self.memory is not None:
                save_tensors(self.memory.tensors(), Path(staging) / MEMORY_FILE)
            if self.preserved:
                save_tensors(self.preserved, Path(staging) / PRESERVED_FILE)
            save_yaml(meta, Path(staging) / CONFIG_FILE)

        atomic_write_dir(path, write)
        return path

    @classmethod
    def load(cls, path, model=None, tokenizer=None, *, device=None, aggregation: str | None = None,
             lifelong: bool | None = None, settings: dict | None = None) -> "Editor":
        """Load an editor saved by `save`. Without ``model``, the base model it was trained for is
        loaded. A model that is not the one the editor was trained for is refused (CheckpointError).

        ``aggregation`` and ``lifelong`` default to what was saved: an editor saved as lifelong loads
        remembering, with its memory. ``lifelong=False`` loads it stateless (the memory is ignored).
        The memory describes edits made to the model it was saved from; a fresh base model does not
        carry them. ``settings`` changes edit-time settings after loading (`configure`)."""
        path = recover_dir(path)
        if not path.is_dir():
            raise CheckpointError(f"editor checkpoint {path} is not a directory")
        meta = load_yaml(path / CONFIG_FILE)
        for key in ("format_version", "editor", "model", "targets"):
            if key not in meta:
                raise CheckpointError(f"{path / CONFIG_FILE} lacks the key {key!r}")
        if meta["format_version"] != FORMAT_VERSION:
            raise CheckpointError(f"{path} has format version {meta['format_version']}, this mend reads {FORMAT_VERSION}")
        if not isinstance(meta["model"], dict) or not isinstance(meta["editor"], dict):
            raise CheckpointError(f"{path / CONFIG_FILE}: 'model' and 'editor' must be mappings")
        saved_targets = meta["targets"]
        if not isinstance(saved_targets, list) or not saved_targets or not all(isinstance(t, dict) for t in saved_targets):
            raise CheckpointError(f"{path / CONFIG_FILE}: 'targets' must be a non-empty list of mappings, got {saved_targets!r}")
        state = load_tensors(path / WEIGHTS_FILE)
        model_meta = dict(meta["model"])
        identity = model_meta.pop("identity", {})
        if model is None:
            model, tokenizer = load_base_model(identity.get("name_or_path") or model_meta.get("name"),
                                               dtype=model_meta.get("dtype"), device=device)
        elif tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        try:
            _check_same_model(path, identity, saved_targets, model)
            model_cfg = OmegaConf.merge(OmegaConf.structured(ModelConfig), model_meta)
            targets = resolve_targets(model, [t["name"] for t in saved_targets])
            networks = MendNetworks(targets, meta["editor"])
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError, OmegaConfBaseException) as error:
            raise CheckpointError(f"{path / CONFIG_FILE} is malformed: {type(error).__name__}: {error}") from None
        try:
            missing, unexpected = networks.load_state_dict(state, strict=False)
        except RuntimeError as error:  # tensor shapes that do not match the config
            raise CheckpointError(f"{path / WEIGHTS_FILE} does not match its config {CONFIG_FILE} (one of the two is damaged or from another editor): {error}") from None
        missing = [name for name in missing if name not in ADDED_PARAMETERS]
        if missing or unexpected:
            raise CheckpointError(f"{path / WEIGHTS_FILE} does not match its config {CONFIG_FILE} (one of the two is damaged or from another editor): missing {missing}, unexpected {unexpected}")
        editor = cls(model, tokenizer, networks, max_length=model_cfg.max_length, model_config=model_cfg,
                     aggregation=aggregation, lifelong=lifelong)
        if editor.memory is not None and (path / MEMORY_FILE).is_file():
            try:
                editor.memory.load_tensors(load_tensors(path / MEMORY_FILE, editor.device))
            except ValueError as error:
                raise CheckpointError(f"{path / MEMORY_FILE} does not fit this editor: {error}") from None
        if (path / PRESERVED_FILE).is_file():
            try:
                editor.preserved = check_moments(load_tensors(path / PRESERVED_FILE, editor.device), editor.targets)
            except ValueError as error:
                raise CheckpointError(f"{path / PRESERVED_FILE} does not fit this editor: {error}") from None
        if settings:
            editor.configure(**settings)
        return editor


def _check_same_model(path, identity: dict, saved_targets: list[dict], model) -> None:
    current = model_identity(model)
    required = ("model_type", "hidden_size", "num_layers", "vocab_size", "num_parameters")
    missing = [key for key in required if key not in identity]
    if missing or any("fingerprint" not in t for t in saved_targets):
        raise CheckpointError(f"{path / CONFIG_FILE} lacks the base model's identity ({missing or 'fingerprints'}); "
                              f"cannot check that it fits this model")
    problems = [
        f"{key}: checkpoint {identity[key]!r}, model {current[key]!r}"
        for key in required
        if identity[key] != current[key]
    ]
    params = dict(model.named_parameters())
    for saved in saved_targets:
        name = saved["name"]
        if name not in params:
            problems.append(f"the model has no parameter {name}")
            continue
        shape = tuple(params[name].shape)
        expected = (saved["d_in"], saved["d_out"]) if saved["transposed"] else (saved["d_out"], saved["d_in"])
        if shape != expected:
            problems.append(f"{name}: checkpoint shape {expected}, model {shape}")
            continue
        # random projections within the rounding of the coarser dtype (checkpoints before them: sums)
        saved_print = saved["fingerprint"]
        if not isinstance(saved_print, (list, dict)):
            raise TypeError(f"the fingerprint of {name} must be a mapping, got {saved_print!r}")
        if isinstance(saved_print, dict) and len(saved_print.get("projections") or ()) != N_PROJECTIONS:
            raise CheckpointError(f"{path / CONFIG_FILE} is damaged or truncated: the fingerprint of {name} holds "
                                  f"{len(saved_print.get('projections') or ())} projections, a whole one {N_PROJECTIONS}")
        differs = (legacy_mismatch(params[name], saved_print) if isinstance(saved_print, list)
                   else mismatch(params[name], saved_print))
        if differs:
            problems.append(f"{name}: weights differ from the model the editor was trained for ({differs})")
    if problems:
        raise CheckpointError(
            f"the editor in {path} was trained for another base model ({identity.get('name_or_path', '?')}): "
            + "; ".join(problems[:6])
        )
