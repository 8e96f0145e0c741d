"""The built-in reasoning task: multi-step arithmetic with a worked, checkable trace.

Each problem is an addition or a multiplication of non-negative integers. The prompt is plain text for a
base model (no chat template); the solution works digit by digit, right to left, one step per line, and
ends with ``#### <integer>``. Every step line has the same shape::

    <x left><op><y left>: <dx><op><dy>+<carry in>=<two-digit value> w<written digit> c<carry out> r<result so far>

It shows what is left of the operands (each step drops their last digit; an operand that has run out is
empty and reads as 0), works on their last digits, and puts the written digit in front of the result so
far. So every token of a step is either a short copy from the line above or a one-digit fact: nothing
needs counting or reversing, which is what lets a tiny model learn it in a few minutes of SFT.

Addition (prompt ``"Q: 4821+937\nA:"``, solution = the rest, starting with a space)::

    Q: 4821+937
    A: 4821+937: 1+7+0=08 w8 c0 r8
    482+93: 2+3+0=05 w5 c0 r58
    48+9: 8+9+0=17 w7 c1 r758
    4+: 4+0+1=05 w5 c0 r5758
    #### 5758

Multiplication: one chain per digit of the multiplier, right to left. Chain j multiplies ``a`` shifted by
j places (``a`` followed by j zeros) by the last digit of what is left of the multiplier, which its lines
show unchanged; then the partial products are added with the same steps::

    Q: 48*37
    A: 48*37: 8*7+0=56 w6 c5 r6
    4*37: 4*7+5=33 w3 c3 r36
    *37: 0*7+3=03 w3 c0 r336
    480*3: 0*3+0=00 w0 c0 r0
    48*3: 8*3+0=24 w4 c2 r40
    4*3: 4*3+2=14 w4 c1 r440
    *3: 0*3+1=01 w1 c0 r1440
    336+1440: 6+0+0=06 w6 c0 r6
    33+144: 3+4+0=07 w7 c0 r76
    3+14: 3+4+0=07 w7 c0 r776
    +1: 0+1+0=01 w1 c0 r1776
    #### 1776

(A multiplier with three or more digits adds its partial products one at a time, the running total first.)

Train and eval never share a problem: a problem's split is fixed by a hash of its canonical form (the op
and its operands, sorted, since both ops commute), independent of any seed, so an eval set drawn with any
seed is disjoint from a train set drawn with any seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import asdict, dataclass

from rpo_engine.errors import UserError

__all__ = [
    "ArithmeticConfig",
    "make_problem",
    "make_split",
    "problem_split",
    "solve_trace",
    "export_jsonl",
    "extract_answer",
    "check_trace",
    "format_prompt",
]

# One problem in EVAL_BUCKETS (by hash) belongs to the held-out eval split; the rest are train problems.
EVAL_BUCKETS = 8
_MAX_DIGITS = 9  # keeps traces within a few hundred tokens


@dataclass(frozen=True)
class ArithmeticConfig:
    """Difficulty of the built-in task.

    Each operand's digit count is drawn uniformly from its [min, max] range, then its value uniformly among
    the numbers with that many digits. ``mul_fraction`` of the problems are multiplications.
    The default spans easy (2-digit addition) to hard (5-digit addition, 2-digit x 2-digit multiplication).
    """

    add_min_digits: int = 2
    add_max_digits: int = 5
    mul_min_digits_a: int = 2
    mul_max_digits_a: int = 2
    mul_min_digits_b: int = 1
    mul_max_digits_b: int = 2
    mul_fraction: float = 0.5

    def __post_init__(self):
        for lo_name, hi_name in (("add_min_digits", "add_max_digits"),
                                 ("mul_min_digits_a", "mul_max_digits_a"),
                                 ("mul_min_digits_b", "mul_max_digits_b")):
            lo, hi = getattr(self, lo_name), getattr(self, hi_name)
            for name, v in ((lo_name, lo), (hi_name, hi)):
                if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= _MAX_DIGITS:
                    raise UserError(f"ArithmeticConfig.{name}: expected an integer from 1 to {_MAX_DIGITS}, got {v!r}")
            if lo > hi:
                raise UserError(f"ArithmeticConfig.{lo_name}={lo} is greater than {hi_name}={hi}")
        f = self.mul_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 <= f <= 1.0:
            raise UserError(f"ArithmeticConfig.mul_fraction: expected a number from 0 to 1, got {f!r}")

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------- traces

def format_prompt(a: int, op: str, b: int) -> str:
    return f"Q: {a}{op}{b}\nA:"


def _chain(op: str, x: str, y: str) -> tuple[list[str], str]:
    """Digit-by-digit ``x op y``, right to left. op "+": the sum; op "*": `x` times the last digit of `y`
    (`y` is what is left of the multiplier and stays the same along the chain).

    Each line shows what is left of the operands, then works on their last digits::

        <x left><op><y left>: <dx><op><dy>+<carry in>=<two-digit value> w<written digit> c<carry out> r<result so far>

    An operand that has run out is empty and reads as 0; the written digit is put in front of the previous
    result; the chain goes on while an operand has digits left or the carry is not 0. Returns the lines and
    the result (a string of digits, read from the last ``r``).
    """
    lines, carry, result = [], 0, ""
    while x or (y and op == "+") or carry:
        dx = int(x[-1]) if x else 0
        dy = int(y[-1]) if y else 0
        v = dx + dy + carry if op == "+" else dx * dy + carry
        w, cout = v % 10, v // 10
        result = f"{w}{result}"
        lines.append(f"{x}{op}{y}: {dx}{op}{dy}+{carry}={v:02d} w{w} c{cout} r{result}")
        carry = cout
        x = x[:-1]
        if op == "+":
            y = y[:-1]
    return lines, result


def _addition_trace(a: int, b: int) -> tuple[list[str], str]:
    return _chain("+", str(a), str(b))


def _multiplication_trace(a: int, b: int) -> tuple[list[str], str]:
    lines, partials = [], []
    a_s, b_s = str(a), str(b)
    for j in range(len(b_s)):
        a_shift, b_left = a_s + "0" * j, b_s[: len(b_s) - j]
        block, p = _chain("*", a_shift, b_left)
        lines += block
        partials.append(p)
    total = partials[0]
    for p in partials[1:]:
        block, total = _chain("+", total, p)
        lines += block
    return lines, total


def solve_trace(a: int, op: str, b: int, config: ArithmeticConfig | None = None) -> str:
    """The solution text for `a op b` (non-negative integers): ``" <step lines>\\n#### <result>"``, which follows
    the prompt's ``A:``. (`config` is accepted for symmetry; the trace does not depend on it.)"""
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, int) or not isinstance(b, int) or a < 0 or b < 0:
        raise ValueError(f"operands must be non-negative integers, got {a!r} and {b!r}")
    if op == "+":
        lines, result = _addition_trace(a, b)
        want = a + b
    elif op == "*":
        lines, result = _multiplication_trace(a, b)
        want = a * b
    else:
        raise ValueError(f"unknown op {op!r}")
    assert int(result or "0") == want, (a, op, b, result)
    return " " + "\n".join(lines) + f"\n#### {want}"


