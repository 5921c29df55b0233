"""WILD-style answers: the template, the natural stop (sentence end, newline, EOS, token cap), the cut,
the normalised scores; and the greedy decoder they run on (cached == uncached, batched == alone)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from mend.answers import contains_answer, exact_match, normalize_qa
from mend.eval_metrics import Probes, predict, score
from mend.generation import greedy_decode
from mend.wild import StopAtAnswerEnd, answer_end, apply_template, check_template, cut_answer

from tiny_models import CharTokenizer, tiny_model

EOS = 1


def char_id(c: str) -> int:
    return 3 + ord(c)  # CharTokenizer: one id per byte, offset by 3


class ChainLM(nn.Module):
    """A causal LM whose next token depends only on the current one: ``chain[c]`` (a character, or
    EOS), else the next byte. A one-hot logit table, so every greedy step is known."""

    def __init__(self, chain: dict[str, str | int], vocab: int = 260):
        super().__init__()
        table = torch.zeros(vocab, vocab)
        for i in range(vocab):
            table[i, min(i + 1, vocab - 1)] = 10.0
        for a, b in chain.items():
            table[char_id(a)].zero_()
            table[char_id(a), b if isinstance(b, int) else char_id(b)] = 10.0
        self.table = nn.Parameter(table, requires_grad=False)
        self.config = SimpleNamespace(name_or_path="chain-lm")

    def forward(self, input_ids, **kwargs):
        return SimpleNamespace(logits=self.table[input_ids])  # (B, T, V); no cache


TEMPLATE = "Q: {prompt}\nA:"
ROME = {":": " ", " ": "R", "R": "o", "o": "m", "m": "e"}  # "...A:" -> " Rome" then whatever follows e


def wild(chain: dict, cap: int = 12) -> tuple[list[int], str]:
    """(new token ids, cut answer) of the WILD decode of the prompt "x" under ``chain``."""
    tok = CharTokenizer()
    ids = greedy_decode(ChainLM(chain), tok, [apply_template(TEMPLATE, "x")], [cap], [StopAtAnswerEnd(tok)])[0]
    return ids, cut_answer(tok.decode([i for i in ids if i != EOS]))


# ----------------------------------------------------------------------------- stopping
def test_stops_at_a_sentence_end_after_seeing_the_space():
    ids, answer = wild(ROME | {"e": ".", ".": " "})
    assert len(ids) == len(" Rome. ") and answer == "Rome"  # one token past "." to see the space


@pytest.mark.parametrize("mark", ["!", "?"])
def test_stops_at_exclamation_and_question_marks(mark):
    ids, answer = wild(ROME | {"e": mark, mark: " "})
    assert len(ids) == len(" Rome" + mark + " ") and answer == "Rome"


def test_stops_at_a_newline():
    ids, answer = wild(ROME | {"e": "\n"})
    assert len(ids) == len(" Rome\n") and answer == "Rome"


def test_stops_at_eos():
    ids, answer = wild(ROME | {"e": EOS})
    assert ids[-1] == EOS and len(ids) == len(" Rome") + 1 and answer == "Rome"


def test_stops_at_the_token_cap():
    ids, answer = wild(ROME | {"e": "e"}, cap=9)
    assert len(ids) == 9 and answer == "Romeeeee"


def test_a_leading_newline_does_not_end_the_answer():
    ids, answer = wild({":": "\n", "\n": "R", "R": "o", "o": "m", "m": "e", "e": "\n"})
    assert answer == "Rome" and len(ids) == len("\nRome\n")


def test_a_point_inside_a_number_does_not_end_the_answer():
    ids, answer = wild({":": " ", " ": "3", "3": ".", ".": "5", "5": "\n"})
    assert answer == "3.5"


def test_rows_stop_independently_in_one_batch():
    tok = CharTokenizer()
    model = ChainLM(ROME | {"e": "\n"})
    prompts = [apply_template(TEMPLATE, "x"), "Q:"]
    ids = greedy_decode(model, tok, prompts, [12, 12], [StopAtAnswerEnd(tok), None])
    assert len(ids[0]) == len(" Rome\n") and len(ids[1]) == 12  # no rule: runs to its cap


@pytest.mark.parametrize("text, end", [
    ("Rome. It is", 4), ("Rome.", None), ("  \n Rome\nx", 8), ("Rome", None), ("U.S. Army", 3), ("Why? no", 3),
])
def test_answer_end(text, end):
    assert answer_end(text) == end


@pytest.mark.parametrize("text, answer", [
    (" Rome. It is", "Rome"), (" Rome.", "Rome"), ("\n Paris\n", "Paris"), (" the U.S. Army", "the U.S"), ("", ""),
])
def test_cut_answer(text, answer):
    assert cut_answer(text) == answer


# ----------------------------------------------------------------------------- template and scores
def test_template():
    assert apply_template("Q: {prompt}\nA:", "Who {x}?") == "Q: Who {x}?\nA:"
    for bad in ("no placeholder", "{prompt} and {prompt}"):
        with pytest.raises(ValueError, match=r"\{prompt\} exactly once"):
            check_template(bad)


def test_exact_match_and_contains():
    assert normalize_qa("The U.S. Army!") == "u s army"
    assert exact_match("the United Arab Emirates", "United Arab Emirates")
    assert not exact_match("Rome, Italy", "Rome")
    assert contains_answer("Rome, Italy", "Rome") and contains_answer("It is in rome", "Rome")
    assert not contains_answer("Romeo", "Rome") and not contains_answer("anything", "")
    assert not exact_match("", "")


def test_predict_scores_wild_answers():
    model, tok = ChainLM(ROME | {"e": ".", ".": " "}), CharTokenizer()
    probes = Probes(("x", "y"), ("Rome", "Rome, Italy"), ("reliability", "generality"))
    post = predict(model, tok, probes, wild_template=TEMPLATE)
    assert post.wild_texts == ["Rome", "Rome"]
    scores = score(probes, post)
    assert scores["reliability_wild_em"] == 1.0 and scores["reliability_wild_contains"] == 1.0
    assert scores["generality_wild_em"] == 0.0 and scores["generality_wild_contains"] == 0.0


# ----------------------------------------------------------------------------- the decoder
@pytest.mark.parametrize("family", ["gpt2", "gpt_neox", "llama"])
def test_cached_decoding_matches_full_recomputation_and_batching(family):
    model, tok = tiny_model(family)
    prompts = ["The sky is", "A much longer prompt about many things", "Hi"]
    cached = greedy_decode(model, tok, prompts, [6, 4, 5])
    assert cached == greedy_decode(model, tok, prompts, [6, 4, 5], use_cache=False)
    assert cached == [greedy_decode(model, tok, [p], [n])[0] for p, n in zip(prompts, [6, 4, 5])]
    assert [len(c) for c in cached] == [6, 4, 5]
