"""Tiny randomly initialised models, built in-process, one per supported architecture family."""

from __future__ import annotations

import torch


class CharTokenizer:
    """A minimal tokenizer (one id per byte) with the slice of the HF interface mend uses."""

    def __init__(self, vocab_size: int = 260, padding_side: str = "right"):
        self.vocab_size = vocab_size
        self.pad_token_id = 0
        self.eos_token_id = 1
        self.pad_token = "<pad>"
        self.eos_token = "<eos>"
        self.padding_side = padding_side

    def __len__(self):
        return self.vocab_size

    def __call__(self, text, add_special_tokens=True, **kwargs):
        ids = [3 + b for b in text.encode("utf-8")]
        return {"input_ids": ids}

    def decode(self, ids, skip_special_tokens=True):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


def tiny_model(family: str, seed: int = 0):
    """A tiny causal LM of ``family`` ('gpt2', 'llama', 'gptj', 'gpt_neo', 'gpt_neox', 'qwen2', 'mistral',
    'gemma3')."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=260, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if family == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128, **common)
        model = tf.GPT2LMHeadModel(config)
    elif family == "gptj":
        config = tf.GPTJConfig(n_embd=32, n_layer=4, n_head=4, n_positions=128, rotary_dim=4, **common)
        model = tf.GPTJForCausalLM(config)
    elif family == "gpt_neo":
        config = tf.GPTNeoConfig(hidden_size=32, num_layers=4, num_heads=4, max_position_embeddings=128,
                                 attention_types=[[["global", "local"], 2]], window_size=16, **common)
        model = tf.GPTNeoForCausalLM(config)
    elif family == "gpt_neox":
        config = tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=128, **common)
        model = tf.GPTNeoXForCausalLM(config)
    elif family == "gemma3":
        # Gemma 3's text model: GeGLU MLP between pre/post feed-forward norms, embeddings scaled by
        # sqrt(hidden) and tied to the output, sliding-window layers (window 8, shorter than the test
        # prompts) mixed with full-attention ones, and soft-capped final logits (as Gemma 2 configs have).
        config = tf.Gemma3TextConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                                     num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8,
                                     max_position_embeddings=128, sliding_window=8,
                                     layer_types=["sliding_attention", "full_attention"] * 2,
                                     final_logit_softcapping=30.0, **common)
        model = tf.Gemma3ForCausalLM(config)
    else:
        cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM), "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
               "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[family]
        config = cls[0](hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=128, **common)
        model = cls[1](config)
    model.requires_grad_(False)
    model.eval()
    return model, CharTokenizer()


def tiny_gemma3_image_text(seed: int = 0):
    """A tiny Gemma 3 image-text model (``Gemma3ForConditionalGeneration``, what the hub's larger
    Gemma 3 checkpoints load as): a vision tower whose encoder has as many layers (4) as the language
    model, so only the structure tells which ``ModuleList`` holds the language model's blocks."""
    import transformers as tf

    torch.manual_seed(seed)
    text = dict(vocab_size=260, pad_token_id=0, eos_token_id=1, bos_token_id=2, hidden_size=32, intermediate_size=48,
                num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                query_pre_attn_scalar=8, max_position_embeddings=128, sliding_window=8)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=4, num_attention_heads=2, image_size=28,
                  patch_size=14)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, boi_token_index=257,
                             eoi_token_index=258, image_token_index=259)
    model = tf.Gemma3ForConditionalGeneration(config)
    model.requires_grad_(False)
    model.eval()
    return model, CharTokenizer()


# A small set of counterfactual facts for meta-training runs on the tiny models.
FACTS = [
    ("Paris is the capital of", "Rome"),
    ("The sky is", "green"),
    ("Water boils at", "ten"),
    ("Cats like to eat", "rocks"),
    ("The sun rises in the", "west"),
    ("Bees make", "glue"),
    ("Snow is", "hot"),
    ("Fish live in", "trees"),
]


