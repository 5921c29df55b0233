"""Measuring one edit: the model's predictions on a record's probes, and the metrics made from them.

A record's probes are its edit prompt (role ``reliability``), its paraphrases (``generality``), its
portability probes and its locality probes, each a (prompt, answer) pair; portability and locality
probes also carry the kind the data gives them (KnowEdit's "Reasoning", CounterFact's
"neighborhood"). Every probe is measured under five protocols:

* ``tf_acc``: teacher-forced token accuracy, the fraction of answer tokens that are the argmax given
  the gold prefix;
* ``tf_em``: teacher-forced exact match, every answer token is the argmax;
* ``gen``: greedy prefix, the model's own greedy continuation of the prompt (answer length +
  ``GEN_EXTRA_TOKENS`` tokens) starts with the answer (`mend.answers.starts_with_answer`);
* ``wild_em`` / ``wild_contains``: WILD, the prompt asked in a question-answering context, the greedy
  answer cut where it ends naturally, then the answer is the target / contains it (`mend.wild`).

Locality measures agreement with the unedited model instead of the answer: ``tf_acc`` / ``tf_em``
compare the teacher-forced argmax tokens before and after the edit, ``gen`` the greedy
continuations over the answer's length, ``wild_em`` the normalised WILD answers.
``locality_gt_*`` scores the edited model's answers to the locality probes against their ground
truth, and ``locality_ceiling_*`` the unedited model's: 100% agreement means the edited model
scores exactly the ceiling. With ``split``, portability and locality are also reported per probe
kind: ``portability[Reasoning]_tf_acc``.

CounterFact's own scores (ROME, MEMIT, AlphaEdit tables) compare the probability of two answers,
P(a) = exp(mean log-probability of a's tokens), given teacher-forced:

* ``efficacy_score``: P(new) > P(old) on the edit prompt; ``paraphrase_score``: the same on the
  paraphrases; ``neighborhood_score``: P(true answer) > P(new) on the locality prompts;
* ``*_magnitude``: the mean difference of those probabilities, P(new) - P(old) and P(true) - P(new).

Here "old" is the record's ``ground_truth`` (scores are None without one) and a locality probe's
true answer is its own answer (on CounterFact, the record's ground truth).

All probes of a record go through one teacher-forced forward (answers and competing answers
together) and one batched greedy decode (greedy-prefix and WILD rows together), so the same record
always gives the same shapes, and an unchanged model gives bit-identical predictions (locality
agreement exactly 1.0).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .answers import contains_answer, exact_match, normalize_answer, normalize_qa, starts_with_answer  # noqa: F401
from .batching import encode_pairs
from .data.records import EditRecord
from .generation import decode, greedy_decode
from .scoring import target_logits
from .wild import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPLATE, StopAtAnswerEnd, apply_template, cut_answer

ROLES = ("reliability", "generality", "portability", "locality")
ANSWER_ROLES = ("reliability", "generality", "portability", "locality_gt", "locality_ceiling")  # scored vs answers
PROTOCOLS = ("tf_acc", "tf_em", "gen", "wild_em", "wild_contains")
AGREEMENT_PROTOCOLS = ("tf_acc", "tf_em", "gen", "wild_em")  # locality: agreement with the unedited model
SPLIT_ROLES = ("portability", "locality")  # roles whose probes carry a kind
COUNTERFACT = ("efficacy_score", "efficacy_magnitude", "paraphrase_score", "paraphrase_magnitude",
               "neighborhood_score", "neighborhood_magnitude")
GEN_EXTRA_TOKENS = 2  # greedy-prefix generation runs this many tokens past the answer's length

METRIC_ROLES = ("reliability", "generality", "portability", "locality", "locality_gt", "locality_ceiling")


def role_protocols(role: str) -> tuple[str, ...]:
    return AGREEMENT_PROTOCOLS if role == "locality" else PROTOCOLS


# Every fixed metric name, in report order: reliability_tf_acc, ..., locality_ceiling_wild_contains, efficacy_score, ...
METRICS = tuple(f"{role}_{p}" for role in METRIC_ROLES for p in role_protocols(role)) + COUNTERFACT

_NAME = re.compile(r"^(" + "|".join(sorted(METRIC_ROLES, key=len, reverse=True)) + r")(?:\[(.+)\])?_("
                   + "|".join(PROTOCOLS) + r")$")


def metric_name(role: str, protocol: str, kind: str | None = None) -> str:
    return f"{role}[{kind}]_{protocol}" if kind else f"{role}_{protocol}"


def parse_metric(name: str) -> tuple[str, str | None, str] | None:
    """(role, kind or None, protocol) of a probe metric; ("counterfact", None, name) of a CounterFact
    score; None for anything else."""
    if name in COUNTERFACT:
        return "counterfact", None, name
    match = _NAME.match(name)
    if match is None or match.group(3) not in role_protocols(match.group(1)):
        return None
    return match.group(1), match.group(2), match.group(3)


def metric_key(name: str, by_protocol: bool = False) -> tuple:
    """Sort key of a metric: by role, kind, protocol (``by_protocol``: by protocol first), then
    CounterFact's scores."""
    role, kind, protocol = parse_metric(name)
    if role == "counterfact":
        return (1, COUNTERFACT.index(name))
    r, p = METRIC_ROLES.index(role), PROTOCOLS.index(protocol)
    return (0, p, r, kind or "") if by_protocol else (0, r, kind or "", p)


