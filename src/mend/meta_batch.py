"""Meta-training batches: edit, equivalence and locality token batches for a step.

A step holds ``batch_size`` independent edits, each of ``n_edits`` facts applied together. Every row
carries the index of its edit (its group), so one forward pass scores all the edits of a step.

The records of step s are drawn from a seeded permutation, so a resumed run sees exactly the batches
an uninterrupted run would have seen, and each process of a data-parallel run sees its own slice.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .batching import TokenBatch, concat_batches, encode_pairs
from .data.records import EditRecord
from .prefix_forward import BlockOutput


@dataclass
class PrefixStates:
    """Cached hidden states entering block ``start`` for a step's rows (`mend.prefix_cache`).

    Attributes:
        pre: (B_pre, T_pre, d) for the rows of ``MetaBatch.pre``; post: (B_post, T_post, d) for ``post``.
    """

    start: int
    block_output: BlockOutput
    pre: torch.Tensor
    post: torch.Tensor

    def to(self, device) -> "PrefixStates":
        return PrefixStates(self.start, self.block_output, self.pre.to(device), self.post.to(device))


@dataclass
class MetaBatch:
    """One step's tensors.

    Attributes:
        pre: edit rows then locality rows, for the pre-edit pass (loss on the edit rows only).
        post: edit rows, equivalence rows, locality rows, for the edited forward.
        n_edit, n_equiv, n_loc: row counts of each kind.
        groups: (n_edit,) the edit (group) each record belongs to; equivalence and locality rows follow
            their record, so ``pre`` rows have groups ``[groups, locality_groups]`` and ``post`` rows
            ``[groups, groups, locality_groups]``.
        n_groups: number of independent edits.
        prefix: the rows' cached hidden states, when meta-training starts at the lowest edited block.
        loc_is_answer: (N_loc,) over the locality rows' target tokens, True at the probe's answer tokens,
            when those rows predict every token of the probe (``build_meta_batch(whole_locality=True)``);
            None when they predict the answer only.
    """

    pre: TokenBatch
    post: TokenBatch
    n_edit: int
    n_equiv: int
    n_loc: int
    groups: torch.Tensor
    n_groups: int
    prefix: PrefixStates | None = None
    loc_is_answer: torch.Tensor | None = None

    def to(self, device) -> "MetaBatch":
        return MetaBatch(self.pre.to(device), self.post.to(device), self.n_edit, self.n_equiv, self.n_loc,
                         self.groups.to(device), self.n_groups,
                         self.prefix.to(device) if self.prefix is not None else None,
                         self.loc_is_answer.to(device) if self.loc_is_answer is not None else None)

    @property
    def locality_groups(self) -> torch.Tensor:
        """(n_loc,) the edit of each locality row: ``groups`` repeated for the ``n_loc / n_edit`` probes
        of each record (probes of one record are consecutive)."""
        return self.groups.repeat_interleave(self.n_loc // self.n_edit)

    @property
    def pre_groups(self) -> torch.Tensor:
        return torch.cat([self.groups, self.locality_groups])

    @property
    def post_groups(self) -> torch.Tensor:
        return torch.cat([self.groups, self.groups, self.locality_groups])

    def pre_loss_rows(self) -> torch.Tensor:
        """(B_pre,) True on the edit rows of ``pre``."""
        rows = torch.zeros(len(self.pre), dtype=torch.bool, device=self.pre.input_ids.device)
        rows[: self.n_edit] = True
        return rows


class EditSampler:
    """Deterministic sampling of records for step ``s`` of process ``rank`` out of ``world``."""

    def __init__(self, records: list[EditRecord], per_step: int, seed: int, rank: int = 0, world: int = 1):
        if len(records) < per_step * world:
            raise ValueError(f"{len(records)} training records are too few for {per_step} per step x {world} processes")
        self.records = records
        self.per_step = per_step
        self.seed = seed
        self.rank = rank
        self.world = world
        self.per_epoch = len(records) // (per_step * world)
        self.locality_pool = [probe for r in records for probe in r.locality]
        # answer -> the pool's probes expecting it: a probe's hard negatives. In CounterFact a record's
        # neighbour expects the edited fact's old answer, so probes sharing it are that relation's neighbours.
        self.probes_by_answer: dict[str, list] = {}
        for probe in self.locality_pool:
            self.probes_by_answer.setdefault(_answer_key(probe.answer), []).append(probe)

    def _order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        return torch.randperm(len(self.records), generator=generator).tolist()

    def records_for_step(self, step: int) -> list[EditRecord]:
        epoch, index = divmod(step, self.per_epoch)
        order = self._order(epoch)
        start = (index * self.world + self.rank) * self.per_step
        return [self.records[i] for i in order[start : start + self.per_step]]

    def choose(self, step: int, records: list[EditRecord], loc_probes: int = 1, same_answer: int = 0):
        """Pick one paraphrase and ``loc_probes`` locality probes per record, seeded by the step: one of
        the record's own probes (its neighbour), then ``same_answer`` probes of other records that expect
        the same answer as that neighbour (any probe where none does), then probes of any training record
        (unrelated facts). The probes come record by record: ``loc_probes`` consecutive ones per record."""
        if not 0 <= same_answer <= loc_probes - 1:
            raise ValueError(f"same_answer={same_answer} probes must fit beside the record's own among {loc_probes}")
        rng = random.Random(f"{self.seed}-{step}-{self.rank}")
        equivalents = [rng.choice(r.rephrases) if r.rephrases else r.prompt for r in records]  # no draw without paraphrases
        if not self.locality_pool:
            raise ValueError("no locality probes in the training data; meta-training needs them")
        own = [rng.choice(r.locality or self.locality_pool) for r in records]
        others = []
        for first in own:
            hard = []
            if same_answer:
                alike = [p for p in self.probes_by_answer[_answer_key(first.answer)] if p.prompt != first.prompt]
                hard = [rng.choice(alike or self.locality_pool) for _ in range(same_answer)]
            others.append(hard + [rng.choice(self.locality_pool) for _ in range(loc_probes - 1 - same_answer)])
        localities = [probe for first, rest in zip(own, others) for probe in [first, *rest]]
        return equivalents, localities


def _answer_key(answer: str) -> str:
    return answer.strip().casefold()


def build_meta_batch(tokenizer, records: list[EditRecord], equivalents: list[str], localities, *, max_length: int,
                     n_edits: int = 1, prefix_cache=None, whole_locality: bool = False) -> MetaBatch:
    """Encode one step's records into pre-edit and post-edit batches; consecutive runs of ``n_edits``
    records form one edit. ``localities`` holds k probes per record, record by record (k >= 1). With a
    `mend.prefix_cache.PrefixCache`, the rows' cached hidden states come along (`MetaBatch.prefix`).
    With ``whole_locality`` the locality rows predict every token of the probe after its first, not only
    its answer (`MetaBatch.loc_is_answer` tells the two apart)."""
    if not localities or len(localities) % len(records):
        raise ValueError(f"{len(localities)} locality probes for {len(records)} records: need the same number per record")
    targets = [r.target for r in records]
    edit = encode_pairs(tokenizer, [r.prompt for r in records], targets, max_length=max_length, padding_side="right")
    equiv = encode_pairs(tokenizer, equivalents, targets, max_length=max_length, padding_side="right")
    loc = encode_pairs(
        tokenizer, [p.prompt for p in localities], [p.answer for p in localities], max_length=max_length,
        padding_side="right", what=("locality prompt", "locality answer"),
    )
    loc_is_answer = None
    if whole_locality:
        loc, loc_is_answer = predict_every_token(loc)
    pad_id = tokenizer.pad_token_id or 0
    pre = concat_batches([edit, loc], pad_id)
    post = concat_batches([edit, equiv, loc], pad_id)
    groups = torch.arange(len(records)) // n_edits
    prefix = None
    if prefix_cache is not None:
        prefix = PrefixStates(prefix_cache.start, prefix_cache.block_output, prefix_cache.gather(pre),
                              prefix_cache.gather(post))
    return MetaBatch(pre, post, len(edit), len(equiv), len(loc), groups, int(groups[-1]) + 1, prefix, loc_is_answer)


def predict_every_token(batch: TokenBatch) -> tuple[TokenBatch, torch.Tensor]:
    """The same right-padded rows with every real token after the first as a target, and (N,) True
    where a target token was one of the original targets (in `TokenBatch.target_ids` order)."""
    if bool(batch.attention_mask[:, 0].eq(0).any()):
        raise ValueError("predict_every_token needs right-padded rows (a real first token in every row)")
    every = batch.attention_mask.bool().clone()
    every[:, 0] = False
    was_target = batch.target_mask[:, 1:][every[:, 1:]]  # (N,) in row-major order, as target_ids
    return TokenBatch(batch.input_ids, batch.attention_mask, batch.position_ids, every), was_target


def token_kinds(batch: TokenBatch, counts: list[int]) -> torch.Tensor:
    """(N,) the kind index (0, 1, ...) of each target token, given consecutive row counts per kind."""
    bounds = torch.tensor(counts, device=batch.input_ids.device).cumsum(0)
    return torch.bucketize(batch.target_rows, bounds, right=True)
