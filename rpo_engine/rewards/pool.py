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

import atexit
import collections
import contextlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import sys
import threading
import time
import weakref

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
    # blocked since the spawn (RewardPool._start): one sent meanwhile is dropped now
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STARTUP_BLOCKED)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    _FUNCTIONS.update({index: reward_function(name) for index, name in names.items()})


# Blocked while the workers are spawned, a mask they inherit through exec: else one sent to the process group in the
# seconds a worker imports the main module and the reward functions (before _start_worker ignores it) killed it, with a
# traceback.
_STARTUP_BLOCKED = {signal.SIGINT, signal.SIGUSR1}


def _exit_with_parent(parent: int) -> None:
    """A worker's watch: once the process that started it is gone (killed, so nothing shut the pool down), the
    worker ends too, even one in the middle of a chunk, instead of living on."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _score(index: int, texts: list[str], answers: list[str]) -> list[float]:
    return scores_of(_FUNCTIONS[index], texts, answers)


def scores_of(fn, texts: list[str], answers: list[str]) -> list[float]:
    return [float(fn(text, answer)) for text, answer in zip(texts, answers)]


class _Worker:
    """One worker process and the pipe the pool talks to it over."""

    def __init__(self, context, names: dict[int, str]):
        self.connection, worker_end = context.Pipe()
        self.process = context.Process(target=_serve, args=(worker_end, names), name="rpo_engine-reward-worker")
        self.process.start()
        worker_end.close()  # the worker's alone: its death is this end's end of file

    def exit_code(self, wait_s: float = 5.0) -> int | None:
        self.process.join(wait_s)
        return self.process.exitcode


def _serve(connection, names: dict[int, str]) -> None:
    """A worker's loop: (index, texts, answers) in, ("scores", [...]) or ("error", exception) out; None or the
    pool's end of file ends it."""
    try:
        _start_worker(names)
        failed_start = None
    except Exception as error:  # noqa: BLE001 - a --reward that does not import: each call's answer
        failed_start = error
    while True:
        try:
            request = connection.recv()
        except EOFError:
            return
        if request is None:
            return
        try:
            if failed_start is not None:
                raise failed_start
            reply = ("scores", _score(*request))
        except Exception as error:  # noqa: BLE001 - the trainer's process raises it, as it would have itself
            reply = ("error", _portable(error))
        try:
            connection.send(reply)
        except OSError:  # the pool's process is gone (killed outright): nobody waits for the reply
            return


