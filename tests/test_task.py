"""The built-in arithmetic task and its tokenizer."""
import dataclasses
import json
import random
import re
import subprocess
import sys

import pytest

from rpo_engine.data.arithmetic import (
    ArithmeticConfig, check_trace, export_jsonl, extract_answer, format_prompt, make_split, problem_split,
    solve_trace,
)
from rpo_engine.errors import UserError


@pytest.fixture(scope="module")
def tok():
    from rpo_engine.data.tokenizer import build_task_tokenizer

    return build_task_tokenizer()


def _problem(row):
    m = re.fullmatch(r"Q: (\d+)([+*])(\d+)\nA:", row["prompt"])
    assert m, row["prompt"]
    return int(m.group(1)), m.group(2), int(m.group(3))


# --------------------------------------------------------------------------------------------- format

def test_example_format():
    assert format_prompt(48, "*", 37) == "Q: 48*37\nA:"
    assert solve_trace(48, "*", 37) == (
        " 48*37: 8*7+0=56 w6 c5 r6\n4*37: 4*7+5=33 w3 c3 r36\n*37: 0*7+3=03 w3 c0 r336\n"
        "480*3: 0*3+0=00 w0 c0 r0\n48*3: 8*3+0=24 w4 c2 r40\n4*3: 4*3+2=14 w4 c1 r440\n*3: 0*3+1=01 w1 c0 r1440\n"
        "336+1440: 6+0+0=06 w6 c0 r6\n33+144: 3+4+0=07 w7 c0 r76\n3+14: 3+4+0=07 w7 c0 r776\n+1: 0+1+0=01 w1 c0 r1776\n"
        "#### 1776")
    assert solve_trace(4821, "+", 937) == (
        " 4821+937: 1+7+0=08 w8 c0 r8\n482+93: 2+3+0=05 w5 c0 r58\n48+9: 8+9+0=17 w7 c1 r758\n"
        "4+: 4+0+1=05 w5 c0 r5758\n#### 5758")
    assert solve_trace(95, "+", 7).endswith("\n9+: 9+0+1=10 w0 c1 r02\n+: 0+0+1=01 w1 c0 r102\n#### 102")
    assert solve_trace(0, "*", 0) == " 0*0: 0*0+0=00 w0 c0 r0\n#### 0"


def test_traces_are_correct_for_random_problems():
    rng = random.Random(0)
    n = 0
    for max_digits, max_b in ((5, 2), (9, 4)):
        for _ in range(300):
            op = rng.choice("+*")
            a = rng.randint(0, 10 ** rng.randint(1, max_digits) - 1)
            b = rng.randint(0, 10 ** rng.randint(1, max_digits if op == "+" else max_b) - 1)
            sol = solve_trace(a, op, b)
            want = a + b if op == "+" else a * b
            assert extract_answer(sol) == str(want), (a, op, b)
            assert check_trace(sol) == [], (a, op, b, check_trace(sol))
            n += 1
    assert n == 600


def test_split_rows_answers_and_traces():
    for split in ("train", "eval"):
        for row in make_split(split, 200, seed=3):
            assert set(row) == {"id", "prompt", "answer", "solution"}
            a, op, b = _problem(row)
            assert row["answer"] == str(a + b if op == "+" else a * b)
            assert extract_answer(row["solution"]) == row["answer"]
            assert row["solution"].startswith(f" {a}{op}{b}: ") and "####" not in row["prompt"]
            assert check_trace(row["solution"]) == []


