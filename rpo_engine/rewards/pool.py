"""Reward functions run in worker processes (`--reward-workers N`).

math-verify takes 3-6 ms a completion on one CPU core (`benchmarks/bench_rewards.py`), so a step of
64 prompts x 8 samples spends 2-3 s scoring one after the other: on a GPU, as long as an RPO rollout of
a small model. A reward function of the per-completion kind, `fn(completion_text, answer)`, is a pure
function of its two strings, so its calls can spread over processes and come back as the same numbers
in the same order.

The workers resolve the functions from their `--reward` names themselves (a closure, or the checked
wrapper around a user's function, does not pickle), and are started by spawn: a forked copy of a
process that holds torch's thread pools can deadlock. TRL-style functions (called once per batch, and
free to batch or keep state) and reward models (a model on the GPU) are scored in the trainer's process.
A user function that raises, or returns something that is not a number, fails the same one-line way as
in the trainer's process: the error comes back from the worker. As with any spawned worker, a script of
your own that starts a pool (or a Trainer with `reward_workers`) needs the `if __name__ == "__main__":`
guard: each worker imports the script's main module.
"""
from __future__ import annotations

import concurrent.futures
import concurrent.futures.process
import multiprocessing
import os
import signal
import sys
import threading
import time

from rpo_engine.errors import UserError

_FUNCTIONS: dict[int, object] = {}  # in a worker: the pooled functions, by their index among --reward's


def reward_function(name: str):
    """The per-completion reward function `name` stands for: exact, math, or module:function (a function
    written for TRL comes back as a TRLStyleReward)."""
    from rpo_engine.rewards.answers import exact_answer_reward, load_reward_fn, math_answer_reward

    if name == "exact":
        return exact_answer_reward
    if name == "math":
        return math_answer_reward
    return load_reward_fn(name)


def _start_worker(names: dict[int, str]) -> None:
    # Ctrl-C reaches the whole process group, a scheduler's SIGUSR1 (SLURM's --signal) every process of the job:
    # the trainer's process handles them (it stops the pool; it stops the run after the step, with a checkpoint),
    # so a worker that took one too would only add its own traceback, or die and break the step's scoring.
    # (SIGTERM is left as it is: the pool stops a worker with it.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):  # blocked since the spawn (RewardPool.score): one sent meanwhile is dropped now
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STARTUP_BLOCKED)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _FUNCTIONS.update({index: reward_function(name) for index, name in names.items()})


# Blocked while the workers are spawned, a mask they inherit through exec: else one sent to the process group in the
# seconds a worker imports torch and rpo_engine (before _start_worker ignores it) killed it, with a traceback.
_STARTUP_BLOCKED = {signal.SIGINT, signal.SIGUSR1}