def tiny_records(n: int = len(FACTS)):
    """``n`` EditRecords built from FACTS, each with one paraphrase and one locality probe."""
    from mend.data.records import EditRecord, Probe

    return [
        EditRecord(str(i), prompt, target, rephrases=("Q: " + prompt,),
                   locality=(Probe(f"Number {i} is", "odd" if i % 2 else "even"),))
        for i, (prompt, target) in enumerate(FACTS[:n])
    ]


# Text the tiny Hugging Face tokenizer is trained on (any other text still encodes: byte-level).
TOKENIZER_CORPUS = [prompt + " " + target for prompt, target in FACTS] + [
    "Number 1 is odd", "Number 2 is even", "Q: The capital of France is Paris.",
]


def tiny_hf_tokenizer(style: str = "byte_level"):
    """A real fast tokenizer (``PreTrainedTokenizerFast``) trained in-process on ``TOKENIZER_CORPUS``.

    Styles:
        "byte_level": GPT-2's scheme, a byte-level BPE whose tokens carry their leading space ("Ġ");
            any text encodes; no BOS.
        "metaspace": SentencePiece's scheme as a Metaspace pre-tokenizer (spaces become "▁", one "▁"
            in front of the text unless it starts with a space; pieces never span words), a BPE over
            characters, and a BOS in front of every text.
        "sentencepiece": Llama-2's and Mistral's tokenizer.json: the same, with the "▁" prepended by a
            normaliser, which prepends it even to a text that starts with a space (" green" becomes
            "▁▁green").
    """
    import transformers as tf
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    space = "\u2581"
    if style == "byte_level":
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>", "<bos>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        bpe.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
        return tf.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>",
                                          bos_token="<bos>")
    if style not in ("metaspace", "sentencepiece"):
        raise ValueError(f"tiny_hf_tokenizer styles: 'byte_level', 'metaspace', 'sentencepiece'; got {style!r}")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    if style == "metaspace":
        bpe.pre_tokenizer = pre_tokenizers.Metaspace(replacement=space, prepend_scheme="first", split=True)
        bpe.decoder = decoders.Metaspace(replacement=space, prepend_scheme="first", split=True)
    else:
        bpe.normalizer = normalizers.Sequence([normalizers.Prepend(space), normalizers.Replace(" ", space)])
        bpe.pre_tokenizer = pre_tokenizers.Split(space, behavior="merged_with_next")  # pieces within words
        bpe.decoder = decoders.Sequence([decoders.Replace(space, " "), decoders.Strip(" ", 1, 0)])
    alphabet = sorted(set("".join(TOKENIZER_CORPUS).replace(" ", space)) | {space})
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=alphabet, show_progress=False)
    bpe.train_from_iterator(TOKENIZER_CORPUS, trainer=trainer)
    bpe.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", bpe.token_to_id("<bos>"))])
    return tf.PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                                      unk_token="<unk>")


def save_tiny_hf_model(path, family: str = "llama", seed: int = 0):
    """Save a tiny ``family`` ('llama' or 'gpt2') causal LM and a real fast tokenizer to ``path`` in
    Hugging Face format, so ``mend.load_base_model(str(path))`` and ``mend train model.name=PATH`` load it.

    The tokenizer is a byte-level BPE trained on ``TOKENIZER_CORPUS`` (a few hundred tokens, any text
    encodes), wrapped in ``PreTrainedTokenizerFast`` with ``<eos>`` as EOS and ``<pad>`` as pad token.
    Returns ``path`` as a ``pathlib.Path``.
    """
    from pathlib import Path

    import transformers as tf

    path = Path(path)
    tokenizer = tiny_hf_tokenizer("byte_level")
    common = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                  bos_token_id=tokenizer.bos_token_id)
    torch.manual_seed(seed)
    if family == "llama":
        config = tf.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                                num_key_value_heads=2, max_position_embeddings=128, **common)
        model = tf.LlamaForCausalLM(config)
    elif family == "gpt2":
        config = tf.GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=128, **common)
        model = tf.GPT2LMHeadModel(config)
    else:
        raise ValueError(f"save_tiny_hf_model supports 'llama' and 'gpt2', got {family!r}")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
