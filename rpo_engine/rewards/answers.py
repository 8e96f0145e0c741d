"""Verifiable rewards on a completion's final answer.

Convention for every reward function (built-in or user-supplied): ``fn(completion_text: str, answer: str)
-> float``, where ``completion_text`` is the decoded completion (the kept RPO path + the generated suffix,
without the prompt) and ``answer`` is the dataset row's reference answer. A user function with a
``completions`` parameter is called TRL's way instead, once per batch of completions:
``fn(prompts=[...], completions=[...], completion_ids=[...], answer=[...], <other columns>=[...])
-> list[float]`` (`TRLStyleReward`). `score_completions` calls either kind. As in TRL, such a function may
be async (the batch's async functions are then awaited together), and it is also given ``trainer_state``,
``log_metric`` and ``log_extra`` where its signature takes them (`RewardLog`).

A reference answer may itself be a worked solution ending in ``#### <answer>`` (GSM8K style); then only
the part after its last ``####`` is compared.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import math
import os
import re
import sys
import threading
import traceback
import warnings
import weakref
from decimal import Decimal
from fractions import Fraction

from rpo_engine.data.arithmetic import extract_answer
from rpo_engine.errors import UserError

__all__ = [
    "extract_answer",
    "exact_answer_reward",
    "math_answer_reward",
    "format_reward",
    "load_reward_fn",
    "is_correct",
    "score_completions",
    "score_functions",
    "score_groups",
    "TRLStyleReward",
    "RewardLog",
    "BUILTIN_REWARDS",
]

# math-verify is only ever shown the tail of a completion: the final answer is at the end, and parsing a
# huge degenerate completion is where its time goes.
_MATH_MAX_CHARS = 2000
_MATH_TIMEOUT_S = 2  # per parse / verify call (math-verify's signal timeout: main thread only, _MathVerifyHelper)


def is_correct(accuracy: float) -> bool:
    """An answer is right when its reward function gives it full marks (1.0): what the experience cache
    verifies, eval accuracy counts and length shaping ranks, whatever partial credit the function gives."""
    return accuracy >= 1.0


_SCIENTIFIC_RE = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _reference(answer) -> str:
    """The reference answer as text: a GSM8K solution's ``####`` part; a number (a dataset row given to a reward
    directly, not through load_dataset_rows) as that loader writes it, 18.0 as "18"."""
    if isinstance(answer, float) and math.isfinite(answer) and answer.is_integer():
        answer = int(answer)
    ref = "" if answer is None else str(answer).strip()
    if "####" in ref:
        ref = extract_answer(ref) or ""
    if _SCIENTIFIC_RE.fullmatch(ref):  # a float's str (1e-05): math-verify reads "1e-05" as 1
        ref = format(Decimal(ref), "f")
    return ref


def exact_answer_reward(completion_text: str, answer: str) -> float:
    """1.0 when the answer after the completion's last ``####`` equals the reference (both stripped), else 0.0."""
    pred = extract_answer(completion_text)
    ref = _reference(answer)
    return 1.0 if pred is not None and ref and pred == ref else 0.0


# ------------------------------------------------------------------------------------------ math-verify

_NUMBER_RE = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+")


def _as_number(text: str):
    """A plain decimal number (``42``, ``-3.50``, ``1,234``; an optional trailing ``.``) as a Fraction, else None."""
    t = text.strip().rstrip(".").strip()
    if t.startswith("$") and t.endswith("$") and len(t) >= 2:
        t = t.strip("$").strip()
    if not _NUMBER_RE.fullmatch(t):
        return None
    return Fraction(t.replace(",", ""))


def _parse(text: str, timeout):
    from math_verify import parse

    return parse(text, parsing_timeout=timeout, raise_on_error=False)


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")  # math mode, not MATH's escaped currency sign (\$1.17)
_LEADING_NUMBER = re.compile(r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?=$|[\s*),;:!]|\.(?!\d))")
# LaTeX's space between digit groups (1\\,000, 1\\ 000, 1~000), which math-verify reads as a product (1*0)
_SPACED_THOUSANDS = re.compile(r"(?<=\d)(?:\\,|\\ |~)(?=\d{3}(?!\d))")
_UNFINISHED_RE = re.compile(r"=\s*\$*\s*$")  # a last equation without its right side ("48 + 24 =")
_UNREADABLE_REFERENCES: set[str] = set()  # each warned about once


def _parse_short_answer(text: str, timeout):
    """Parse a bare answer (a reference, or what follows ``####``) as math: ``x^2 + 2x`` is read as LaTeX
    (unwrapped, math-verify would pick out its last number)."""
    if _UNESCAPED_DOLLAR.search(text) or "\\boxed" in text:
        return _parse(text, timeout)
    return _parse(f"${text}$", timeout) or _parse(text, timeout)


