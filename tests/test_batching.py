"""Batching (prompt, target) pairs: padding, position ids, target masks, and input errors."""

from __future__ import annotations

import pytest
import torch

from mend import EditInputError
from mend.batching import concat_batches, encode_pairs, target_text
from mend.scoring import target_logits
from tiny_models import CharTokenizer, tiny_hf_tokenizer

PROMPTS = ["The Eiffel Tower is in", "Hi", "Water boils at "]
TARGETS = ["Rome", "there, friend", "100 degrees"]


def ids(text):
    """CharTokenizer ids of ``text``: one per byte."""
    return [3 + b for b in text.encode("utf-8")]


class OnlyAscii(CharTokenizer):
    """A tokenizer with no tokens for spaces or non-ASCII characters: it drops them."""

    def __call__(self, text, add_special_tokens=True, **kwargs):
        return super().__call__("".join(c for c in text if c.isascii() and not c.isspace()))


# ---------------------------------------------------------------- layout of a batch
@pytest.mark.parametrize("side", ["left", "right"])
def test_target_mask_covers_exactly_the_target_tokens(side):
    batch = encode_pairs(CharTokenizer(), PROMPTS, TARGETS, padding_side=side)
    width = max(len(ids(p)) + len(ids(target_text(p, t))) for p, t in zip(PROMPTS, TARGETS))
    assert batch.input_ids.shape == batch.attention_mask.shape == batch.target_mask.shape == (3, width)
    for row, (prompt, target) in enumerate(zip(PROMPTS, TARGETS)):
        real = batch.input_ids[row][batch.attention_mask[row].bool()].tolist()
        assert real == ids(prompt) + ids(target_text(prompt, target))
        assert batch.input_ids[row][batch.target_mask[row]].tolist() == ids(target_text(prompt, target))
        # the target tokens are the last real tokens of the row, and never padding
        assert not (batch.target_mask[row] & ~batch.attention_mask[row].bool()).any()
        real_positions = batch.attention_mask[row].nonzero().flatten()
        target_positions = batch.target_mask[row].nonzero().flatten()
        assert target_positions.tolist() == real_positions[-len(target_positions) :].tolist()
    padding = ~batch.attention_mask.bool()
    assert (batch.input_ids[padding] == CharTokenizer().pad_token_id).all()


def test_padding_is_on_the_requested_side():
    left = encode_pairs(CharTokenizer(), PROMPTS, TARGETS, padding_side="left")
    right = encode_pairs(CharTokenizer(), PROMPTS, TARGETS, padding_side="right")
    assert left.attention_mask[:, -1].all() and not left.attention_mask[:, 0].all()
    assert right.attention_mask[:, 0].all() and not right.attention_mask[:, -1].all()
    # without an explicit side, the tokenizer's padding_side is used
    assert torch.equal(encode_pairs(CharTokenizer(padding_side="left"), PROMPTS, TARGETS).attention_mask, left.attention_mask)


@pytest.mark.parametrize("side", ["left", "right"])
def test_position_ids_count_real_tokens_only(side):
    batch = encode_pairs(CharTokenizer(), PROMPTS, TARGETS, padding_side=side)
    for row in range(len(PROMPTS)):
        real = batch.attention_mask[row].bool()
        assert batch.position_ids[row][real].tolist() == list(range(int(real.sum())))


def test_prediction_mask_target_ids_and_rows_line_up():
    batch = encode_pairs(CharTokenizer(), PROMPTS, TARGETS, padding_side="left")
    # position t predicts token t + 1
    assert torch.equal(batch.prediction_mask[:, :-1], batch.target_mask[:, 1:])
    assert not batch.prediction_mask[:, -1].any()
    expected_ids = sum((ids(target_text(p, t)) for p, t in zip(PROMPTS, TARGETS)), [])
    assert batch.target_ids.tolist() == expected_ids
    assert batch.target_rows.tolist() == sum(([i] * len(ids(target_text(p, t))) for i, (p, t) in enumerate(zip(PROMPTS, TARGETS))), [])
    assert int(batch.prediction_mask.sum()) == len(expected_ids)