def test_check_trace_catches_errors():
    add = solve_trace(4821, "+", 937)
    assert check_trace(add) == []
    bad = {
        "48+9: 8+9+0=17 w7 c1": "48+9: 8+9+0=16 w6 c1",      # wrong sum
        "4+: 4+0+1=05 w5 c0": "4+: 4+0+0=04 w4 c0",         # dropped carry
        "482+93: 2+3+0=05": "482+93: 8+3+0=11",             # wrong digit taken
        "r5758": "r5768",                                   # result not built from the written digits
        "#### 5758": "#### 5768",                           # wrong final answer
        "\n4+: 4+0+1=05 w5 c0 r5758": "",                   # chain stopped early
        "482+93:": "482+9:",                                # operands not shortened by one digit
    }
    for old, new in bad.items():
        assert old in add
        assert check_trace(add.replace(old, new)), (old, new)
    mul = solve_trace(48, "*", 37)
    assert check_trace(mul) == []
    bad = {
        "4*37: 4*7+5=33 w3 c3": "4*37: 4*7+5=32 w2 c3",    # wrong product
        "r1440": "r144",                                   # result not built from the written digits
        "4*37: 4*7": "4*37: 4*3",                           # multiplier digit is the last one
        "4*3: 4*3+2=14 w4 c1 r440": "4*3: 4*3+2=14 w4 c1 r440\n4*3: 4*3+2=14 w4 c1 r440",  # repeated step
    }
    for old, new in bad.items():
        assert old in mul
        assert check_trace(mul.replace(old, new)), (old, new)


def test_extract_answer():
    assert extract_answer("blah\n#### 178377") == "178377"
    assert extract_answer("#### 1\n#### 2 ") == "2"
    assert extract_answer("####-5") == "-5"
    assert extract_answer("no answer 42") is None
    assert extract_answer("#### \n") is None
    assert extract_answer(None) is None


# --------------------------------------------------------------------------------------------- splits

def test_make_split_is_deterministic():
    assert make_split("train", 100, seed=7) == make_split("train", 100, seed=7)
    assert make_split("eval", 50, seed=7) == make_split("eval", 50, seed=7)
    assert make_split("train", 100, seed=7) != make_split("train", 100, seed=8)
    # a longer split extends a shorter one (same stream)
    assert make_split("train", 150, seed=7)[:100] == make_split("train", 100, seed=7)


def test_train_and_eval_are_disjoint():
    def keys(rows):
        out = set()
        for r in rows:
            a, op, b = _problem(r)
            out.add((op, min(a, b), max(a, b)))  # commuted problems count as the same problem
        return out

    train = keys(make_split("train", 4000, seed=0)) | keys(make_split("train", 2000, seed=1))
    evals = make_split("eval", 500, seed=0) + make_split("eval", 500, seed=5)
    ev = keys(evals)
    assert train and ev and not (train & ev)
    # why: the split is a function of the problem alone
    assert all(problem_split(op, a, b) == "eval" for op, a, b in ev)
    assert all(problem_split(op, a, b) == "train" for op, a, b in train)
    assert problem_split("*", 48, 37) == problem_split("*", 37, 48)
    # eval rows of one draw are distinct problems; ids are unique
    one = make_split("eval", 500, seed=0)
    assert len(keys(one)) == 500 and len({r["id"] for r in one}) == 500


def test_small_config_eval_exhaustion_is_a_user_error():
    cfg = ArithmeticConfig(add_min_digits=1, add_max_digits=1, mul_fraction=0.0)  # 45 unordered problems
    with pytest.raises(UserError, match="distinct eval problems"):
        make_split("eval", 100, seed=0, config=cfg)


def test_config_validation():
    ArithmeticConfig(add_min_digits=3, add_max_digits=3, mul_fraction=0)
    for bad in (dict(add_min_digits=0), dict(add_max_digits=10), dict(add_min_digits=4, add_max_digits=3),
                dict(mul_min_digits_b=3), dict(mul_fraction=1.5), dict(mul_fraction="x"), dict(add_max_digits=2.0)):
        with pytest.raises(UserError, match="ArithmeticConfig"):
            ArithmeticConfig(**bad)
    with pytest.raises(UserError):
        make_split("test", 3)
    cfg = ArithmeticConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.add_max_digits = 3