def _graded_part(completion_text: str) -> tuple[str, str | None]:
    """(the text to grade, its ``####`` answer or None). After a reasoning model's last ``</think>`` only what
    follows it counts (TRL's reasoning_accuracy_reward). The last ``####`` line is the answer unless it is a
    Markdown heading: a ``\\boxed`` follows it, or it does not start with a number and more text follows
    (``#### Step 2: ...``, ``#### Final Answer``)."""
    text = completion_text
    think_end = text.rfind("</think>")
    if text.rfind("<think>") > think_end:  # cut off while thinking: no answer given (TRL's reasoning_accuracy_reward)
        return "", None
    if think_end >= 0:
        text = text[think_end + len("</think>"):]
    hashed = extract_answer(text)
    if hashed is not None:
        after = text[text.rfind("####"):]
        below = after.partition("\n")[2]
        if "\\boxed" in after or (below.strip() and _hashed_number(hashed) is None):
            hashed = None
    return text, hashed


def _tail(text: str) -> str:
    """What math-verify reads of a long completion: its last _MATH_MAX_CHARS characters, or from its last
    ``\\boxed`` on when that lies before them (an answer boxed, then checked at length). Trailing whitespace does
    not count: a completion that ran out its budget on newlines kept its answer before them."""
    text = text.rstrip()
    start, box = max(len(text) - _MATH_MAX_CHARS, 0), text.rfind("\\boxed")
    return text[box:box + _MATH_MAX_CHARS] if 0 <= box < start else text[start:]


def _hashed_number(hashed: str):
    """A ``####`` answer's number: all of it, or (GSM8K graders' rule) the number it starts with, before words,
    units or Markdown (``18 dollars``, ``**18**``); None when it starts otherwise (``18/5``, ``x = 3``)."""
    number = _as_number(hashed)
    if number is None:
        match = _LEADING_NUMBER.match(hashed.strip().lstrip("*_$ "))
        number = Fraction(match.group().replace(",", "")) if match else None
    return number


def math_answer_reward(completion_text: str, answer: str) -> float:
    """1.0 when the completion's final answer is mathematically equal to the reference, else 0.0.

    The final answer is the one after the last ``####`` if there is one and no ``\\boxed`` follows it, else
    what math-verify finds in the completion (``\\boxed{...}`` first, then the last expression); after a
    ``</think>``, only what follows it is read; a completion cut off in an unclosed ``<think>`` or at a last ``=``
    has no answer. Plain numbers are compared exactly without math-verify (fast
    path; a ``####`` answer by the number it starts with); anything else goes through
    ``math_verify.parse``/``verify`` with a timeout (outside the main thread, in `_MathVerifyHelper`). Never raises: garbage, timeouts and parser errors give
    0.0. A reference math-verify cannot read scores every completion 0, with a warning (once per reference).
    """
    try:
        if not isinstance(completion_text, str) or not completion_text.strip():
            return 0.0
        ref = _reference(answer)
        if not ref:
            return 0.0
        text, hashed = _graded_part(completion_text)
        pred_text = hashed if hashed is not None else _tail(text)
        if hashed is None and _UNFINISHED_RE.search(pred_text) and "\\boxed" not in pred_text:
            return 0.0  # cut off before the result: math-verify would take the left side for the answer
        ref_num = _as_number(ref)
        pred_num = _as_number(pred_text) if hashed is None else _hashed_number(hashed)
        if pred_num is not None and ref_num is not None:
            return 1.0 if pred_num == ref_num else 0.0

        if threading.current_thread() is threading.main_thread():
            verdict = _math_verify_verdict(ref, pred_text, hashed is not None, _MATH_TIMEOUT_S)
        else:
            verdict = _HELPER.verdict(ref, pred_text, hashed is not None)
        if verdict is None:
            if ref not in _UNREADABLE_REFERENCES:
                _UNREADABLE_REFERENCES.add(ref)
                warnings.warn(f"math reward: math-verify cannot read the reference answer {ref!r}, so every "
                              f"completion for it scores 0", stacklevel=2)
            return 0.0
        return verdict
    except Exception:  # noqa: BLE001 - a reward must never take the training step down
        return 0.0


def _math_verify_verdict(ref: str, pred_text: str, short_answer: bool, timeout) -> float | None:
    """math-verify's verdict on `pred_text` (a ``####`` answer when `short_answer`, else a completion's tail)
    against `ref`: 1.0 or 0.0, None when it cannot read `ref`. `timeout` works in the main thread only."""
    from math_verify import verify

    ref, pred_text = _SPACED_THOUSANDS.sub("", ref), _SPACED_THOUSANDS.sub("", pred_text)
    gold = _parse_short_answer(ref, timeout)
    if not gold:
        return None
    pred = _parse_short_answer(pred_text[-_MATH_MAX_CHARS:], timeout) if short_answer else _parse(pred_text, timeout)
    if not pred:
        return 0.0
    return 1.0 if verify(gold, pred, timeout_seconds=timeout, raise_on_error=False) else 0.0


