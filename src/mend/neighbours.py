"""Retrieved neighbours: the keys of known facts nearest to an edit's, kept in its solve.

A fact edit is keyed on the layer input at the last prompt token ("The mother tongue of Danielle
Darrieux is" -> ...). In the last blocks that key mostly says which answer comes next, so the facts
an edit breaks are its neighbours: same relation, another subject, the edited fact's old answer.
A preserved moment over many texts (`mend.preserved`) weighs each of them as one key in thousands.

A `KeyBank` holds, for every edited matrix, the raw input at the last prompt token of many known
(prompt, answer) facts (the locality probes of training records), unit-normalised and stored in
float16. At edit time, each fact's own key at that position retrieves its ``k`` nearest bank keys
(cosine similarity), and the solve keeps the outputs there too:

    C_edit = preserve_weight * (C_preserved + neighbour_weight * (1/k) sum_j n_j n_j^T)     (d_in, d_in)

with ``n_j`` the retrieved keys rescaled to the mean norm of the bank's keys. The update is thereby
pushed into the part of the edit's key that its neighbours do not share: the subject. No prompt text
is kept, only keys.
"""

from __future__ import annotations

import torch

from .batching import encode_pairs
from .targets import EditTarget

BANK_PREFIX = "bank."


def first_predictions(predicting: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(N,) bool, True at the first position of each row that predicts a target token (the last
    prompt token). ``predicting`` (N,) bool, ``rows`` (N,) the row of each position, in row-major order."""
    hits = torch.nonzero(predicting).flatten()  # (P,)
    first = torch.ones_like(hits, dtype=torch.bool)
    first[1:] = rows[hits[1:]] != rows[hits[:-1]]
    out = torch.zeros_like(predicting)
    out[hits[first]] = True
    return out


class KeyBank:
    """Unit keys of known facts per edited matrix: name -> (M, d_in) float16, and their mean norm.

    Attributes:
        keys: name -> (M, d_in) float16, each row of unit norm.
        scales: name -> the mean norm of the raw keys (float), which the retrieved keys get back.
    """

    def __init__(self, keys: dict[str, torch.Tensor], scales: dict[str, float]):
        if set(keys) != set(scales):
            raise ValueError(f"bank keys for {sorted(keys)} but scales for {sorted(scales)}")
        sizes = {name: k.shape[0] for name, k in keys.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"every matrix's bank needs the same number of keys, got {sizes}")
        if not keys or not next(iter(sizes.values())):
            raise ValueError("a key bank needs at least one key")
        self.keys = {name: k.to(torch.float16) for name, k in keys.items()}
        self.scales = {name: float(s) for name, s in scales.items()}

    def __len__(self) -> int:
        return next(iter(self.keys.values())).shape[0]

    @classmethod
    @torch.no_grad()
    def build(cls, model, targets: list[EditTarget], tokenizer, pairs: list[tuple[str, str]], *,
              max_length: int = 128, batch_size: int = 16) -> "KeyBank":
        """The keys of (prompt, answer) ``pairs`` at their last prompt token, one forward per batch."""
        from .capture import ModuleRecorder

        if isinstance(pairs, (str, tuple)) or not pairs:
            raise ValueError("pairs must be a non-empty list of (prompt, answer) pairs")
        device = next(model.parameters()).device
        parts = {t.name: [] for t in targets}
        for start in range(0, len(pairs), batch_size):
            prompts, answers = zip(*pairs[start : start + batch_size])
            batch = encode_pairs(tokenizer, list(prompts), list(answers), max_length=max_length,
                                 what=("neighbour prompt", "neighbour answer")).to(device)
            with ModuleRecorder(model, targets) as recorder:
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      position_ids=batch.position_ids, use_cache=False, logits_to_keep=1)
            mask = batch.prediction_mask
            last = mask & (mask.long().cumsum(1) == 1)  # (B, T) the first prediction of each row
            for target in targets:
                parts[target.name].append(recorder.inputs[target.name][last].float().cpu())  # (B, d_in)
        keys, scales = {}, {}
        for name, chunks in parts.items():
            raw = torch.cat(chunks)  # (M, d_in)
            norms = raw.norm(dim=1, keepdim=True)
            scales[name] = float(norms.mean())
            keys[name] = raw / norms.clamp(min=torch.finfo(torch.float32).tiny)
        return cls(keys, scales)

    def nearest(self, name: str, queries: torch.Tensor, k: int) -> torch.Tensor:
        """The ``k`` bank keys of matrix ``name`` nearest to each query by cosine similarity, at the
        bank's mean norm: queries (q, d_in) -> (q * k, d_in) float32 on the queries' device."""
        bank = self.keys[name].to(queries.device, torch.float32)  # (M, d_in)
        k = min(int(k), bank.shape[0])
        scores = torch.nn.functional.normalize(queries.float(), dim=1) @ bank.t()  # (q, M)
        chosen = scores.topk(k, dim=1).indices.flatten()  # (q * k,)
        return bank[chosen] * self.scales[name]

    # ------------------------------------------------------------------ files
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, keys in self.keys.items():
            out[f"{BANK_PREFIX}{name}.keys"] = keys.clone()
            out[f"{BANK_PREFIX}{name}.scale"] = torch.tensor(self.scales[name], dtype=torch.float32)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], targets: list[EditTarget]) -> "KeyBank":
        """The bank saved by `tensors`; it must cover exactly ``targets`` with their input widths."""
        by_name = {t.name: t for t in targets}
        keys, scales = {}, {}
        for flat, value in tensors.items():
            if not flat.startswith(BANK_PREFIX) or not flat.endswith((".keys", ".scale")):
                raise ValueError(f"unknown neighbour-bank tensor {flat!r}")
            name, _, kind = flat[len(BANK_PREFIX):].rpartition(".")
            if name not in by_name:
                raise ValueError(f"the neighbour bank has keys for {name!r}, which the editor does not edit")
            if kind == "keys":
                if value.dim() != 2 or value.shape[1] != by_name[name].d_in:
                    raise ValueError(f"neighbour keys of {name} must be (M, {by_name[name].d_in}), got {tuple(value.shape)}")
                keys[name] = value
            else:
                scales[name] = float(value)
        if set(keys) != set(by_name):
            raise ValueError(f"the neighbour bank covers {sorted(keys)}, the editor edits {sorted(by_name)}")
        return cls(keys, scales)
