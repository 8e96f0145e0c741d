"""The built-in reasoning task: multi-step arithmetic with a worked, checkable trace.

Each problem is an addition or a multiplication of non-negative integers. The prompt is plain text for a
base model (no chat template) and the solution is a trace in which every step is explicit and every line
has a fixed shape, so that a tiny model can learn it by supervised fine-tuning and an RL run can then
improve it. The final line is always ``#### <integer>``.

Addition (operands padded with zeros to ``add_max_digits + 1`` digits, columns right to left; each column
line is ``<column>: <digit a>+<digit b>+<carry in>=<two-digit sum> w<written digit> c<carry out>``)::

    Q: 4821+937
    A: 004821+000937
    0: 1+7+0=08 w8 c0
    1: 2+3+0=05 w5 c0
    2: 8+9+0=17 w7 c1
    3: 4+0+1=05 w5 c0
    4: 0+0+0=00 w0 c0
    5: 0+0+0=00 w0 c0
    = 005758
    #### 5758

Multiplication (``a`` padded to ``mul_max_digits_a`` digits and ``b`` to ``mul_max_digits_b``; one
partial product per digit of ``b``, right to left, each computed digit by digit with
``<column>: <digit a>*<digit b>+<carry in>=<two-digit value> w<written digit> c<carry out>``, then the
partial products, shifted and padded to the result width, are added column by column)::

    Q: 48*37
    A: 48*37
    48*7:
    0: 8*7+0=56 w6 c5
    1: 4*7+5=33 w3 c3
    = 336
    48*3:
    0: 8*3+0=24 w4 c2
    1: 4*3+2=14 w4 c1
    = 144
    0336+1440:
    0: 6+0+0=06 w6 c0
    1: 3+4+0=07 w7 c0
    2: 3+4+0=07 w7 c0
    3: 0+1+0=01 w1 c0
    = 1776
    #### 1776

(The prompt is ``"Q: 48*37\\nA:"`` and the solution is everything after ``A:``, starting with a space.)
Because the widths depend only on the config, every addition (and every multiplication) of a config has
the same template: only the digits change. That regularity is what makes the task learnable quickly.

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
_MAX_DIGITS = 9  # keeps traces within a few hundred tokens and sums within two digits


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


def _digits_lsb(n: int, width: int) -> list[int]:
    s = str(n).zfill(width)
    assert len(s) == width, (n, width)
    return [int(ch) for ch in reversed(s)]


def _column_add(numbers: list[int], width: int) -> tuple[list[str], int]:
    """Column addition of `numbers` (each at most `width` digits, sum too): one line per column."""
    cols = [_digits_lsb(n, width) for n in numbers]
    lines, carry, written = [], 0, []
    for k in range(width):
        ds = [c[k] for c in cols]
        s = sum(ds) + carry
        assert s < 100
        w, cout = s % 10, s // 10
        lines.append(f"{k}: " + "+".join(str(d) for d in ds) + f"+{carry}={s:02d} w{w} c{cout}")
        written.append(w)
        carry = cout
    assert carry == 0
    total = sum(numbers)
    result = "".join(str(w) for w in reversed(written))
    assert int(result) == total and len(result) == width
    lines.append(f"= {result}")
    return lines, total


def _addition_trace(a: int, b: int, cfg: ArithmeticConfig) -> tuple[list[str], int]:
    width = cfg.add_max_digits + 1
    lines = [f"{a:0{width}d}+{b:0{width}d}"]
    col_lines, total = _column_add([a, b], width)
    return lines + col_lines, total


def _multiplication_trace(a: int, b: int, cfg: ArithmeticConfig) -> tuple[list[str], int]:
    wa, wb = cfg.mul_max_digits_a, cfg.mul_max_digits_b
    a_s, b_s = f"{a:0{wa}d}", f"{b:0{wb}d}"
    lines = [f"{a_s}*{b_s}"]
    a_lsb = _digits_lsb(a, wa)
    partials = []
    for j, bd in enumerate(_digits_lsb(b, wb)):
        lines.append(f"{a_s}*{bd}:")
        carry, written = 0, []
        for k, ad in enumerate(a_lsb):
            v = ad * bd + carry
            w, cout = v % 10, v // 10
            lines.append(f"{k}: {ad}*{bd}+{carry}={v:02d} w{w} c{cout}")
            written.append(w)
            carry = cout
        p = f"{carry}" + "".join(str(w) for w in reversed(written))
        assert int(p) == a * bd
        lines.append(f"= {p}")
        partials.append(int(p) * 10 ** j)
    width = wa + wb
    if wb == 1:
        total = partials[0]
    else:
        lines.append("+".join(f"{p:0{width}d}" for p in partials) + ":")
        col_lines, total = _column_add(partials, width)
        lines += col_lines
    assert total == a * b
    return lines, total


def solve_trace(a: int, op: str, b: int, config: ArithmeticConfig | None = None) -> str:
    """The solution text for `a op b`: ``" <trace lines>\\n#### <result>"`` (it follows the prompt's ``A:``)."""
    cfg = config or ArithmeticConfig()
    if op == "+":
        if max(len(str(a)), len(str(b))) > cfg.add_max_digits:
            raise ValueError(f"{a}+{b} has more digits than add_max_digits={cfg.add_max_digits}")
        lines, total = _addition_trace(a, b, cfg)
    elif op == "*":
        if len(str(a)) > cfg.mul_max_digits_a or len(str(b)) > cfg.mul_max_digits_b:
            raise ValueError(f"{a}*{b} has more digits than the config allows")
        lines, total = _multiplication_trace(a, b, cfg)
    else:
        raise ValueError(f"unknown op {op!r}")
    return " " + "\n".join(lines) + f"\n#### {total}"


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


_ADD_LINE = re.compile(r"^(\d+): (\d(?:\+\d)+)=(\d\d) w(\d) c(\d)$")
_MUL_LINE = re.compile(r"^(\d+): (\d)\*(\d)\+(\d)=(\d\d) w(\d) c(\d)$")


def check_trace(solution: str) -> list[str]:
    """Arithmetic check of every step line of a trace: returns the problems found (empty = all correct).

    Checks each column line (sum/product, written digit, carry out), that carries chain from one column to
    the next, and that each ``= <digits>`` line is the written digits read back (final carry first).
    Used by the tests; also handy to grade the reasoning of a model's completion, not only its answer.
    """
    errors: list[str] = []
    carry, written, last_carry, is_mul, last_value = 0, [], 0, False, None
    for i, line in enumerate(solution.strip("\n").split("\n")):
        line = line.strip()
        m = _ADD_LINE.match(line)
        mm = _MUL_LINE.match(line)
        if m or mm:
            if mm:
                k, x, y, cin, v, w, c = mm.groups()
                expect = int(x) * int(y) + int(cin)
            else:
                k, terms, v, w, c = m.groups()
                ds = [int(t) for t in terms.split("+")]
                cin, expect = str(ds[-1]), sum(ds)
            if int(k) == 0:
                carry, written = 0, []
            if int(cin) != carry:
                errors.append(f"line {i + 1}: carry in {cin}, expected {carry}: {line!r}")
            if int(v) != expect or int(w) != expect % 10 or int(c) != expect // 10:
                errors.append(f"line {i + 1}: wrong arithmetic: {line!r}")
            carry, last_carry, is_mul = int(c), int(c), bool(mm)
            written.append(w)
        elif line.startswith("= "):
            got = line[2:]
            want = "".join(reversed(written))
            if is_mul:  # a partial product ends with its final carry
                want = str(last_carry) + want
            if got != want:
                errors.append(f"line {i + 1}: {got!r} is not the written digits {want!r}")
            written, last_value = [], got
        elif line.startswith("####"):
            if last_value is None or extract_answer(line) != str(int(last_value)):
                errors.append(f"line {i + 1}: final answer {line!r} does not match the last result {last_value!r}")
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
