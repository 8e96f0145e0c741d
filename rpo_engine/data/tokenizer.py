"""The task tokenizer: a small byte-level BPE trained on the built-in task's traces.

- Byte-level (like GPT-2 / Qwen): every string encodes, and ``decode(encode(x)) == x`` exactly.
- Digits are always single tokens (so numbers are read and written digit by digit, as the traces do).
- Trained on a fixed, seeded corpus of traces, so building it twice gives the same ``tokenizer.json``.
- One special token, ``<|endoftext|>``, used as both eos and pad (as in Qwen); no bos, no chat template:
  the built-in task is a plain-text base-model task.
"""
from __future__ import annotations

import os

from rpo_engine.errors import UserError

__all__ = ["EOS_TOKEN", "VOCAB_SIZE", "build_task_tokenizer", "save_task_tokenizer", "tokenizer_corpus"]

EOS_TOKEN = "<|endoftext|>"
VOCAB_SIZE = 512  # an upper bound: the merges the corpus supports stop well short of it
CORPUS_ROWS = 3000
CORPUS_SEED = 1234

# A few generic strings so that common answer formats and words get compact tokens too.
_EXTRA_TEXT = [
    "Q: ", "A: ", "\n#### ", "#### ", "\\boxed{", "}", "The answer is ", "Question: ", "Answer: ",
    "<think>", "</think>", " the", " and", " of", " is", " to", " a", " in", ". ", ", ",
]


def tokenizer_corpus() -> list[str]:
    """The fixed training corpus: prompts + solutions of seeded train problems of several sizes."""
    from rpo_engine.data.arithmetic import ArithmeticConfig, make_split

    configs = [
        ArithmeticConfig(),
        ArithmeticConfig(add_min_digits=1, add_max_digits=8, mul_min_digits_a=1, mul_max_digits_a=4,
                         mul_min_digits_b=1, mul_max_digits_b=3),
    ]
    texts = []
    for i, cfg in enumerate(configs):
        for row in make_split("train", CORPUS_ROWS // len(configs), seed=CORPUS_SEED + i, config=cfg):
            texts.append(row["prompt"] + row["solution"])
    return texts + _EXTRA_TEXT * 50


def _build_backend():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    # byte-level BPE must not add a prefix space or trim offsets on decode: decode(encode(x)) == x
    return tok


def build_task_tokenizer():
    """A ``transformers.PreTrainedTokenizerFast`` for the built-in task (eos = pad = ``<|endoftext|>``)."""
    from transformers import PreTrainedTokenizerFast

    backend = _build_backend()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    tok.padding_side = "right"
    return tok


def save_task_tokenizer(directory) -> str:
    """Write the task tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json) to `directory`,
    loadable with ``transformers.AutoTokenizer.from_pretrained(directory)``. Returns the directory."""
    directory = os.fspath(directory)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise UserError(f"{directory}: cannot create the tokenizer directory ({e.strerror or e})") from None
    build_task_tokenizer().save_pretrained(directory)
    return directory