def test_difficulty_knobs():
    rows = make_split("train", 300, seed=0, config=ArithmeticConfig(mul_fraction=1.0, mul_min_digits_b=2))
    assert all("*" in r["prompt"] for r in rows)
    assert all(len(str(_problem(r)[2])) == 2 for r in rows)
    rows = make_split("train", 300, seed=0, config=ArithmeticConfig(mul_fraction=0.0, add_min_digits=5))
    assert all(_problem(r)[1] == "+" and min(_problem(r)[0], _problem(r)[2]) >= 10000 for r in rows)
    mix = make_split("train", 1000, seed=0)
    n_mul = sum("*" in r["prompt"] for r in mix)
    assert 400 < n_mul < 600  # default: half multiplications


def test_export_jsonl(tmp_path):
    rows = make_split("eval", 20, seed=0)
    p = export_jsonl(rows, tmp_path / "sub" / "eval.jsonl")
    lines = open(p).read().splitlines()
    assert [json.loads(x) for x in lines] == rows
    from rpo_engine.data.datasets import load_dataset_rows
    assert load_dataset_rows(p) == rows


# --------------------------------------------------------------------------------------------- tokenizer

def test_tokenizer_round_trip_and_digits(tok):
    texts = [r["prompt"] + r["solution"] for r in make_split("eval", 50, seed=1)]
    texts += ["", " ", "  leading and trailing  ", "héllo wörld ✓ 日本語 \t\r\n", "\\boxed{\\frac{1}{2}}", "<|pad|>",
              "x" * 300, "1234567890 9876543210"]
    for t in texts:
        ids = tok.encode(t, add_special_tokens=False)
        assert tok.decode(ids) == t
    ids = tok.encode("Q: 12034+9\nA:", add_special_tokens=False)
    toks = tok.convert_ids_to_tokens(ids)
    assert [t for t in toks if any(c.isdigit() for c in t)] == list("120349")  # every digit alone


def test_tokenizer_special_tokens(tok):
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == tok.pad_token_id == tok.convert_tokens_to_ids("<|endoftext|>")
    assert tok.encode("a<|endoftext|>", add_special_tokens=False)[-1] == tok.eos_token_id
    assert tok.encode("12", add_special_tokens=True) == tok.encode("12", add_special_tokens=False)  # no bos
    assert tok.decode(tok.encode("7<|endoftext|>", add_special_tokens=False), skip_special_tokens=True) == "7"
    assert not getattr(tok, "chat_template", None)
    assert 256 < len(tok) <= 1024


