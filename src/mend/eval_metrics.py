"""Measuring one edit: the model's predictions on a record's probes, and the metrics made from them.

A record's probes are its edit prompt (reliability), its paraphrases (generality), its portability
probes and its locality probes, each a (prompt, answer) pair. Every probe is measured under three
protocols:

* ``tf_acc``: teacher-forced token accuracy, the fraction of answer tokens that are the argmax given
  the gold prefix;
* ``tf_em``: teacher-forced exact match, every answer token is the argmax;
* ``gen``: the model's own greedy continuation of the prompt starts with the answer, after
  `normalize_answer` (case, spacing, punctuation).

Locality measures agreement with the unedited model instead of the answer: ``tf_acc`` / ``tf_em`` compare
the teacher-forced argmax tokens before and after the edit, ``gen`` compares the greedy continuations
over the answer's length. ``locality_gt_*`` score the same probes against their ground-truth answers.

All probes of a record go through one teacher-forced forward (`encode_pairs` + `target_logits`) and
one batched greedy loop, so the same record always gives the same shapes, and an unchanged model gives
bit-identical predictions (locality agreement exactly 1.0).
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass

import torch

from .batching import encode_pairs
from .data.records import EditRecord
from .scoring import target_logits

KINDS = ("reliability", "generality", "portability", "locality")
PROTOCOLS = ("tf_acc", "tf_em", "gen")
GEN_EXTRA_TOKENS = 2  # greedy generation runs this many tokens past the answer's length

# Every metric name, in report order: reliability_tf_acc, ..., locality_gen, locality_gt_tf_acc, ...
METRICS = tuple(f"{kind}_{p}" for kind in KINDS for p in PROTOCOLS) + tuple(f"locality_gt_{p}" for p in PROTOCOLS)


@dataclass(frozen=True)
class Probes:
    """A record's probes in one fixed order: reliability, generality, portability, locality."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    kinds: tuple[str, ...]

    @classmethod
    def of(cls, record: EditRecord) -> "Probes":
        items = [(record.prompt, record.target, "reliability")]
        items += [(r, record.target, "generality") for r in record.rephrases]
        items += [(p.prompt, p.answer, "portability") for p in record.portability]
        items += [(p.prompt, p.answer, "locality") for p in record.locality]
        prompts, answers, kinds = zip(*items)
        return cls(prompts, answers, kinds)

    def __len__(self) -> int:
        return len(self.prompts)


@dataclass
class Predictions:
    """What a model predicts on a record's probes (plain lists, one entry per probe).

    Attributes:
        answer_ids: the gold answer's tokens.
        argmax: the teacher-forced argmax token at each answer position.
        generated: the greedy continuation's tokens (answer length + GEN_EXTRA_TOKENS of them).
        texts: the greedy continuation decoded, cut at the first EOS.
    """

    answer_ids: list[list[int]]
    argmax: list[list[int]]
    generated: list[list[int]]
    texts: list[str]


def normalize_answer(text: str) -> str:
    """Case-folded, punctuation turned into spaces, runs of whitespace collapsed to one, stripped
    ("Europe's" -> "europe s", "U.S." -> "u s")."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def starts_with_answer(generated: str, answer: str) -> bool:
    """True when the normalised ``generated`` text begins with the normalised ``answer`` as whole
    words ("Rome, Italy" and "Rome's" start with "rome."; "Romeo" does not start with "Rome")."""
    gen, ans = normalize_answer(generated), normalize_answer(answer)
    if not ans:  # an answer made only of punctuation: compare without removing it
        gen, ans = " ".join(generated.casefold().split()), " ".join(answer.casefold().split())
    if not ans or not gen.startswith(ans):
        return False
    rest = gen[len(ans):]
    return not rest or not (rest[0].isalnum() and ans[-1].isalnum())


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts, n_new: list[int]) -> list[list[int]]:
    """Greedy (argmax) continuations of ``prompts``, batched with left padding, without a KV cache.

    Works with any tokenizer that is callable (``tokenizer(text)["input_ids"]``); prompts are
    tokenised as `encode_pairs` does. Returns ``n_new[i]`` new tokens for prompt i.
    """
    rows = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row)
        attention_mask[i, width - len(row):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    new = []
    for _ in range(max(n_new)):
        position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)  # (B, T)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       logits_to_keep=1, use_cache=False).logits
        next_ids = logits[:, -1].argmax(-1)  # (B,)
        new.append(next_ids)
        input_ids = torch.cat([input_ids, next_ids[:, None]], 1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(next_ids)[:, None]], 1)
    generated = torch.stack(new, 1).tolist()  # (B, max(n_new))
    return [g[:n] for g, n in zip(generated, n_new)]


def _decode(tokenizer, ids: list[int]) -> str:
    """Decode generated ids, cut at the first EOS; ids the tokenizer cannot decode are dropped."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None and eos in ids:
        ids = ids[: ids.index(eos)]
    try:
        return tokenizer.decode(ids, skip_special_tokens=True)
    except (ValueError, IndexError, KeyError, TypeError):  # e.g. an id past a stub tokenizer's table
        decodable = []
        for i in ids:
            try:
                tokenizer.decode([i], skip_special_tokens=True)
                decodable.append(i)
            except (ValueError, IndexError, KeyError, TypeError):
                pass
        return tokenizer.decode(decodable, skip_special_tokens=True)