class _MathVerifyHelper:
    """math-verify for the calls made outside the main thread, where its timeouts (signal alarms) do not work and a
    tower of powers (``\\boxed{10^{10^{10}}}``) held the step for ever, and the GIL with it. One helper process
    (a plain subprocess: no re-import of the caller's script, as spawn would) runs them in its main thread, with
    the timeouts; one that has not answered by the deadline (stuck in C code) is killed and the answer scores 0.
    Calls go one at a time: math-verify holds the GIL anyway."""

    START_DEADLINE_S = 300.0  # it imports math-verify (and sympy), on a busy machine
    DEADLINE_S = 6 * _MATH_TIMEOUT_S + 10.0  # up to five parses and a verify, each under its timeout, then slack
    RETRY_AFTER_S = 600.0  # after a failed start: not every call paying another (up to START_DEADLINE_S)

    def __init__(self):
        self.lock = threading.Lock()
        self.process = None
        self.failed_start_at = None
        after_fork = weakref.WeakMethod(self._after_fork_in_child)  # the hook stays registered: it must not keep self
        os.register_at_fork(after_in_child=lambda: (method := after_fork()) is not None and method())

    def _after_fork_in_child(self) -> None:
        """A forked child gets a lock of its own (a thread of the parent's, not in the child, may have held this one
        mid-call) and no helper: it starts its own. Its copies of the parent's helper's pipe ends are pointed at
        /dev/null in place, not closed through the file objects: one of them may hold a request the parent has
        written and not yet flushed (a flush here would reach the parent's helper as one more call), and a dead
        thread's frames may keep them open (keeping the helper's stdin open past the parent's end)."""
        self.lock = threading.Lock()
        if self.process is not None:
            devnull = os.open(os.devnull, os.O_RDWR)
            for pipe in (self.process.stdin, self.process.stdout):
                os.dup2(devnull, pipe.fileno(), inheritable=False)
            os.close(devnull)
            self.process = None

    def verdict(self, ref: str, pred_text: str, short_answer: bool) -> float | None:
        import json
        import time

        with self.lock:
            if self.failed_start_at is not None and time.monotonic() - self.failed_start_at < self.RETRY_AFTER_S:
                return 0.0
            try:
                if self.process is None or self.process.poll() is not None:
                    try:
                        self._start()
                    except Exception as e:
                        self.failed_start_at = time.monotonic()
                        warnings.warn(f"math reward: the math-verify helper (math-verify outside the main thread) "
                                      f"did not start ({e}); answers that need math-verify score 0 for "
                                      f"{self.RETRY_AFTER_S:g} s, then it is tried again", stacklevel=3)
                        raise
                    self.failed_start_at = None
                self.process.stdin.write(json.dumps([ref, pred_text, short_answer]) + "\n")
                self.process.stdin.flush()
                line = self._read_line(self.DEADLINE_S)
                return json.loads(line)
            except Exception:  # noqa: BLE001 - past the deadline, or the helper died: scored 0, a new one next time
                self._stop()
                return 0.0

    def _start(self) -> None:
        import subprocess

        # this rpo_engine's directory in place of `-c`'s cwd: not another checkout in the caller's cwd, and not
        # ahead of the standard library (as on PYTHONPATH) when it is site-packages
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        self.process = subprocess.Popen(
            [sys.executable, "-c", "import sys; sys.path[0] = sys.argv[1]; "
             "from rpo_engine.rewards.answers import _serve_math_verify; _serve_math_verify()", package_root],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True)
        if self._read_line(self.START_DEADLINE_S) != "ready":
            raise RuntimeError("the math-verify helper did not start")

    def _read_line(self, deadline_s: float) -> str:
        import select

        ready, _, _ = select.select([self.process.stdout], [], [], deadline_s)
        if not ready:
            raise TimeoutError(f"no answer from the math-verify helper in {deadline_s:g} s")
        line = self.process.stdout.readline()
        if not line:
            raise EOFError("the math-verify helper ended")
        return line.strip()

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            for pipe in (self.process.stdin, self.process.stdout):
                with contextlib.suppress(BrokenPipeError):  # a request it did not read: no one to flush it to
                    pipe.close()
            self.process = None


_HELPER = _MathVerifyHelper()