def _exit_with_parent(parent: int) -> None:
    """A worker's watch: once the process that started it is gone (killed, so nothing shut the pool down), the
    worker ends too, instead of waiting on the pool's queue for ever."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _score(index: int, texts: list[str], answers: list[str]) -> list[float]:
    fn = _FUNCTIONS[index]
    return [float(fn(text, answer)) for text, answer in zip(texts, answers)]


class RewardPool:
    """`workers` processes that score the reward functions `names` maps to (their index among --reward's
    -> the name a worker resolves: exact, math or module:function; names with "auto" already resolved)."""

    def __init__(self, names: dict[int, str], workers: int):
        if workers < 1:
            raise ValueError(f"a reward pool needs at least one worker, got {workers}")
        self.names, self.workers = dict(names), workers
        self._said_sigterm = False  # the warning that the workers' SIGTERM moved scoring here, given once
        self.executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"), initializer=_start_worker,
            initargs=(self.names,))

    def serves(self, index: int) -> bool:
        return index in self.names

    def score(self, index: int, texts: list[str], answers: list[str]) -> list[float]:
        """Reward function `index`'s score of each text against its answer, in order."""
        if len(texts) != len(answers):
            raise ValueError(f"{len(texts)} texts for {len(answers)} answers")
        # Several chunks a worker, so one slow completion (a math-verify timeout) holds up little else.
        size = max(1, -(-len(texts) // (4 * self.workers)))
        starts = range(0, len(texts), size)
        try:
            # the first call spawns the workers: with Ctrl-C and SIGUSR1 blocked, here only for the submitting (one
            # sent meanwhile reaches this process after), in a worker until _start_worker ignores them
            blocked = (signal.pthread_sigmask(signal.SIG_BLOCK, _STARTUP_BLOCKED)
                       if hasattr(signal, "pthread_sigmask") else None)
            try:
                parts = self.executor.map(_score, [index] * len(starts), [texts[i:i + size] for i in starts],
                                          [answers[i:i + size] for i in starts])
            finally:
                if blocked is not None:
                    signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            return [score for part in parts for score in part]
        except concurrent.futures.process.BrokenProcessPool:
            if self._ended_by_sigterm():
                # a SIGTERM sent to every process (SLURM ending a job, `kill -- -PGID`): the trainer took it too and
                # stops after this step, with a checkpoint; this step's scores come from here (the same function).
                # Said once: where the trainer did not take it, every later call is scored here, slower
                if not self._said_sigterm:
                    self._said_sigterm = True
                    print("warning: the --reward-workers processes were ended by SIGTERM; scoring in this process",
                          file=sys.stderr, flush=True)
                fn = reward_function(self.names[index])
                return [float(fn(text, answer)) for text, answer in zip(texts, answers)]
            raise UserError(f"reward function {self.names[index]!r}: a --reward-workers process died while "
                            f"scoring (a crash or an exit in the function, or out of memory); without "
                            f"--reward-workers its error shows here") from None
        except KeyboardInterrupt:  # the workers ignore it and would finish every queued chunk first
            self.close(wait=False)
            raise

    def _ended_by_sigterm(self) -> bool:
        """Whether every worker ended by SIGTERM, sent from outside (a crash or an exit ends one otherwise; the pool
        then sends the others SIGTERM)."""
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        deadline = time.monotonic() + 5  # the pool's thread reaps them too: its join or ours reads the exit code
        while any(process.exitcode is None for process in processes) and time.monotonic() < deadline:
            time.sleep(0.05)
        return bool(processes) and all(process.exitcode == -signal.SIGTERM for process in processes)

    def close(self, wait: bool = True) -> None:
        """Shut the workers down once their calls in flight are done, or (`wait=False`: an error or an
        interrupt is on its way) at once."""
        processes = list((getattr(self.executor, "_processes", None) or {}).values())  # shutdown forgets them
        # shut down first: the pool's thread then drops the cancelled calls before it finds the workers gone
        # (Python 3.11's fails on a cancelled call with an InvalidStateError traceback)
        self.executor.shutdown(wait=wait, cancel_futures=True)
        if not wait:  # before Python 3.14 no public call stops a worker in the middle of its chunk
            for process in processes:
                process.terminate()

    def functions(self, functions: list) -> list:
        """`functions` (resolved from --reward, in order) with each one this pool serves made a PooledReward."""
        return [PooledReward(self, i, fn) if self.serves(i) else fn for i, fn in enumerate(functions)]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(wait=exc_type is None)


class PooledReward:
    """Reward function `fn`, the pool's function `index`: called on one completion it is `fn` (here, in this
    process); `score(texts, rows)` scores many at once over the pool's workers, which is how the trainer and
    eval call it (answers.score_groups). It keeps `fn`'s name, for the metrics."""

    def __init__(self, pool: RewardPool, index: int, fn):
        self.pool, self.index, self.fn = pool, index, fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, completion_text: str, answer: str) -> float:
        return self.fn(completion_text, answer)

    def score(self, texts: list[str], rows: list[dict], completion_ids=None, none_as_nan: bool = False) -> list[float]:
        return self.pool.score(self.index, list(texts), [row["answer"] for row in rows])