# ----------------------------------------------------------------------------------------------- answers

_ANSWER_RE = re.compile(r"####[ \t]*([^\n]*)")


def extract_answer(text: str) -> str | None:
    """The final answer: what follows the last ``####`` on its line, stripped (None if there is no ``####``
    or nothing follows it). E.g. ``extract_answer(" ...\\n#### 178377") == "178377"``."""
    if not isinstance(text, str):
        return None
    matches = _ANSWER_RE.findall(text)
    if not matches:
        return None
    ans = matches[-1].strip()
    return ans or None


_STEP_LINE = re.compile(r"^(\d*)([+*])(\d*): (\d)([+*])(\d)\+(\d)=(\d\d) w(\d) c(\d) r(\d+)$")


def check_trace(solution: str) -> list[str]:
    """Check every step of a trace: returns the problems found (empty = all correct).

    For each step line: the digits worked on are the last digits of the operands shown (0 for an empty
    one); the value, written digit and carry out are right; the carry in is the previous step's carry out
    (0 at the start of a chain); the result is the written digit in front of the previous result; a chain
    goes on (operands shortened by their last digit) until nothing is left and the carry is 0; and the
    ``####`` line is the last result. Used by the tests; also handy to grade a model's reasoning, not only
    its answer.
    """
    errors: list[str] = []
    prev = None  # (x, op, y, carry out, result) of the previous step line, while its chain goes on
    last_result = None
    for i, raw in enumerate(solution.strip("\n").split("\n")):
        line, where = raw.strip(), f"line {i + 1}"
        m = _STEP_LINE.match(line)
        if not m:
            if prev is not None:
                errors.append(f"{where}: the chain above stopped before its operands and carry ran out")
                prev = None
            if line.startswith("####"):
                if last_result is None or extract_answer(line) != str(int(last_result)):
                    errors.append(f"{where}: final answer {line!r} is not the last result {last_result!r}")
            continue
        x, op, y, dx, op2, dy, cin, v, w, c, r = m.groups()
        if op2 != op or (op == "*" and not y):
            errors.append(f"{where}: malformed step {line!r}")
            prev = None
            continue
        if prev is not None:
            px, pop, py, pc, pr = prev
            want_x, want_y = px[:-1], (py[:-1] if pop == "+" else py)
            if (op, x, y) != (pop, want_x, want_y):
                errors.append(f"{where}: expected the operands {want_x}{pop}{want_y}, got {x}{op}{y}")
            want_cin, want_r_tail = pc, pr
        else:
            want_cin, want_r_tail = 0, ""
        if int(dx) != (int(x[-1]) if x else 0) or int(dy) != (int(y[-1]) if y else 0):
            errors.append(f"{where}: wrong digits taken from {x}{op}{y}: {line!r}")
        expect = int(dx) + int(dy) + int(cin) if op == "+" else int(dx) * int(dy) + int(cin)
        if int(cin) != want_cin:
            errors.append(f"{where}: carry in {cin}, expected {want_cin}: {line!r}")
        if int(v) != expect or int(w) != expect % 10 or int(c) != expect // 10:
            errors.append(f"{where}: wrong arithmetic: {line!r}")
        if r != w + want_r_tail:
            errors.append(f"{where}: result r{r} is not w{w} in front of {want_r_tail!r}")
        last_result = r
        left_x, left_y = x[:-1], (y[:-1] if op == "+" else "")  # a product chain ends with its x
        prev = (x, op, y, int(c), r) if (left_x or left_y or int(c)) else None
    if prev is not None:
        errors.append("end: the last chain stopped before its operands and carry ran out")
    return errors