def _serve_math_verify() -> None:
    """The helper process's loop: a JSON line [ref, pred_text, short_answer] in, its verdict's JSON line out."""
    import json
    import logging
    import time

    import math_verify  # noqa: F401 - imported before "ready": the caller's deadline is for the work

    logging.getLogger("math_verify").setLevel(logging.CRITICAL)  # its timeout messages: a 0 says it
    # Ended with the caller, though stuck in C code then (where math-verify's alarm is not handled, and the
    # caller, dead, kills nothing): each call may use DEADLINE_S of CPU time, past that the kernel's SIGXCPU ends
    # the process. Idle, the caller's end is EOF on stdin. (PR_SET_PDEATHSIG fires when the caller's *thread*
    # that started it ends, a worker thread's, not when the caller does.)
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))  # SIGXCPU: no core
    cpu_hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    # Answers go out on a private copy of fd 1, and fd 1 (print's, and C code's in math-verify's parsers) to stderr:
    # what they write is no answer line. Unbuffered: a line a write, nothing left to flush (or fail) at exit.
    answers = os.dup(1)
    os.dup2(2, 1)
    try:
        os.write(answers, b"ready\n")
        for line in sys.stdin:
            ref, pred_text, short_answer = json.loads(line)
            cpu_limit = math.ceil(time.process_time() + _MathVerifyHelper.DEADLINE_S)
            if cpu_hard == resource.RLIM_INFINITY or cpu_limit < cpu_hard:
                resource.setrlimit(resource.RLIMIT_CPU, (cpu_limit, cpu_hard))
            try:
                verdict = _math_verify_verdict(ref, pred_text, short_answer, _MATH_TIMEOUT_S)
            except Exception:  # noqa: BLE001 - as math_answer_reward: a wrong answer, not a dead helper
                verdict = 0.0
            os.write(answers, f"{json.dumps(verdict)}\n".encode())
    except BrokenPipeError:  # the caller ended during a call: no one to answer
        pass


# ------------------------------------------------------------------------------------------ format

_FINAL_LINE_RE = re.compile(r"####[ \t]*[^\s#][^\n#]{0,99}")


def _boxed_content(line: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in `line` with balanced braces, else None."""
    start = line.rfind("\\boxed{")
    if start < 0:
        return None
    i, depth = start + len("\\boxed{"), 1
    while i < len(line):
        ch = line[i]
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                content = line[start + len("\\boxed{"): i]
                rest = line[i + 1:].strip()
                # only closing math, Markdown bold and punctuation may follow the box
                if content.strip() and re.fullmatch(r"[$.*\\\])\s]*", rest):
                    return content
                return None
        i += 1
    return None


_CLOSING_LINE_RE = re.compile(r"\s*(?:\\\]|\$\$|\$|\\\))\s*")  # a display-math block's last line: \] or $$


def format_reward(completion_text: str) -> float:
    """1.0 when the completion ends with a well-formed final answer: a last line ``#### <answer>`` (non-empty,
    one line, at most 100 characters) or a last line holding a closed ``\\boxed{<answer>}`` (Markdown bold and
    closing math after it allowed, and a display block's closing ``\\]`` or ``$$`` on a line of its own after
    it, as Qwen writes it); else 0.0."""
    if not isinstance(completion_text, str):
        return 0.0
    lines = completion_text.rstrip().split("\n")
    while len(lines) > 1 and _CLOSING_LINE_RE.fullmatch(lines[-1]):
        lines.pop()
    last = lines[-1].strip()
    if not last:
        return 0.0
    if _FINAL_LINE_RE.fullmatch(last):
        return 1.0
    return 1.0 if _boxed_content(last) is not None else 0.0


# ------------------------------------------------------------------------------------------ user rewards

BUILTIN_REWARDS = {
    "exact_answer": exact_answer_reward,
    "math_answer": math_answer_reward,
    "format": lambda completion_text, answer=None: format_reward(completion_text),
}


def load_reward_fn(path: str):
    """Resolve a reward function: a built-in name (``exact_answer``, ``math_answer``, ``format``),
    ``"package.module:function"`` (imported), or ``"path/to/file.py:function"`` (loaded from the file).
    ``function`` may be dotted (``module:obj.method``). Raises UserError with a one-line message naming
    `path` when it cannot be imported, has no such attribute, or is not callable."""
    if not isinstance(path, str) or not path.strip():
        raise UserError(f"reward function {path!r}: expected 'module:function' or one of {sorted(BUILTIN_REWARDS)}")
    path = path.strip()
    if path in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[path]
    module_name, sep, attr = path.rpartition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"reward function {path!r}: expected 'module:function' "
                        f"(e.g. 'my_rewards:score') or one of {sorted(BUILTIN_REWARDS)}")
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            if not os.path.isfile(module_name):
                raise UserError(f"reward function {path!r}: no such file {module_name!r}")
            name = "_rpo_user_reward_" + re.sub(r"\W", "_", os.path.abspath(module_name))
            spec = importlib.util.spec_from_file_location(name, module_name)
            if spec is None or spec.loader is None:
                raise UserError(f"reward function {path!r}: cannot load {module_name!r} as a Python file")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            run_beside(spec, module, os.path.dirname(os.path.abspath(module_name)))
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except SystemExit as e:  # sys.exit() or argparse at a script's top level: it would end the command, code 0 too
        raise UserError(f"reward function {path!r}: cannot import {module_name!r} (SystemExit with code {e.code!r} "
                        f"while importing it: does it run a script's code outside `if __name__ == \"__main__\":`?)"
                        ) from None
    except Exception as e:  # noqa: BLE001 - ImportError, or anything the module raises while importing
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"reward function {path!r}: cannot import {module_name!r} ({type(e).__name__}: {msg})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"reward function {path!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(f"reward function {path!r}: {attr!r} is a {type(obj).__name__}, not a callable")
    if obj in BUILTIN_REWARDS.values():
        return obj  # ours are checked by tests
    return TRLStyleReward(obj, path) if takes_completions(obj) else checked_reward(obj, path)


def run_beside(spec, module, directory: str) -> None:
    """Run a reward file's code as Python runs a script's, its directory first on sys.path, so that it imports
    the modules beside it (`from helpers import x`). Then sys.path is as it was, and the modules it imported from
    there leave sys.modules (the reward module holds them): another file's own helpers.py, loaded later in this
    process, is imported anew, not taken for this one's."""
    before = set(sys.modules)
    sys.path.insert(0, directory)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(directory)
        beside = [name for name in set(sys.modules) - before if _found_in(name, directory)]
        for name in beside:
            del sys.modules[name]