def test_tokenizer_is_deterministic(tok):
    from rpo_engine.data.tokenizer import build_task_tokenizer

    first = tok.backend_tokenizer.to_str()
    assert build_task_tokenizer().backend_tokenizer.to_str() == first
    # also across processes (the trainer's hash maps are seeded per process)
    code = ("import sys, hashlib; from rpo_engine.data.tokenizer import build_task_tokenizer; "
            "sys.stdout.write(hashlib.sha256(build_task_tokenizer().backend_tokenizer.to_str().encode()).hexdigest())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    import hashlib
    assert out == hashlib.sha256(first.encode()).hexdigest()


def test_tokenizer_save_and_autotokenizer_reload(tok, tmp_path):
    from transformers import AutoTokenizer

    from rpo_engine.data.tokenizer import save_task_tokenizer

    d = save_task_tokenizer(tmp_path / "tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "tok" / name).is_file()
    re_tok = AutoTokenizer.from_pretrained(d)
    for t in [r["prompt"] + r["solution"] for r in make_split("train", 20, seed=2)] + [" héllo  ✓\n"]:
        assert re_tok.encode(t, add_special_tokens=False) == tok.encode(t, add_special_tokens=False)
        assert re_tok.encode(t) == tok.encode(t)
        assert re_tok.decode(re_tok.encode(t, add_special_tokens=False)) == t
    assert re_tok.eos_token_id == tok.eos_token_id and re_tok.pad_token_id == tok.pad_token_id
    assert len(re_tok) == len(tok)


def test_trace_token_lengths_default_config(tok):
    # Measured for the default config (solution tokens, no eos): min 47, p5 47, p25 69, p50 101, p75 161,
    # p95 255, max 255. Easy problems (2-digit addition, 2-digit x 1-digit) are short by nature: one step
    # line per digit; nothing is padded, to keep every token worth learning.
    rows = make_split("train", 600, seed=0)
    lens = sorted(len(tok.encode(r["solution"], add_special_tokens=False)) for r in rows)
    p5, p50, p95 = (lens[len(lens) * q // 100] for q in (5, 50, 95))
    assert 40 <= p5 and 80 <= p50 <= 160 and p95 <= 300, (p5, p50, p95)
    full = [len(tok.encode(r["prompt"] + r["solution"], add_special_tokens=False)) for r in rows]
    assert max(full) <= 400
    # the hardest problems of the default config stay well inside the budget
    assert len(tok.encode(solve_trace(99999, "+", 99999), add_special_tokens=False)) <= 200
    assert len(tok.encode(solve_trace(99, "*", 99), add_special_tokens=False)) <= 300


# --------------------------------------------------------------------------------------------- mutation-audit additions

def test_eval_split_is_one_problem_in_eight():
    """problem_split puts about 1/EVAL_BUCKETS of the problems in eval (kills swapping the eval and train test,
    which keeps the splits disjoint but makes eval 7/8 of all problems)."""
    rng = random.Random(0)
    problems = [(rng.choice("+*"), rng.randint(10, 99999), rng.randint(10, 99999)) for _ in range(4000)]
    share = sum(problem_split(op, a, b) == "eval" for op, a, b in problems) / len(problems)
    assert 0.10 < share < 0.15, share


def test_the_built_in_splits_are_the_published_ones():
    """The problems of the built-in splits are fixed across versions (the README's held-out accuracies are measured
    on them): a change to the hash, its eval bucket or the draws would silently change every eval number."""
    assert [r["prompt"] for r in make_split("eval", 4, seed=0)] == [
        "Q: 55*9\nA:", "Q: 62*72\nA:", "Q: 5445+361\nA:", "Q: 48+7529\nA:"]
    assert [r["prompt"] for r in make_split("train", 4, seed=0)] == [
        "Q: 5226+86818\nA:", "Q: 97*2\nA:", "Q: 79*2\nA:", "Q: 73+82142\nA:"]


def test_multiplier_digits_follow_their_own_knobs():
    """The multiplier b is drawn from mul_*_digits_b, the multiplicand a from mul_*_digits_a (kills drawing b
    with a's knobs)."""
    cfg = ArithmeticConfig(mul_fraction=1.0, mul_min_digits_a=3, mul_max_digits_a=3, mul_min_digits_b=1,
                           mul_max_digits_b=1)
    problems = [_problem(r) for r in make_split("train", 200, seed=0, config=cfg)]
    assert all(op == "*" and len(str(a)) == 3 and len(str(b)) == 1 for a, op, b in problems)


def test_split_ids_count_from_zero():
    """Ids are "<split>-<index>", the index 0-based and zero-padded (kills an off-by-one in the index)."""
    assert [r["id"] for r in make_split("eval", 3, seed=0)] == ["eval-000000", "eval-000001", "eval-000002"]
    assert [r["id"] for r in make_split("train", 2, seed=4)] == ["train-000000", "train-000001"]


def test_check_trace_catches_a_carry_into_a_chain_start_and_a_cut_off_end():
    """check_trace on traces whose every other check passes: a chain that starts with a carry of 1 (kills
    dropping the carry-in check), and a trace cut off mid-chain with no #### line (kills dropping the end check)."""
    carried = " 12+34: 2+4+1=07 w7 c0 r7\n1+3: 1+3+0=04 w4 c0 r47\n#### 47"
    assert any("carry in 1, expected 0" in e for e in check_trace(carried))
    cut = " 12+34: 2+4+0=06 w6 c0 r6"
    assert check_trace(cut) == ["end: the last chain stopped before its operands and carry ran out"]
    assert check_trace(" 12+34: 2+4+0=06 w6 c0 r6\n1+3: 1+3+0=04 w4 c0 r46\n#### 46") == []