# ----------------------------------------------------------------------------------------------- splits

def _canonical(op: str, a: int, b: int) -> str:
    x, y = sorted((a, b))  # both ops commute: 37+48 and 48+37 are the same problem for the split
    return f"{op}:{x}:{y}"


def problem_split(op: str, a: int, b: int) -> str:
    """"eval" or "train": fixed by a hash of the problem, whatever the seed or the config."""
    h = int.from_bytes(hashlib.sha256(_canonical(op, a, b).encode()).digest()[:8], "big")
    return "eval" if h % EVAL_BUCKETS == 0 else "train"


def _draw_number(rng: random.Random, lo_digits: int, hi_digits: int) -> int:
    d = rng.randint(lo_digits, hi_digits)
    return rng.randint(10 ** (d - 1), 10 ** d - 1)


def make_problem(rng: random.Random, config: ArithmeticConfig) -> tuple[int, str, int]:
    if rng.random() < config.mul_fraction:
        a = _draw_number(rng, config.mul_min_digits_a, config.mul_max_digits_a)
        b = _draw_number(rng, config.mul_min_digits_b, config.mul_max_digits_b)
        return a, "*", b
    a = _draw_number(rng, config.add_min_digits, config.add_max_digits)
    b = _draw_number(rng, config.add_min_digits, config.add_max_digits)
    return a, "+", b


def make_row(a: int, op: str, b: int, row_id: str, config: ArithmeticConfig | None = None) -> dict:
    return {"id": row_id, "prompt": format_prompt(a, op, b), "answer": str(a + b if op == "+" else a * b),
            "solution": solve_trace(a, op, b, config)}


def make_split(split: str, num_rows: int, seed: int = 0, config: ArithmeticConfig | None = None) -> list[dict]:
    """`num_rows` problems of `split` ("train" or "eval"), deterministic in (split, num_rows, seed, config).

    Rows are ``{"id", "prompt", "answer", "solution"}``; ids are ``"<split>-<index>"``. Only problems whose
    hash puts them in `split` are drawn (see `problem_split`), so train and eval never share a problem.
    Eval rows are distinct problems; train rows may repeat a problem (small configs have few of them).
    """
    if split not in ("train", "eval"):
        raise UserError(f"split: expected 'train' or 'eval', got {split!r}")
    if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
        raise UserError(f"num_rows: expected a non-negative integer, got {num_rows!r}")
    cfg = config or ArithmeticConfig()
    rng = random.Random(f"rpo_engine.arithmetic:{split}:{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    tries, max_tries = 0, 200 * num_rows + 10_000
    while len(rows) < num_rows:
        tries += 1
        if tries > max_tries:
            raise UserError(f"could not draw {num_rows} distinct {split} problems from this ArithmeticConfig "
                            f"(found {len(rows)}); ask for fewer rows or allow more digits")
        a, op, b = make_problem(rng, cfg)
        if problem_split(op, a, b) != split:
            continue
        if split == "eval":
            key = _canonical(op, a, b)
            if key in seen:
                continue
            seen.add(key)
        rows.append(make_row(a, op, b, f"{split}-{len(rows):06d}", cfg))
    return rows


def export_jsonl(rows: list[dict], path) -> str:
    """Write rows as JSON lines (written to a temporary name, then renamed). Returns the path."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path