def _found_in(name: str, directory: str) -> bool:
    """Whether module `name` was imported from `directory` itself (directory/name.py, or a package
    directory/name/ and its submodules), not from deeper down (a virtual environment's site-packages there)."""
    top = sys.modules.get(name.partition(".")[0])
    file = getattr(top, "__file__", None)
    places = [os.path.dirname(file)] if isinstance(file, str) else []
    places += [os.path.dirname(p) for p in getattr(top, "__path__", None) or []]  # a package's: directory/name
    return directory in places


def takes_completions(fn) -> bool:
    """Whether `fn` follows TRL's reward convention (a `completions` parameter) rather than ours."""
    try:
        return "completions" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a callable without a signature (some builtins): ours
        return False


# What the user's reward code may raise, to be named in one line: SystemExit too (no Exception), which went past
# and ended the run with sys.exit's code, 0 for a bare sys.exit(), with no message. A KeyboardInterrupt stops it.
USER_CODE_ERRORS = (Exception, SystemExit)


def _raised(name: str, e: BaseException, context: str) -> UserError:
    frame = traceback.extract_tb(e.__traceback__)[-1]
    if isinstance(e, SystemExit):
        what = f"SystemExit with code {e.code!r} (a reward function returns its scores; sys.exit() would end the run)"
    else:
        what = f"{type(e).__name__}: {' '.join(str(e).split()) or '(no message)'}"
    return UserError(f"reward function {name!r} raised {what} ({frame.filename}:{frame.lineno}; {context})")


def _finite(value) -> float:
    try:
        return float(value) if not isinstance(value, (str, bytes)) else math.nan
    except (TypeError, ValueError):
        return math.nan


_ASYNC_LOOP: tuple[int, asyncio.AbstractEventLoop] | None = None  # (the process that started it, the loop)
_ASYNC_LOCK = threading.Lock()


def await_together(awaitables: list) -> list:
    """Each of `awaitables`' result, or the exception it raised, in order, awaited together on an event loop
    that lives as long as the process (on a daemon thread), as TRL awaits async reward functions: a client
    that a function's earlier call made (an httpx.AsyncClient, say) stays bound to a running loop."""
    global _ASYNC_LOOP
    with _ASYNC_LOCK:
        if _ASYNC_LOOP is None or _ASYNC_LOOP[0] != os.getpid():  # a forked child has the loop but not its thread
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="rpo_engine-async-rewards", daemon=True).start()
            _ASYNC_LOOP = (os.getpid(), loop)
        loop = _ASYNC_LOOP[1]

    async def caught(awaitable):
        try:
            return await awaitable
        # a KeyboardInterrupt / SystemExit raised out of a task ends the loop's thread for good (this call and every
        # later one would wait forever): returned, for the caller to raise
        except BaseException as e:  # noqa: BLE001
            return e

    async def together():
        return await asyncio.gather(*map(caught, awaitables))

    return asyncio.run_coroutine_threadsafe(together(), loop).result()