def metric_names(rows: Sequence[Mapping]) -> list[str]:
    """The metric names found in ``rows``, in report order."""
    names = {k for row in rows for k in row if parse_metric(k) is not None}
    return sorted(names, key=metric_key)


@dataclass(frozen=True)
class Probes:
    """A record's probes in one fixed order: reliability, generality, portability, locality.

    Attributes:
        roles: each probe's role (`ROLES`).
        kinds: each probe's kind as the data names it ("" for the edit prompt and paraphrases).
        contrasts: the competing answer of CounterFact's scores: the old answer for the edit prompt
            and paraphrases, the new target for locality probes; "" for none.
    """

    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    roles: tuple[str, ...]
    kinds: tuple[str, ...] = ()
    contrasts: tuple[str, ...] = ()

    def __post_init__(self):
        n = len(self.prompts)
        object.__setattr__(self, "kinds", self.kinds or ("",) * n)
        object.__setattr__(self, "contrasts", self.contrasts or ("",) * n)
        if not len(self.answers) == len(self.roles) == len(self.kinds) == len(self.contrasts) == n:
            raise ValueError("Probes: prompts, answers, roles, kinds and contrasts must have one entry per probe")

    @classmethod
    def of(cls, record: EditRecord) -> "Probes":
        old = record.ground_truth
        items = [(record.prompt, record.target, "reliability", "", old)]
        items += [(r, record.target, "generality", "", old) for r in record.rephrases]
        items += [(p.prompt, p.answer, "portability", p.kind, "") for p in record.portability]
        items += [(p.prompt, p.answer, "locality", p.kind, record.target) for p in record.locality]
        return cls(*(tuple(column) for column in zip(*items)))

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
        answer_logprob: the mean log-probability of the answer's tokens, teacher-forced.
        contrast_logprob: the same for the probe's competing answer (None where it has none).
        wild_texts: the WILD answer (templated prompt, natural stop, cut at the answer's end).
    """

    answer_ids: list[list[int]]
    argmax: list[list[int]]
    generated: list[list[int]]
    texts: list[str]
    answer_logprob: list[float] | None = None
    contrast_logprob: list[float | None] | None = None
    wild_texts: list[str] | None = None


@torch.no_grad()
def _teacher_forced(model, tokenizer, probes: Probes, max_length: int):
    """Per probe: answer ids, argmax ids and mean log-probability of its answer, and of its contrast."""
    device = next(model.parameters()).device
    with_contrast = [i for i, c in enumerate(probes.contrasts) if c]
    prompts = list(probes.prompts) + [probes.prompts[i] for i in with_contrast]
    answers = list(probes.answers) + [probes.contrasts[i] for i in with_contrast]
    batch = encode_pairs(tokenizer, prompts, answers, max_length=max_length,
                         what=("probe prompt", "probe answer")).to(device)
    logits = target_logits(model, batch)  # (N, V), rows in the row-major order of target_ids
    logprob = F.log_softmax(logits.float(), -1).gather(1, batch.target_ids[:, None])[:, 0]  # (N,)
    counts = batch.target_mask.sum(1).tolist()  # (B,) answer tokens per row
    answer_ids = [t.tolist() for t in batch.target_ids.split(counts)]
    argmax = [t.tolist() for t in logits.argmax(-1).split(counts)]
    mean_logprob = [t.mean().item() for t in logprob.split(counts)]
    n = len(probes)
    contrast: list[float | None] = [None] * n
    for j, i in enumerate(with_contrast):
        contrast[i] = mean_logprob[n + j]
    return answer_ids[:n], argmax[:n], mean_logprob[:n], contrast


@torch.no_grad()
def predict(model, tokenizer, probes: Probes, *, max_length: int = 128, wild_template: str = DEFAULT_TEMPLATE,
            wild_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> Predictions:
    """The model's teacher-forced predictions, greedy continuations and WILD answers on every probe."""
    answer_ids, argmax, answer_logprob, contrast_logprob = _teacher_forced(model, tokenizer, probes, max_length)
    n = len(probes)
    # greedy-prefix rows (fixed length) and WILD rows (templated, natural stop) in one decode;
    # wild_max_new_tokens=0 leaves WILD out
    wild = wild_max_new_tokens > 0
    stop = StopAtAnswerEnd(tokenizer)
    prompts = list(probes.prompts) + ([apply_template(wild_template, p) for p in probes.prompts] if wild else [])
    lengths = [len(a) + GEN_EXTRA_TOKENS for a in answer_ids] + [wild_max_new_tokens] * (n if wild else 0)
    new = greedy_decode(model, tokenizer, prompts, lengths, [None] * n + [stop] * (n if wild else 0))
    generated = new[:n]
    texts = [decode(tokenizer, g) for g in generated]
    wild_texts = [cut_answer(decode(tokenizer, g)) for g in new[n:]] if wild else None
    return Predictions(answer_ids, argmax, generated, texts, answer_logprob, contrast_logprob, wild_texts)


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def _answer_scores(pred: Predictions, answers, index: list[int]) -> dict[str, float | None]:
    """Every protocol of probes ``index`` against their answers."""
    if not index:
        return {}
    acc = [sum(a == t for a, t in zip(pred.argmax[i], pred.answer_ids[i])) / len(pred.answer_ids[i]) for i in index]
    out = {
        "tf_acc": _mean(acc),
        "tf_em": _mean(float(a == 1.0) for a in acc),
        "gen": _mean(float(starts_with_answer(pred.texts[i], answers[i])) for i in index),
    }
    if pred.wild_texts is not None:
        out["wild_em"] = _mean(float(exact_match(pred.wild_texts[i], answers[i])) for i in index)
        out["wild_contains"] = _mean(float(contains_answer(pred.wild_texts[i], answers[i])) for i in index)
    return out


def _agreement_scores(post: Predictions, pre: Predictions, index: list[int]) -> dict[str, float | None]:
    """Every agreement protocol of probes ``index`` between the edited and unedited model."""
    if not index:
        return {}
    agree = [sum(a == b for a, b in zip(post.argmax[i], pre.argmax[i])) / len(pre.argmax[i]) for i in index]
    same_gen = []
    for i in index:
        n = len(post.answer_ids[i])
        same_gen.append(float(post.generated[i][:n] == pre.generated[i][:n]))
    out = {"tf_acc": _mean(agree), "tf_em": _mean(float(a == 1.0) for a in agree), "gen": _mean(same_gen)}
    if post.wild_texts is not None and pre.wild_texts is not None:
        out["wild_em"] = _mean(float(normalize_qa(post.wild_texts[i]) == normalize_qa(pre.wild_texts[i])) for i in index)
    return out


def _contrast_scores(pred: Predictions, index: list[int]) -> tuple[float | None, float | None]:
    """(score, magnitude): mean of [P(answer) > P(contrast)] and of P(answer) - P(contrast) over the
    probes ``index`` that have a contrast."""
    if pred.answer_logprob is None or pred.contrast_logprob is None:
        return None, None
    pairs = [(pred.answer_logprob[i], pred.contrast_logprob[i]) for i in index if pred.contrast_logprob[i] is not None]
    return (_mean(float(a > c) for a, c in pairs), _mean(math.exp(a) - math.exp(c) for a, c in pairs))


def score(probes: Probes, post: Predictions, pre: Predictions | None = None,
          split: Mapping[str, Sequence[str]] | None = None) -> dict[str, float | None]:
    """Every metric for one record: per metric, the mean over its probes, or None when the record has
    no probe of that role (or the predictions lack what the metric needs).

    Args:
        post: predictions of the edited model.
        pre: predictions of the unedited model on the same probes (needed for locality).
        split: {role: kinds} for the roles of `SPLIT_ROLES` to report per probe kind as well; every
            kind listed gets its metrics (None where this record has no such probe).
    """
    index = {role: [i for i, r in enumerate(probes.roles) if r == role] for role in ROLES}
    if index["locality"] and pre is None:
        raise ValueError("locality needs the unedited model's predictions (pre)")
    by_role = {
        "reliability": _answer_scores(post, probes.answers, index["reliability"]),
        "generality": _answer_scores(post, probes.answers, index["generality"]),
        "portability": _answer_scores(post, probes.answers, index["portability"]),
        "locality": _agreement_scores(post, pre, index["locality"]),
        "locality_gt": _answer_scores(post, probes.answers, index["locality"]),
        "locality_ceiling": _answer_scores(pre, probes.answers, index["locality"]) if pre is not None else {},
    }
    out = {f"{role}_{p}": by_role[role].get(p) for role in METRIC_ROLES for p in role_protocols(role)}
    for prefix, role in (("efficacy", "reliability"), ("paraphrase", "generality"), ("neighborhood", "locality")):
        out[f"{prefix}_score"], out[f"{prefix}_magnitude"] = _contrast_scores(post, index[role])
    for role, kinds in (split or {}).items():
        if role not in SPLIT_ROLES:
            raise ValueError(f"only {', '.join(SPLIT_ROLES)} can be split by probe kind, got {role!r}")
        for kind in kinds:
            sub = [i for i in index[role] if probes.kinds[i] == kind]
            scores = _agreement_scores(post, pre, sub) if role == "locality" else _answer_scores(post, probes.answers, sub)
            out.update({metric_name(role, p, kind): scores.get(p) for p in role_protocols(role)})
    return out


def probe_kinds(probes: Sequence[Probes]) -> dict[str, list[str]]:
    """{role: sorted kinds} of the portability and locality probes over all records."""
    kinds = {role: set() for role in SPLIT_ROLES}
    for p in probes:
        for role, kind in zip(p.roles, p.kinds):
            if role in kinds and kind:
                kinds[role].add(kind)
    return {role: sorted(k) for role, k in kinds.items()}


def aggregate(rows: list[dict], names: Sequence[str] | None = None) -> dict[str, float | None]:
    """Mean of each metric over the rows that have it (None when none has); all metrics in ``rows``
    unless ``names`` are given."""
    names = metric_names(rows) if names is None else names
    return {name: _mean(r[name] for r in rows if r.get(name) is not None) for name in names}
