"""A small byte-level BPE tokenizer for the synthetic tasks, so tiny models train from scratch in
seconds. It is a normal `transformers` fast tokenizer: it saves with `save_pretrained`, decodes
any text exactly (byte-level), splits digits one by one, and has a chat template:

    <|system|>…<|end|><|user|>…<|end|><|assistant|>…<|end|>

with `<|end|>` as EOS and `<|pad|>` (id 0) as padding.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from align_jax.data import synthetic

SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _corpus(seed: int, rows: int):
    rng = np.random.default_rng(seed)
    problems = synthetic.arithmetic(rows, seed, digits=3, operators="+-*", with_completion=True)
    for row in problems:
        yield row["prompt"] + row["completion"]
    for row in synthetic.sentiment(rows, seed):
        yield row["prompt"] + " " + synthetic.review(rng, 3)


def tiny_tokenizer(vocab_size: int = 384, *, seed: int = 0,
                   corpus_rows: int = 2000) -> PreTrainedTokenizerFast:
    """Train the tokenizer on text from the synthetic generators (deterministic for a seed)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(seed, corpus_rows), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|end|>",
                                   chat_template=CHAT_TEMPLATE, model_max_length=2048)