@torch.no_grad()
def predict(model, tokenizer, probes: Probes, *, max_length: int = 128) -> Predictions:
    """The model's teacher-forced argmax tokens and greedy continuations on every probe."""
    device = next(model.parameters()).device
    batch = encode_pairs(tokenizer, list(probes.prompts), list(probes.answers), max_length=max_length,
                         what=("probe prompt", "probe answer")).to(device)
    argmax = target_logits(model, batch).argmax(-1)  # (N,) in the row-major order of target_ids
    counts = batch.target_mask.sum(1).tolist()  # (B,) answer tokens per probe
    answer_ids = [t.tolist() for t in batch.target_ids.split(counts)]
    argmax = [t.tolist() for t in argmax.split(counts)]
    generated = greedy_continuations(model, tokenizer, probes.prompts, [n + GEN_EXTRA_TOKENS for n in counts])
    texts = [_decode(tokenizer, g) for g in generated]
    return Predictions(answer_ids, argmax, generated, texts)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _answer_scores(post: Predictions, answers, index: list[int]) -> dict[str, float | None]:
    """tf_acc / tf_em / gen of probes ``index`` against their answers."""
    acc = [sum(a == t for a, t in zip(post.argmax[i], post.answer_ids[i])) / len(post.answer_ids[i]) for i in index]
    return {
        "tf_acc": _mean(acc),
        "tf_em": _mean(float(a == 1.0) for a in acc),
        "gen": _mean(float(starts_with_answer(post.texts[i], answers[i])) for i in index),
    }


def _agreement_scores(post: Predictions, pre: Predictions, index: list[int]) -> dict[str, float | None]:
    """tf_acc / tf_em / gen agreement of probes ``index`` between the edited and unedited model."""
    agree = [sum(a == b for a, b in zip(post.argmax[i], pre.argmax[i])) / len(pre.argmax[i]) for i in index]
    same_gen = []
    for i in index:
        n = len(post.answer_ids[i])
        same_gen.append(float(post.generated[i][:n] == pre.generated[i][:n]))
    return {"tf_acc": _mean(agree), "tf_em": _mean(float(a == 1.0) for a in agree), "gen": _mean(same_gen)}


def score(probes: Probes, post: Predictions, pre: Predictions | None = None) -> dict[str, float | None]:
    """Every metric of `METRICS` for one record: the mean over its probes of each kind, or None when
    the record has no probe of that kind.

    Args:
        post: predictions of the edited model.
        pre: predictions of the unedited model on the same probes (needed for locality).
    """
    out: dict[str, float | None] = {}
    for kind in KINDS:
        index = [i for i, k in enumerate(probes.kinds) if k == kind]
        if kind == "locality":
            if index and pre is None:
                raise ValueError("locality needs the unedited model's predictions (pre)")
            agreement = _agreement_scores(post, pre, index) if index else {}
            truth = _answer_scores(post, probes.answers, index) if index else {}
            out.update({f"locality_{p}": agreement.get(p) for p in PROTOCOLS})
            out.update({f"locality_gt_{p}": truth.get(p) for p in PROTOCOLS})
        else:
            scores = _answer_scores(post, probes.answers, index) if index else {}
            out.update({f"{kind}_{p}": scores.get(p) for p in PROTOCOLS})
    return {name: out[name] for name in METRICS}


def aggregate(rows: list[dict]) -> dict[str, float | None]:
    """Mean of each metric over the rows that have it (None when none has)."""
    return {name: _mean(r[name] for r in rows if r.get(name) is not None) for name in METRICS}
