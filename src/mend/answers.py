"""Answer text: normalisation and the three ways a generated text can match an answer.

* `starts_with_answer`: the greedy-prefix protocol, the continuation begins with the answer;
* `exact_match`: WILD's exact match, the whole cut answer is the target;
* `contains_answer`: WILD's lenient score, the target appears in the cut answer as whole words.

`normalize_answer` folds case and Unicode forms, turns punctuation into spaces and collapses
whitespace; `normalize_qa` also drops the articles a / an / the, as question-answering exact match
does (SQuAD), so "the United Arab Emirates" matches "United Arab Emirates".
"""

from __future__ import annotations

import unicodedata

ARTICLES = frozenset({"a", "an", "the"})


def normalize_answer(text: str) -> str:
    """Case-folded, punctuation turned into spaces, runs of whitespace collapsed to one, stripped
    ("Europe's" -> "europe s", "U.S." -> "u s")."""
    text = unicodedata.normalize("NFKC", text).casefold()
    text = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(text.split())


def normalize_qa(text: str) -> str:
    """`normalize_answer` without the articles a, an, the ("The U.S." -> "u s")."""
    return " ".join(w for w in normalize_answer(text).split() if w not in ARTICLES)


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


def exact_match(answer: str, target: str) -> bool:
    """The answer is the target, after `normalize_qa` (an empty target matches nothing)."""
    target = normalize_qa(target)
    return bool(target) and normalize_qa(answer) == target


def contains_answer(answer: str, target: str) -> bool:
    """The target occurs in the answer as whole words, after `normalize_qa` ("it is Rome, Italy"
    contains "Rome"; "Romeo" does not)."""
    target = normalize_qa(target)
    return bool(target) and f" {target} " in f" {normalize_qa(answer)} "