def _without_last_real_token(mask):
    expected = mask.bool().clone()
    for row in range(mask.shape[0]):
        expected[row, int(mask[row].nonzero().max())] = False
    return expected


def test_last_needed_spans_real_tokens_up_to_the_last_prediction():
    # targets end each row, so every real token but the last one can influence the loss
    batch = encode_pairs(CharTokenizer(), PROMPTS, TARGETS, padding_side="right")
    assert torch.equal(batch.positions_with_gradient, _without_last_real_token(batch.attention_mask))
    left = encode_pairs(CharTokenizer(), PROMPTS, TARGETS, padding_side="left")
    assert torch.equal(left.positions_with_gradient, _without_last_real_token(left.attention_mask))


@pytest.mark.parametrize(
    "prompt, target, expected",
    [("Paris is in", "France", " France"), ("Paris is in ", "France", "France"), ("Paris is in", " France", " France")],
)
def test_the_target_continues_the_prompt_after_one_space(prompt, target, expected):
    assert target_text(prompt, target) == expected


def test_concatenated_batches_equal_one_batch():
    tokenizer = CharTokenizer()
    whole = encode_pairs(tokenizer, PROMPTS, TARGETS)
    parts = concat_batches([encode_pairs(tokenizer, PROMPTS[:1], TARGETS[:1]), encode_pairs(tokenizer, PROMPTS[1:], TARGETS[1:])])
    for got, want in zip((parts.input_ids, parts.attention_mask, parts.target_mask), (whole.input_ids, whole.attention_mask, whole.target_mask)):
        assert torch.equal(got, want)
    real = whole.attention_mask.bool()  # position ids of padding are irrelevant
    assert torch.equal(parts.position_ids[real], whole.position_ids[real])