class RewardLog:
    """What TRL-style reward functions report besides their scores, through the keyword arguments TRL gives
    them: `log_metric(name, value)`, a scalar (`metrics` keeps every value, the trainer logs their mean), and
    `log_extra(column, values)`, a column of the completions table with one value per completion of the call
    (`columns`: group index among the scored groups -> column -> values)."""

    def __init__(self):
        self.metrics: dict[str, list[float]] = {}
        self.columns: dict[int, dict[str, list]] = {}

    def add_metric(self, function: str, name, value) -> None:
        if not isinstance(name, str) or not name:
            raise UserError(f"reward function {function!r} called log_metric with the name {name!r}, expected a "
                            f"non-empty string")
        number = _finite(value)
        if not math.isfinite(number):
            raise UserError(f"reward function {function!r} logged {value!r} ({type(value).__name__}) as metric "
                            f"{name!r}, expected a finite number")
        self.metrics.setdefault(name, []).append(number)

    def add_column(self, function: str, sizes: list[int], column, values) -> None:
        """A call's column, over the completions of groups of `sizes`: kept group by group."""
        if not isinstance(column, str) or not column:
            raise UserError(f"reward function {function!r} called log_extra with the column {column!r}, expected "
                            f"a non-empty string")
        values = values.tolist() if hasattr(values, "tolist") else values
        count = sum(sizes)
        if not isinstance(values, (list, tuple)) or len(values) != count:
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else repr(values)
            raise UserError(f"reward function {function!r} logged {got} as column {column!r} for {count} "
                            f"completions, expected a list of one value per completion")
        if any(column in self.columns.get(j, {}) for j in range(len(sizes))):  # neither would show
            raise UserError(f"reward function {function!r} logged column {column!r} twice for the same "
                            f"completions (two reward functions using one column name?)")
        for j, part in enumerate(_split([_plain(v) for v in values], sizes)):
            self.columns.setdefault(j, {})[column] = part

    @staticmethod
    def metric_means(logs: list[dict[str, list[float]]], prefix: str = "") -> dict[str, float]:
        """The mean of each metric over `logs` (RewardLog.metrics of several ranks or calls), names prefixed."""
        merged: dict[str, list[float]] = {}
        for log in logs:
            for name, values in log.items():
                merged.setdefault(name, []).extend(values)
        return {prefix + name: sum(values) / len(values) for name, values in merged.items()}


def _plain(value):
    """A logged value as JSON can write it: a numpy or torch scalar as its number, anything else not JSON's as
    its str (TRL's table takes any object; completions.jsonl cannot)."""
    if hasattr(value, "tolist") and hasattr(value, "ndim"):  # a numpy / torch scalar or array
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # json.dumps would write NaN / Infinity, which is not JSON
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return str(value)


def default_trainer_state():
    """The trainer_state a TRL-style function gets outside a training run (the eval command, an embedding
    caller's score_completions): transformers' TrainerState before any step."""
    from transformers import TrainerState

    return TrainerState()


