"""Request-level types (SamplingParams, Completion) and Sequence: counters plus a block table.

A Sequence holds its token ids (prompt, then sampled tokens), how many of them already have keys
and values in the paged cache (`num_cached_tokens`), the ids of its cache blocks, and what the
sampler needs (params, seed key, sample index). It owns no tensors. A fresh request is ONE sequence
with `num_forks = n` (n above the engine's max_num_seqs: several, numbered on from their `sample_index`);
after its prefill it splits into its samples, which share its blocks.
"""
from __future__ import annotations

import copy
import itertools
import math
import numbers
from dataclasses import dataclass
from enum import Enum, auto

from rpo_engine.rollout.sampler import sample_stream

MIN_TEMPERATURE = 1e-5  # the smallest sampling temperature short of greedy (vLLM's threshold for greedy)


@dataclass
class SamplingParams:
    """How to sample. `top_k` 0 or -1, `top_p` 1.0 and `min_p` 0 are off; `temperature` 0 is greedy.
    `max_new_tokens` is vLLM's max_tokens (a completion's budget; prompt + budget must fit the model's context).
    Not taken (a TypeError, not ignored): vLLM's presence/frequency penalties, `logprobs` (every completion carries
    its sampled tokens' log-probs, see Completion), `ignore_eos` (`stop_token_ids=[]`).
    `min_p` (vLLM's and TRL's): drop tokens less likely than min_p times the most likely one.
    `repetition_penalty` (transformers', vLLM's and TRL's; 1: off): a token already in the prompt or the
    completion has its logit divided by it where positive and multiplied by it where negative, before the
    temperature, greedy decoding included (rpo_engine/rollout/penalty.py).

    `stop_token_ids=None` stops at the model's eos ids (config.json's and generation_config.json's) and at the
    engine's tokenizer's eos token (vLLM's eos); a list is the whole set, in their place (vLLM adds its
    stop_token_ids to the eos: give both here, e.g. list(model.config.stop_token_ids) + [...]); `[]` never stops
    early (vLLM's ignore_eos=True). `stop` (vLLM's name; transformers' stop_strings): strings whose appearance in the
    decoded text ends the sample at the token that completes one (that token kept, as a stop token is, so
    `Completion.text` holds the string: vLLM's include_stop_str_in_output=True, where vLLM's default cuts it); the
    engine needs the tokenizer for it (`RolloutEngine(..., tokenizer=)`; rollout/stop.py). The text is the
    generated text, as vLLM's, and the prompt's last `stop_prompt_tokens` tokens before it (the trainer
    counts an RPO kept path, which is part of the answer; transformers counts the whole prompt: give its
    length). `seed=None` draws a fresh seed from torch's global generator (so
    `torch.manual_seed` reproduces a run). A sample's draws depend only on its request's seed and prompt,
    its index among the n and its position (as vLLM's per-request seeds): the same prompt given twice with
    one seed samples the same completions twice, so ask for G samples of a prompt with n=G, not G copies.
    """

    n: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | None = None
    stop_prompt_tokens: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field (a ValueError naming it); integers of any kind (numpy's too) become ints. The
        engine checks again at each generate call: the fields may have been changed since."""
        def integer(name, low):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                return False
            setattr(self, name, int(value))
            return True

        def real(value):
            return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)

        if not integer("n", 1):
            raise ValueError(f"SamplingParams.n must be an integer >= 1, got {self.n!r}")
        if not integer("max_new_tokens", 0):
            raise ValueError(f"SamplingParams.max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        # logits / T overflows fp32 long before T reaches 0 (and fp32 rounds the smallest to 0): a near-zero T is
        # refused, not silently sampled at T = 1 or with NaN log-probs
        if not real(self.temperature) or not (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE):
            raise ValueError(f"SamplingParams.temperature must be 0 (greedy) or a finite number >= {MIN_TEMPERATURE}, "
                             f"got {self.temperature!r}")
        if not real(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not integer("top_k", -1):
            raise ValueError(f"SamplingParams.top_k must be an integer >= 1, or 0 / -1 for off, got {self.top_k!r}")
        if not real(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1], got {self.min_p!r}")
        # a seen token's positive logit is divided by it: below ~1e-37 that overflows fp32 to inf (NaN samples);
        # the bound is temperature's, as far from any useful penalty (< 1 favours repetition)
        if not real(self.repetition_penalty) or not self.repetition_penalty >= MIN_TEMPERATURE:
            raise ValueError(f"SamplingParams.repetition_penalty must be a finite number >= {MIN_TEMPERATURE} "
                             f"(1: off), got {self.repetition_penalty!r}")
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, (str, bytes)) and hasattr(ids, "__iter__"):
                ids = list(ids)  # once: a generator read by the check below would be empty after it
            if (not isinstance(ids, list)
                    or not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in ids)):
                raise ValueError(f"SamplingParams.stop_token_ids must be a list of ints or None, got {ids!r}")
            self.stop_token_ids = [int(t) for t in ids]
        if self.stop is not None:
            stop = [self.stop] if isinstance(self.stop, str) else self.stop  # one string, as vLLM takes it
            if not isinstance(stop, (bytes, dict)) and hasattr(stop, "__iter__"):  # a dict's keys are no list
                stop = list(stop)
            if not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop):
                raise ValueError(f"SamplingParams.stop must be a string or a list of non-empty strings, got {self.stop!r}")
            self.stop = stop
        if not integer("stop_prompt_tokens", 0):
            raise ValueError(f"SamplingParams.stop_prompt_tokens must be an integer >= 0, got {self.stop_prompt_tokens!r}")
        if self.seed is not None and not integer("seed", -math.inf):  # any integer: the sampler keeps its low 64 bits
            raise ValueError(f"SamplingParams.seed must be an integer or None, got {self.seed!r}")


@dataclass
class Completion:
    """One sample. `logprobs[i]` = log_softmax(logits / T)[token_ids[i]] (T = 1 when greedy), taken
    BEFORE top-k/top-p/min-p truncation and a repetition penalty: the trainer's teacher-forced log-prob of
    the same token."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (the stop token, or the token completing a stop string, is the last) or "length"
    _tokenizer = None  # the engine's, for `text`: set on the instance, not a field (asdict, pickling leave it out)

    def __getstate__(self):  # a pickled completion (to another process) does not carry the whole tokenizer
        return {k: v for k, v in self.__dict__.items() if k != "_tokenizer"}

    # copy and deepcopy go through __getstate__ too, which would drop the tokenizer: a copy shares it instead
    def __copy__(self):
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        return out

    def __deepcopy__(self, memo):
        out = memo[id(self)] = object.__new__(type(self))
        out.__dict__.update({k: v if k == "_tokenizer" else copy.deepcopy(v, memo) for k, v in self.__dict__.items()})
        return out

    @property
    def text(self) -> str:
        """The completion decoded (special tokens skipped, as the trainer's rewards read it; vLLM's
        CompletionOutput.text), by the engine's tokenizer."""
        if self._tokenizer is None:
            raise ValueError("Completion.text needs the tokenizer: build the engine with RolloutEngine(model, "
                             "tokenizer=...)")
        return self._tokenizer.decode(self.token_ids, skip_special_tokens=True)


def with_tokenizer(completion: Completion, tokenizer) -> Completion:
    """`completion`, its `text` read with `tokenizer` (None: no text)."""
    if tokenizer is not None:
        completion._tokenizer = tokenizer
    return completion


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    _uids = itertools.count()

    def __init__(self, token_ids: list[int], params: SamplingParams, block_size: int, stop_token_ids,
                 key: int, request_index: int, num_forks: int = 1, sample_index: int = 0, stop_strings=None):
        self.uid = next(Sequence._uids)  # unique over the process: names the sequence in a batch's identity
        self.token_ids = list(token_ids)
        self.num_prompt_tokens = len(token_ids)  # the request's prompt; never changes (not even on preemption)
        self.num_cached_tokens = 0  # leading tokens whose K/V are in the cache
        # With async scheduling: tokens sampled on the device whose ids the host has not read yet (0 or 1).
        # They count in num_tokens: the next decode step is planned before they arrive.
        self.num_pending = 0
        self.block_table: list[int] = []
        self.slot: int | None = None  # its row in the block manager's BlockTables while it holds blocks
        self.block_size = block_size
        self.status = SequenceStatus.WAITING
        self.params = params
        self.stop_token_ids = frozenset(stop_token_ids)
        self.stop_strings = stop_strings  # a StopStrings (rollout/stop.py) where params.stop has some
        self.stop_state = None  # its reading of this sequence's text so far
        self.key = key  # seed mixed with the prompt: the sampler's random stream for this request
        self.request_index = request_index
        self.num_forks = num_forks  # > 1 only for a fresh request, until its prefill
        self.sample_index = sample_index
        self.stream = sample_stream(key, sample_index)  # the sampler's draws for this sample
        self.logprobs: list[float] = []
        self.finish_reason: str | None = None

    def __len__(self):
        return len(self.token_ids)

    @property
    def num_blocks(self) -> int:
        return -(-len(self.token_ids) // self.block_size)

    @property
    def num_tokens(self) -> int:
        """Tokens so far, a pending one included: the next decode step computes the K/V of token
        num_tokens - 1 and samples token num_tokens."""
        return len(self.token_ids) + self.num_pending

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    def block(self, i: int) -> tuple[int, ...]:
        return tuple(self.token_ids[i * self.block_size:(i + 1) * self.block_size])

    def fork(self, sample_index: int) -> "Sequence":
        """A sibling sample with the same tokens and block table (the block manager adds the refs)."""
        child = Sequence(self.token_ids, self.params, self.block_size, self.stop_token_ids, self.key,
                         self.request_index, 1, sample_index, self.stop_strings)
        child.num_prompt_tokens = self.num_prompt_tokens
        child.num_cached_tokens = self.num_cached_tokens
        child.block_table = list(self.block_table)
        child.status = self.status
        return child

    def append_token(self, token_id: int, logprob: float):
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        if token_id in self.stop_token_ids:
            self.finish_reason = "stop"
        elif self.stop_strings is not None and self.stop_completed():
            self.finish_reason = "stop"
        elif len(self.token_ids) - self.num_prompt_tokens >= self.params.max_new_tokens:
            self.finish_reason = "length"

    def stop_completed(self) -> bool:
        start = self.num_prompt_tokens - min(self.params.stop_prompt_tokens, self.num_prompt_tokens)
        completed, self.stop_state = self.stop_strings.completed_by_last(self.token_ids, self.stop_state, start)
        return completed

    def completion(self, tokenizer=None) -> Completion:
        return with_tokenizer(Completion(self.token_ids[self.num_prompt_tokens:], list(self.logprobs),
                                         self.finish_reason), tokenizer)