# ---------------------------------------------------------------- padding does not change logits
def test_left_and_right_padding_give_the_same_target_logits(family, tiny):
    model, tokenizer = tiny
    left = target_logits(model, encode_pairs(tokenizer, PROMPTS, TARGETS, padding_side="left"))
    right = target_logits(model, encode_pairs(tokenizer, PROMPTS, TARGETS, padding_side="right"))
    alone = torch.cat([target_logits(model, encode_pairs(tokenizer, [p], [t])) for p, t in zip(PROMPTS, TARGETS)])
    n_targets = sum(len(ids(target_text(p, t))) for p, t in zip(PROMPTS, TARGETS))
    assert left.shape == right.shape == (n_targets, len(tokenizer))
    torch.testing.assert_close(left, right, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(right, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma3"])
def test_target_logits_are_the_full_forward_at_predicting_positions(family, tiny):
    model, tokenizer = tiny
    batch = encode_pairs(tokenizer, PROMPTS, TARGETS, padding_side="left")
    full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    torch.testing.assert_close(target_logits(model, batch), full[batch.prediction_mask], rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- input errors
@pytest.mark.parametrize(
    "prompts, targets, match",
    [
        ([""], ["Rome"], "prompt is empty"),
        (["   \n\t"], ["Rome"], "prompt is empty"),
        (["The Eiffel Tower is in"], [""], "target is empty"),
        (["The Eiffel Tower is in"], ["  "], "target is empty"),
        ([None], ["Rome"], "prompt must be a string"),
        (["The Eiffel Tower is in"], [42], "target must be a string"),
        ([b"bytes"], ["Rome"], "prompt must be a string"),
        (PROMPTS[:2], ["Rome", ""], "target #1 is empty"),
        ("The Eiffel Tower is in", "Rome", "lists"),
        (PROMPTS, TARGETS[:2], "3 prompts but 2 targets"),
        ([], [], "no .*pairs"),
    ],
)
def test_bad_text_is_refused(prompts, targets, match):
    with pytest.raises(EditInputError, match=match):
        encode_pairs(CharTokenizer(), prompts, targets)


def test_a_target_or_prompt_that_tokenises_to_nothing_is_refused():
    with pytest.raises(EditInputError, match="target '\u2603\u2603' tokenises to nothing"):
        encode_pairs(OnlyAscii(), ["The Eiffel Tower is in"], ["\u2603\u2603"])
    with pytest.raises(EditInputError, match="prompt '\u2603' tokenises to nothing before the target"):
        encode_pairs(OnlyAscii(), ["\u2603"], ["Rome"])


# ---------------------------------------------------------------- real tokenizers at the boundary
STYLES = ["byte_level", "metaspace", "sentencepiece"]
JOINED = [("The sky is", "green"), ("Paris is the capital of", "Rome"), ("Water boils at ", "ten"),
          ("Bees make", " glue"), ("Q: The capital of France is", "Paris."), ("Number 2 is", "even")]


@pytest.mark.parametrize("style", STYLES)
def test_prompt_and_target_tokenise_the_way_the_joined_text_does(style):
    tokenizer = tiny_hf_tokenizer(style)
    prompts, targets = (list(column) for column in zip(*JOINED))
    batch = encode_pairs(tokenizer, prompts, targets, padding_side="right")
    for i, (prompt, target) in enumerate(JOINED):
        row = batch.input_ids[i][batch.attention_mask[i].bool()].tolist()
        assert row == tokenizer(prompt + target_text(prompt, target))["input_ids"]
        target_ids = batch.input_ids[i][batch.target_mask[i]].tolist()
        assert target_ids and tokenizer.decode(target_ids).strip() == target.strip()
        prompt_ids = tokenizer(prompt)["input_ids"]
        assert row[: len(row) - len(target_ids)] == prompt_ids[: len(row) - len(target_ids)]


def test_a_sentencepiece_target_tokenised_alone_would_get_a_stray_space_token():
    """Why pairs are tokenised joined: Llama-2-style tokenizers prepend "\u2581" to every text."""
    tokenizer = tiny_hf_tokenizer("sentencepiece")
    batch = encode_pairs(tokenizer, ["The sky is"], ["green"])
    in_context = batch.input_ids[batch.target_mask].tolist()
    alone = tokenizer(" green", add_special_tokens=False)["input_ids"]
    assert tokenizer.convert_ids_to_tokens(alone)[0] == "\u2581" and alone[1:] == in_context


def test_a_prompt_ending_in_a_space_gives_that_space_to_the_target():
    tokenizer = tiny_hf_tokenizer("byte_level")
    batch = encode_pairs(tokenizer, ["Water boils at "], ["ten"])
    target_ids = batch.input_ids[batch.target_mask].tolist()
    assert tokenizer.decode(target_ids) == " ten"  # one token "\u0120ten", not "\u0120" + "ten"
    assert len(target_ids) == len(tokenizer(" ten")["input_ids"])


def test_special_tokens_appended_to_every_text_are_not_targets():
    from tokenizers import processors

    tokenizer = tiny_hf_tokenizer("metaspace")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)])
    assert tokenizer("The sky is")["input_ids"][-1] == eos
    batch = encode_pairs(tokenizer, ["The sky is"], ["green"])
    row = batch.input_ids[0].tolist()
    assert eos not in row and row[0] == bos
    assert tokenizer.decode(batch.input_ids[batch.target_mask].tolist()).strip() == "green"


def test_a_pair_over_max_length_is_refused():
    prompt, target = "abcdefgh", "ij"  # 8 + len(" ij") = 11 tokens
    assert len(encode_pairs(CharTokenizer(), [prompt], [target], max_length=11)) == 1
    with pytest.raises(EditInputError, match="11 tokens, over the limit of 10"):
        encode_pairs(CharTokenizer(), [prompt], [target], max_length=10)


def test_edit_input_error_is_a_value_error():
    assert issubclass(EditInputError, ValueError)