class TRLStyleReward:
    """A reward function written for TRL's GRPOTrainer, called the way TRL calls it: keyword arguments
    `prompts` (each row's prompt: a string, or its messages), `completions` (strings; for conversational
    prompts TRL's `[{"role": "assistant", "content": text}]`), `completion_ids`, and each of the rows' other
    columns as a list (`answer`, `id`, ...); one finite number per completion back. It is called once for a
    whole batch (every group the trainer scores at once), as TRL calls it once per batch. TRL's `None` ("does
    not apply") from a second or later function is NaN here (`none_as_nan`): the trainer adds it as 0 (TRL's
    nansum over functions) and leaves it out of the function's mean score (TRL's nanmean); from the accuracy,
    which must say right or wrong, it is an error.

    Also as in TRL: an async function (or one returning an awaitable) is awaited, together with the other
    async functions of the batch (`score_functions`), so judges or sandboxes behind network calls serve them
    at once; and a function whose signature takes them (by name or through **kwargs) gets `trainer_state`
    (transformers' TrainerState: global_step, the steps done before this one, max_steps, epoch, ...),
    `log_metric(name, value)` and `log_extra(column, values)` (`RewardLog`)."""

    TRAINER_KWARGS = ("trainer_state", "log_metric", "log_extra")

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name
        functools.update_wrapper(self, fn, updated=())  # not fn's __dict__: an object's `fn` or `name` replaced ours
        try:
            parameters = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            parameters = {}
        any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
        self.trainer_kwargs = [k for k in self.TRAINER_KWARGS if any_keyword or k in parameters]

    def score(self, texts: list[str], rows: list[dict], completion_ids: list[list[int]] | None = None,
              none_as_nan: bool = False, trainer_state=None, log: RewardLog | None = None) -> list[float]:
        """One score per completion, completion i answering `rows[i]`: one call (awaited, for an async function)."""
        return _score_trl([self], [none_as_nan], texts, rows, completion_ids, [len(texts)], trainer_state, log)[0]

    def call(self, texts: list[str], rows: list[dict], completion_ids, trainer_state, log: RewardLog,
             sizes: list[int]):
        """The function called on `texts` (the completions of groups of `sizes`, in order): its return value,
        an awaitable for an async function."""
        conversational = not isinstance(rows[0]["prompt"], str)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else list(texts)
        # a column of one of the call's own names is left out, as TRL leaves out completion_ids
        columns = {key: [row.get(key) for row in rows] for key in rows[0]
                   if key not in ("prompt", "completion", "completion_ids", *self.trainer_kwargs)}
        # copies (strings are shared, not copied): a function editing a conversation or a list column in place
        # edited the dataset's rows, for every later call and for the prompt digest a checkpoint stores
        prompts, columns = copy.deepcopy(([row["prompt"] for row in rows], columns))
        if completion_ids is not None:  # the caller's: the next function and the overlong penalty read them
            completion_ids = [list(ids) for ids in completion_ids]
        extras = {"trainer_state": trainer_state,
                  "log_metric": lambda name, value: log.add_metric(self.name, name, value),
                  "log_extra": lambda column, values: log.add_column(self.name, sizes, column, values)}
        try:
            return self.fn(prompts=prompts, completions=completions,
                           completion_ids=completion_ids, **columns, **{k: extras[k] for k in self.trainer_kwargs})
        except UserError:  # a log_metric / log_extra mistake, already named
            raise
        except USER_CODE_ERRORS as e:  # the user's code; reported, not hidden
            raise _raised(self.name, e, f"called TRL's way on {len(texts)} completions") from None

    def checked(self, values, texts: list[str], rows: list[dict], none_as_nan: bool) -> list[float]:
        """What the function returned for `texts` as finite numbers, or a one-line error naming it."""
        values = values.tolist() if hasattr(values, "tolist") else values
        if not isinstance(values, (list, tuple)) or len(values) != len(texts):  # a dict's keys are no scores
            got = f"{len(values)} values" if isinstance(values, (list, tuple)) else \
                f"a {type(values).__name__}" if hasattr(values, "__len__") else repr(values)
            raise UserError(f"reward function {self.name!r} returned {got} for {len(texts)} completions, "
                            f"expected a list of one number per completion (TRL's convention)")
        numbers = [_finite(v) for v in values]
        for value, number, row in zip(values, numbers, rows):
            if not math.isfinite(number) and not (value is None and none_as_nan):
                raise UserError(f"reward function {self.name!r} returned {value!r} ({type(value).__name__}) for a "
                                f"completion, expected a finite number (reference answer {row['answer']!r})")
        return numbers


def _score_trl(functions: list[TRLStyleReward], none_as_nan: list[bool], texts: list[str], rows: list[dict],
               completion_ids, sizes: list[int], trainer_state, log: RewardLog | None) -> list[list[float]]:
    """Each TRL-style function's scores of `texts` (completion i answering `rows[i]`; groups of `sizes`), each
    called once, the async ones awaited together."""
    if not texts:
        return [[] for _ in functions]
    log = log if log is not None else RewardLog()
    if trainer_state is None and any("trainer_state" in fn.trainer_kwargs for fn in functions):
        trainer_state = default_trainer_state()
    returned = []
    try:
        for fn in functions:
            returned.append(fn.call(texts, rows, completion_ids, trainer_state, log, sizes))
    except BaseException:
        for value in returned:  # never to be awaited: closed, so Python does not warn of each
            if inspect.iscoroutine(value):
                value.close()
        raise
    waiting = [i for i, value in enumerate(returned) if inspect.isawaitable(value)]
    if waiting:
        for i, value in zip(waiting, await_together([returned[i] for i in waiting])):
            if isinstance(value, BaseException):  # a log_metric / log_extra mistake is already named
                if isinstance(value, UserError) or not isinstance(value, USER_CODE_ERRORS):
                    raise value
                raise _raised(functions[i].name, value, f"awaited TRL's way on {len(texts)} completions") from None
            returned[i] = value
    return [fn.checked(value, texts, rows, nan) for fn, value, nan in zip(functions, returned, none_as_nan)]


