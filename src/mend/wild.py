"""WILD-style answers: ask in a question-answering context, decode greedily, stop where the answer
ends naturally, and cut it there (Yang et al., "The Mirage of Model Editing", ACL 2025).

Teacher-forced scores hand the model the answer's length and every gold prefix; WILD lets it answer
on its own, as a user would see it:

1. the probe's prompt goes into a short instruction / question-answering context
   (``DEFAULT_TEMPLATE``, configurable as ``eval.wild_template``; ``{prompt}`` marks where it goes);
2. greedy decoding stops at the end of the first sentence (``.``, ``!`` or ``?`` followed by
   whitespace), at a newline after the answer has begun, at EOS, or after ``eval.wild_max_new_tokens``;
3. the answer is the text before that stop, scored by `mend.answers.exact_match` and
   `mend.answers.contains_answer` (both after `mend.answers.normalize_qa`).

A ``.`` right at the end of the text so far might be "St." or "3." rather than a sentence end, so
the row decodes one more token to see what follows; at the token cap it counts as an end.
"""

from __future__ import annotations

import re

from .generation import decode

# A short instruction context for cloze prompts ("X was written by"), which are what CounterFact and
# our facts hold. For question prompts (zsRE, QAEdit) the paper's context fits better:
# "Please answer the question:\n\nQ: {prompt}\nA:" (on cloze prompts SmolLM2-135M answers it with
# nothing at all: 0 of 24 unedited answers right, against 12 of 24 with this one).
DEFAULT_TEMPLATE = "Complete the sentence with a short answer.\n{prompt}"
DEFAULT_MAX_NEW_TOKENS = 10
PLACEHOLDER = "{prompt}"

# the end of an answer: a newline after some text, or sentence-final punctuation before whitespace
_END = re.compile(r"\n|[.!?](?=\s)")


def check_template(template: str) -> str:
    """Return ``template`` if it holds ``{prompt}`` exactly once, else raise ValueError."""
    if not isinstance(template, str) or template.count(PLACEHOLDER) != 1:
        raise ValueError(f"the WILD template must contain {PLACEHOLDER} exactly once (where the question goes), "
                         f"got {template!r}")
    return template


def apply_template(template: str, prompt: str) -> str:
    """The question-answering context around ``prompt`` (other braces in either are left alone)."""
    return check_template(template).replace(PLACEHOLDER, prompt)


def answer_end(text: str) -> int | None:
    """Where the answer in ``text`` ends (the index of its stop), or None if it has not ended yet."""
    match = _END.search(text.lstrip())
    return None if match is None else match.start() + (len(text) - len(text.lstrip()))


def cut_answer(text: str) -> str:
    """The answer: ``text`` up to its natural end (or a final ``.``, ``!``, ``?``), stripped."""
    end = answer_end(text)
    answer = text if end is None else text[:end]
    answer = answer.strip()
    return answer[:-1].rstrip() if answer.endswith((".", "!", "?")) else answer


class StopAtAnswerEnd:
    """A `mend.generation.StopRule`: EOS, or decoded text whose answer has ended."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = getattr(tokenizer, "eos_token_id", None)

    def __call__(self, ids: list[int]) -> bool:
        if self.eos_id is not None and ids[-1] == self.eos_id:
            return True
        return answer_end(decode(self.tokenizer, ids)) is not None
