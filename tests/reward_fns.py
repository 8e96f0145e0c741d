"""User reward functions loaded by path (`--reward tests.reward_fns:hash_reward`) in the CLI tests."""
import hashlib


def hash_reward(completion_text: str, answer: str) -> float:
    """Varied, deterministic rewards for a random model: a coin flip keyed by the text."""
    return float(hashlib.sha256(completion_text.encode()).digest()[0] % 2)


def text_reward(completion_text: str, answer: str):
    """A user mistake: a reward that is not a number."""
    return "right" if answer in completion_text else "wrong"


def failing_reward(completion_text: str, answer: str) -> float:
    """A user mistake: a reward function that raises."""
    return float(completion_text.split("####")[5])


def trl_hash_reward(completions, completion_ids, answer, **kwargs):
    """hash_reward written for TRL's GRPOTrainer: a list of completions in, one reward each out."""
    assert len(completions) == len(completion_ids) == len(answer) == len(kwargs["prompts"])
    return [hash_reward(c, a) for c, a in zip(completions, answer)]


def length_reward(completion_text: str, answer: str) -> float:
    """A second reward to weigh against the first: longer text, more reward."""
    return len(completion_text) / 100


def wrong_bonus(completion_text: str, answer: str) -> float:
    """A second reward that pays hash_reward's wrong answers well: a total reward that ranks wrong above right."""
    return 5.0 * (1.0 - hash_reward(completion_text, answer))


def half_wrong_hash(completion_text: str, answer: str) -> float:
    """Half of hash_reward's miss: with weights 1,2 beside hash_reward every total is 1, while the terms differ."""
    return (1.0 - hash_reward(completion_text, answer)) / 2


def always_right(completion_text: str, answer: str) -> float:
    """Every answer right: every group's G answers agree, so no group carries signal."""
    return 1.0


def slow_reward(completion_text: str, answer: str) -> float:
    """A reward that takes half a second a call."""
    import time

    time.sleep(0.5)
    return 0.0


def exiting_reward(completion_text: str, answer: str) -> float:
    """A reward that ends its process (as a crash in native code would)."""
    import os

    os._exit(3)


def rank_one_failing_reward(completion_text: str, answer: str) -> float:
    """A user mistake on one rank only: under torchrun, rank 1's calls raise; elsewhere hash_reward."""
    import os

    if os.environ.get("RANK") == "1":
        raise ZeroDivisionError("rank 1 reward bug")
    return hash_reward(completion_text, answer)


def trl_partly_applies(completions, **kwargs):
    """TRL-style, an extra reward that applies to some completions only: 0.5 there, None ("does not apply")
    elsewhere, keyed by the text as hash_reward is (another byte of its hash)."""
    return [0.5 if hashlib.sha256(c.encode()).digest()[1] % 2 else None for c in completions]


_calls = 0


def signalling_reward(completion_text: str, answer: str) -> float:
    """hash_reward, which at its call number $RPO_ENGINE_TEST_SIGNAL_AT_CALL sends its own process the signal
    $RPO_ENGINE_TEST_SIGNAL (TERM, USR1; twice where $RPO_ENGINE_TEST_SIGNAL_TWICE is set), on the rank
    $RPO_ENGINE_TEST_SIGNAL_RANK only where that is set: a scheduler's stop request at a known point of a run."""
    import os
    import signal

    global _calls
    _calls += 1
    rank = os.environ.get("RPO_ENGINE_TEST_SIGNAL_RANK")
    if _calls == int(os.environ["RPO_ENGINE_TEST_SIGNAL_AT_CALL"]) and rank in (None, os.environ.get("RANK", "0")):
        signum = signal.Signals["SIG" + os.environ["RPO_ENGINE_TEST_SIGNAL"]]
        for _ in range(2 if os.environ.get("RPO_ENGINE_TEST_SIGNAL_TWICE") else 1):
            os.kill(os.getpid(), signum)
    return hash_reward(completion_text, answer)


def first_attempt_failing_reward(completion_text: str, answer: str) -> float:
    """hash_reward, which raises at its call number $RPO_ENGINE_TEST_FAIL_AT_CALL on rank 1 in torchrun's first
    attempt only ($TORCHELASTIC_RESTART_COUNT 0): a rank's failure that a restart gets past."""
    import os

    global _calls
    _calls += 1
    if (os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1"
            and _calls == int(os.environ["RPO_ENGINE_TEST_FAIL_AT_CALL"])):
        raise RuntimeError("rank 1 fails in the first attempt")
    return hash_reward(completion_text, answer)


async def async_judge(completions, answer, trainer_state, log_metric, log_extra, **kwargs):
    """hash_reward as an async TRL-style judge (a network call's await), which also logs what TRL lets a reward
    log: the global_step it was shown and its mean score (log_metric), a verdict per completion (log_extra)."""
    import asyncio

    await asyncio.sleep(0)
    scores = [hash_reward(c, a) for c, a in zip(completions, answer)]
    log_metric("judge/global_step", trainer_state.global_step)
    log_metric("judge/mean_score", sum(scores) / len(scores))
    log_extra("judge_verdict", ["right" if s else "wrong" for s in scores])
    return scores


def torch_coin_reward(completion_text: str, answer: str) -> float:
    """A stochastic reward (a sampled judge, random tie-breaking) that draws from torch's global RNG, which a run
    checkpoints as its own state: a coin flip."""
    import torch

    return float(torch.rand(()) < 0.5)


def python_coin_reward(completion_text: str, answer: str) -> float:
    """torch_coin_reward from Python's global generator (random.random)."""
    import random

    return float(random.random() < 0.5)


def numpy_coin_reward(completion_text: str, answer: str) -> float:
    """torch_coin_reward from numpy's global generator."""
    import numpy

    return float(numpy.random.rand() < 0.5)


def offset_hash_reward(completion_text: str, answer: str) -> float:
    """hash_reward on top of 1e8, where float32's spacing is 8: finite, legal rewards that fp32 merges into one."""
    return 1e8 + hash_reward(completion_text, answer)


_helper = None


def helper_process_reward(completion_text: str, answer: str) -> float:
    """hash_reward from a process that keeps a helper process of its own, started by fork (multiprocessing's default
    on Linux before Python 3.14), which outlives it by up to 20 s: it holds the pipes it inherited open."""
    import multiprocessing
    import time

    global _helper
    if _helper is None:
        _helper = multiprocessing.get_context("fork").Process(target=time.sleep, args=(20,), daemon=True)
        _helper.start()
    return hash_reward(completion_text, answer)