def _portable(error: Exception) -> Exception:
    """`error`, or where it does not survive pickling (an exception class with other arguments) one that says it."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")


class RewardPool:
    """`workers` processes that score the reward functions `names` maps to (their index among --reward's
    -> the name a worker resolves: exact, math or module:function; names with "auto" already resolved).

    Its own small pool over pipes rather than concurrent.futures': the verdict on a worker that died (a SIGTERM
    from outside, or a crash) must come from that worker's own exit code, and ProcessPoolExecutor terminates the
    others itself, and may start a replacement mid-call, before anyone can look."""

    def __init__(self, names: dict[int, str], workers: int):
        if workers < 1:
            raise ValueError(f"a reward pool needs at least one worker, got {workers}")
        self.names, self.workers = dict(names), workers
        self._context = multiprocessing.get_context("spawn")
        self._workers: list[_Worker] = []  # started by the first call; a worker ended by SIGTERM leaves the list
        self._started = self._closed = self._said_scoring_here = False
        self._lock = threading.Lock()  # one call at a time: replies are read in the order the chunks went out
        self._closing = threading.Lock()  # one close at a time: a call's, stopped by another thread's close
        # dropped unclosed, or at interpreter exit: stop the workers. Registered with atexit here, after
        # multiprocessing's own exit hook (imported above), so it runs first: that hook joins live workers for ever
        self._finalizer = weakref.finalize(self, _stop_if_ours, os.getpid(), self._workers)
        self._finalizer.atexit = False
        atexit.register(self._finalizer)

    @property
    def processes(self) -> list:
        """The worker processes now serving (none before the first call)."""
        return [worker.process for worker in self._workers]

    def serves(self, index: int) -> bool:
        return index in self.names

    def score(self, index: int, texts: list[str], answers: list[str]) -> list[float]:
        """Reward function `index`'s score of each text against its answer, in order."""
        if len(texts) != len(answers):
            raise ValueError(f"{len(texts)} texts for {len(answers)} answers")
        with self._lock:
            if self._closed:
                raise RuntimeError("this reward pool is closed")
            if not self._started:
                self._start()
            # Several chunks a worker, so one slow completion (a math-verify timeout) holds up little else.
            size = max(1, -(-len(texts) // (4 * self.workers)))
            chunks = [(index, texts[i:i + size], answers[i:i + size]) for i in range(0, len(texts), size)]
            try:
                parts, error = self._score_chunks(index, chunks)
            except BaseException:  # Ctrl-C (the workers ignore it), a signal handler's error: chunks may be out, and
                self.close(wait=False)  # their replies must not reach a later call as its own, nor their work delay it
                raise
            if error is not None:
                raise error
            return [score for part in parts for score in part]

    def _start(self) -> None:
        # with Ctrl-C and SIGUSR1 blocked, here only while spawning (one sent meanwhile reaches this process after), in
        # a worker until _start_worker ignores them. multiprocessing's resource tracker first: the first spawn starts
        # it, and unblocks Ctrl-C in this thread after (the workers would then start with it deliverable)
        if sys.platform != "win32":
            from multiprocessing import resource_tracker

            resource_tracker.ensure_running()
        blocked = (signal.pthread_sigmask(signal.SIG_BLOCK, _STARTUP_BLOCKED)
                   if hasattr(signal, "pthread_sigmask") else None)
        try:
            for _ in range(self.workers):
                self._workers.append(_Worker(self._context, self.names))
        finally:
            if blocked is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
            self._started = True

    def _score_chunks(self, index: int, chunks: list[tuple]) -> tuple[list[list[float]], Exception | None]:
        """Each chunk's scores, and the first error a function raised: returned once every chunk in flight is back."""
        parts: list = [None] * len(chunks)
        waiting = collections.deque(range(len(chunks)))
        busy: dict[_Worker, int] = {}  # worker -> the chunk it holds
        error = None
        while waiting or busy:
            for worker in self._workers:
                if worker not in busy and waiting and error is None:
                    busy[worker] = waiting.popleft()
                    try:
                        worker.connection.send(chunks[busy[worker]])
                    except OSError:  # it died between calls: its exit code says how, below
                        pass
            if not busy:  # every worker was ended by SIGTERM
                if error is None:
                    self._warn_scoring_here()
                    fn = reward_function(self.names[index])
                    for i in waiting:
                        parts[i] = scores_of(fn, *chunks[i][1:])
                break
            # a death shows as the sentinel, or the pipe's end of file; where a process the worker forked (a user
            # function's helper) lives on and holds both open, as the exit code the timeout lets us look at
            ready = multiprocessing.connection.wait(
                [worker.connection for worker in busy] + [worker.process.sentinel for worker in busy], timeout=1.0)
            for worker in [worker for worker in busy if worker.connection in ready or worker.process.sentinel in ready
                           or not worker.process.is_alive()]:
                try:
                    if not worker.connection.poll():  # dead, and nothing came (no end of file either: held open)
                        raise EOFError
                    kind, value = worker.connection.recv()  # a reply sent just before a death is still read
                except (EOFError, OSError):
                    waiting.appendleft(busy.pop(worker))
                    self._lost(worker, index)
                    continue
                i = busy.pop(worker)
                if kind == "error":
                    error = error or value
                else:
                    parts[i] = value
        return parts, error

    def _lost(self, worker: _Worker, index: int) -> None:
        """A worker that died: ended by SIGTERM from outside (SLURM ending a job, `kill -- -PGID`: the trainer took it
        too and stops after this step, with a checkpoint), its chunks go to the others, or to this process once none
        is left; a crash or an exit is the user's error."""
        if self._closed:  # by close() from another thread (a `with` block left on an error): not a verdict
            raise RuntimeError("this reward pool was closed while scoring")
        code = worker.exit_code()
        self._workers.remove(worker)
        worker.connection.close()
        if code != -signal.SIGTERM:
            self.close(wait=False)
            names = {number.value: number.name for number in signal.Signals}  # a real-time signal has none
            cause = f"exit code {code}" if code is None or code >= 0 else f"signal {names.get(-code, -code)}"
            raise UserError(f"reward function {self.names[index]!r}: a --reward-workers process "
                            f"died while scoring ({cause}: a crash or an exit in the function, or out of memory); "
                            f"without --reward-workers its error shows here")

    def _warn_scoring_here(self) -> None:
        # said once: where the trainer did not take the SIGTERM, every later call is scored here, slower
        if not self._said_scoring_here:
            self._said_scoring_here = True
            print("warning: the --reward-workers processes were ended by SIGTERM; scoring in this process",
                  file=sys.stderr, flush=True)

    def close(self, wait: bool = True) -> None:
        """Shut the workers down (between calls they are idle), or (`wait=False`: an error or an interrupt is on
        its way) stop them at once, mid-chunk."""
        self._closed = True
        with self._closing:  # else both close a worker's connection, and one fails on a bad file descriptor
            _stop(self._workers, wait)
        atexit.unregister(self._finalizer)

    def functions(self, functions: list) -> list:
        """`functions` (resolved from --reward, in order) with each one this pool serves made a PooledReward."""
        return [PooledReward(self, i, fn) if self.serves(i) else fn for i, fn in enumerate(functions)]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        self.close(wait=exc_type is None)


def _stop_if_ours(owner: int, workers: list[_Worker]) -> None:
    if os.getpid() == owner:  # not in a forked copy of the pool's process (os.fork), whose workers they are not
        _stop(workers)


def _stop(workers: list[_Worker], wait: bool = False) -> None:
    for worker in workers:
        if wait:
            with contextlib.suppress(OSError):  # one that died already
                worker.connection.send(None)
        else:
            worker.process.terminate()
    for worker in workers:
        worker.process.join(30 if wait else 5)
        if worker.process.is_alive():  # stuck in C code past SIGTERM, or a wait=True worker that did not stop
            worker.process.kill()
            worker.process.join()
        worker.connection.close()
    workers.clear()


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