def score_completions(reward_fn, texts: list[str], rows: list[dict],
                      completion_ids: list[list[int]] | None = None, none_as_nan: bool = False,
                      trainer_state=None, log: RewardLog | None = None) -> list[float]:
    """Rewards of `texts`, completion i answering `rows[i]`: a TRLStyleReward, a RewardModel or a PooledReward
    once for all, any other reward function (ours: `fn(completion_text, answer)`) once per completion.
    `none_as_nan`: a TRL-style function's None is NaN (an extra reward that does not apply to a completion).
    `trainer_state` and `log`: what a TRL-style function is given as trainer_state, and where its log_metric
    and log_extra calls go (TRLStyleReward)."""
    from rpo_engine.rewards.model import RewardModel  # here: answers.py itself imports no torch
    from rpo_engine.rewards.pool import PooledReward

    if isinstance(reward_fn, TRLStyleReward):
        return reward_fn.score(texts, rows, completion_ids, none_as_nan, trainer_state, log)
    if isinstance(reward_fn, (RewardModel, PooledReward)):  # one call for all
        return reward_fn.score(texts, rows, completion_ids, none_as_nan)
    return [float(reward_fn(text, row["answer"])) for text, row in zip(texts, rows)]


def score_functions(functions: list, texts: list[list[str]], rows: list[dict],
                    completion_ids: list[list[list[int]]] | None = None, none_as_nan: list[bool] | None = None,
                    trainer_state=None, log: RewardLog | None = None) -> list[list[list[float]]]:
    """Each function's rewards ([function][group][sample]) of several groups of completions, group j's
    `texts[j]` answering `rows[j]`. The TRL-style functions are each called once for every group's
    completions, as TRL calls them once per batch, and the async ones among them are awaited together
    (group j's log_extra columns land in `log.columns[j]`); a PooledReward scores every group in one call,
    spread over its workers, a reward model in batches of its batch size over them; ours go completion by
    completion (`score_completions`).
    `none_as_nan`: per function, whether its None is NaN; by default the first function's is an error (it
    decides right answers) and the others' NaN (TRL's "does not apply")."""
    from rpo_engine.rewards.model import RewardModel  # here: answers.py itself imports no torch
    from rpo_engine.rewards.pool import PooledReward

    none_as_nan = none_as_nan if none_as_nan is not None else [i > 0 for i in range(len(functions))]
    ids = completion_ids if completion_ids is not None else [None] * len(texts)
    sizes = [len(group) for group in texts]
    flat_texts, flat_rows = [t for g in texts for t in g], [row for row, g in zip(rows, texts) for _ in g]
    trl = [i for i, fn in enumerate(functions) if isinstance(fn, TRLStyleReward)]
    scores: dict[int, list[list[float]]] = {}
    if trl:
        flat_ids = None if completion_ids is None else [i for group in ids for i in group]
        flat = _score_trl([functions[i] for i in trl], [none_as_nan[i] for i in trl], flat_texts, flat_rows,
                          flat_ids, sizes, trainer_state, log)
        scores.update({i: _split(values, sizes) for i, values in zip(trl, flat)})
    for i, fn in enumerate(functions):
        if i in scores:
            continue
        if isinstance(fn, (PooledReward, RewardModel)):  # all at once: over the pool's workers, in full batches
            scores[i] = _split(fn.score(flat_texts, flat_rows), sizes)
        else:
            scores[i] = [score_completions(fn, group, [row] * len(group), group_ids, none_as_nan[i])
                         for group, row, group_ids in zip(texts, rows, ids)]
    return [scores[i] for i in range(len(functions))]


def score_groups(reward_fn, texts: list[list[str]], rows: list[dict],
                 completion_ids: list[list[list[int]]] | None = None,
                 trainer_state=None, log: RewardLog | None = None) -> list[list[float]]:
    """Rewards of several groups of completions, group j's `texts[j]` answering `rows[j]`, by one function
    (`score_functions`: a TRL-style function or a PooledReward scores every group in one call); its None is
    an error, as the first function's is."""
    return score_functions([reward_fn], texts, rows, completion_ids, [False], trainer_state, log)[0]


def _split(values: list, sizes: list[int]) -> list[list]:
    """`values` cut into consecutive runs of `sizes`."""
    it = iter(values)
    return [[next(it) for _ in range(n)] for n in sizes]


def checked_reward(fn, name: str):
    """`fn` made to fail in one line that names it: when it raises (with the file and line the exception
    came from) or returns something that is not a finite number (a str, None, NaN). A NaN would reach the
    group's advantages and skip the update; a str would fail deep inside the trainer."""
    @functools.wraps(fn)
    def reward(completion_text: str, answer: str) -> float:
        try:
            value = fn(completion_text, answer)
        except USER_CODE_ERRORS as e:  # the user's code; reported, not hidden
            raise _raised(name, e, f"reference answer {answer!r}") from None
        number = _finite(value)
        if not math.isfinite(number):
            raise UserError(f"reward function {name!r} returned {value!r} ({type(value).__name__}), "
                            f"expected a finite number (reference answer {answer!r})")
        return number

    return reward
