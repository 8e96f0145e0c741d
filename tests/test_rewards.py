"""Verifiable rewards: exact `####` match, math-verify equivalence, format, user reward loading."""
import math
import threading
import time
import types
import warnings

import pytest

from rpo_engine.errors import UserError
from rpo_engine.rewards import (
    exact_answer_reward, extract_answer, format_reward, load_reward_fn, math_answer_reward,
)
from tests.helpers import process_ended

GARBAGE = ["", "   ", "\x00\x01\x02", "{{{{{{", "\\boxed{", "#### ", "####", "$$$", "\\frac{", "}}}{{{" * 50,
           "1/0", "nan", "\\boxed{\\boxed{\\boxed{", "(" * 200, "#" * 1000]


def test_exact_answer_reward():
    assert exact_answer_reward(" 3+4\n#### 7", "7") == 1.0
    assert exact_answer_reward("#### 7  \n", " 7 ") == 1.0
    assert exact_answer_reward("#### 1\n...\n#### 7", "7") == 1.0       # the last #### counts
    assert exact_answer_reward("#### 7\n#### 8", "7") == 0.0
    assert exact_answer_reward(" trace\n#### 8", "7") == 0.0           # wrong
    assert exact_answer_reward("the answer is 7", "7") == 0.0          # missing ####
    assert exact_answer_reward("#### 07", "7") == 0.0                  # exact, not numeric
    assert exact_answer_reward("#### 7", "17") == 0.0                  # the whole reference, not a part of it
    assert exact_answer_reward("\\boxed{7}", "7") == 0.0
    assert exact_answer_reward("#### 72", "Natalia sold 48+24 = 72 clips.\n#### 72") == 1.0  # GSM8K-style ref
    for g in GARBAGE:
        assert exact_answer_reward(g, "7") == 0.0
    assert exact_answer_reward("####", "") == 0.0


def test_math_answer_reward_plain_and_hash():
    assert math_answer_reward("#### 7", "7") == 1.0
    assert math_answer_reward("#### 07", "7") == 1.0
    assert math_answer_reward("#### 1,234", "1234") == 1.0
    assert math_answer_reward("#### 0.50", "1/2") == 1.0
    assert math_answer_reward("#### 8", "7") == 0.0
    assert math_answer_reward("7", "7") == 1.0
    assert math_answer_reward("#### 7", 7) == 1.0


def test_math_answer_reward_boxed_and_latex():
    assert math_answer_reward("so the answer is $\\boxed{\\frac{1}{2}}$.", "0.5") == 1.0
    assert math_answer_reward("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}") == 1.0
    assert math_answer_reward("... therefore \\boxed{2\\sqrt{2}}", "\\sqrt{8}") == 1.0
    assert math_answer_reward("\\boxed{3}", "4") == 0.0
    assert math_answer_reward("The answer is 12.", "12") == 1.0
    assert math_answer_reward("#### x^2 + 2x + 1", "(x+1)^2") == 1.0


def test_math_answer_reward_reads_what_models_write():
    """The forms Qwen / R1-distilled models end with, graded as TRL's and verl's math rewards grade them."""
    m = math_answer_reward
    # a Markdown "####" heading is not the answer: the box after it is (or the text after it, unboxed)
    assert m("#### Step 1: Setup\n6*3 = 18\n#### Step 2\nSo the answer is \\boxed{18}.", "18") == 1.0
    assert m("### Step 1\n...\n#### Final Answer\n\\boxed{18}", "18") == 1.0
    assert m("#### Final Answer\nThe answer is 18.", "18") == 1.0
    assert m("#### 5\nWait, I made an error. The answer is \\boxed{7}", "7") == 1.0
    assert m("#### 5\nWait, I made an error. The answer is \\boxed{7}", "5") == 0.0
    # a GSM8K line's number, before words, units or Markdown (verl's gsm8k rule); not a fraction's numerator
    for line in ("#### 18 dollars", "#### 18 eggs", "#### **18**", "#### 18 (since 6*3)", "#### 18."):
        assert m(line, "18") == 1.0, line
    assert m("#### 18/5", "18") == 0.0 and m("#### 18 dollars", "19") == 0.0
    # nor a decimal's integer part; and a line that starts with a number is the answer whatever text follows it
    assert m("#### 18.5%", "18") == 0.0 and m("#### 1.5/2", "1") == 0.0
    assert m("#### 18\nThat is 3 more than 15.", "18") == 1.0
    # MATH's escaped dollar is a currency sign, not math mode
    assert m("so \\boxed{\\$1.17}", "\\$1.17") == 1.0 and m("\\boxed{1.17}", "\\$1.17") == 1.0
    assert m("\\boxed{32000}", "\\$32,\\!000") == 1.0 and m("\\boxed{1.18}", "\\$1.17") == 0.0
    # after </think> only the answer counts, not a guess inside the thinking
    assert m("<think>guess \\boxed{5}</think> The total is 7.", "7") == 1.0
    assert m("<think>guess \\boxed{5}</think> The total is 7.", "5") == 0.0
    # an answer boxed, then checked at length: the box, though it is 2000+ characters back
    assert m("\\boxed{18}" + " and checking 1 2 3" * 200, "18") == 1.0


def test_math_answer_reward_gives_a_hedged_answer_no_credit():
    """Several candidates (math-verify reads several boxes as a set) are right only where the reference is that
    set, a problem with several solutions; against one value a hedge scores 0, or RL would learn to list guesses.
    A `####` line counts by its first number alone, so a second one never helps either."""
    m = math_answer_reward
    for hedge in ("\\boxed{5} or \\boxed{6}", "\\boxed{6} or \\boxed{5}", "\\boxed{5, 6}", "\\boxed{5 \\text{ or } 6}"):
        assert m(hedge, "5") == 0.0 and m(hedge, "5, 6") == 1.0, hedge
    assert m("\\boxed{5}, \\boxed{6}, \\boxed{7}", "5, 6") == 0.0 and m("\\boxed{5}", "5, 6") == 0.0
    assert m("#### 6 or 5", "5") == 0.0


def test_math_reward_names_a_reference_it_cannot_read_once():
    import rpo_engine.rewards.answers as answers

    answers._UNREADABLE_REFERENCES.discard("\\")
    with pytest.warns(UserWarning, match="cannot read the reference answer") as caught:
        assert math_answer_reward("\\boxed{1}", "\\") == 0.0
        assert math_answer_reward("\\boxed{2}", "\\") == 0.0
    assert len([w for w in caught if "cannot read" in str(w.message)]) == 1


def test_math_answer_reward_never_raises_on_garbage(monkeypatch):
    from rpo_engine.rewards import answers

    for g in GARBAGE:
        assert math_answer_reward(g, "7") == 0.0
        with warnings.catch_warnings():  # an unreadable garbage reference is named (tested below)
            warnings.simplefilter("ignore", UserWarning)
            assert math_answer_reward("#### 7", g) in (0.0, 1.0)
    assert math_answer_reward(None, "7") == 0.0
    assert math_answer_reward(12345, "7") == 0.0
    assert math_answer_reward("#### 7", None) == 0.0
    # a long completion: math-verify (whose parse time grows with its input) reads its tail, not all of it
    parsed, parse = [], answers._parse
    monkeypatch.setattr(answers, "_parse", lambda text, timeout: parsed.append(len(text)) or parse(text, timeout))
    assert math_answer_reward("x" * 200_000 + " \\boxed{7}", "7") == 1.0
    assert parsed and max(parsed) <= answers._MATH_MAX_CHARS + 2
    parsed.clear()  # a `####` line as long: its tail too
    assert math_answer_reward("#### " + "x+" * 100_000 + "7", "7") == 0.0
    assert parsed and max(parsed) <= answers._MATH_MAX_CHARS + 2


def test_math_answer_reward_in_a_thread():
    # math-verify's signal timeouts only work in the main thread; the reward must still work elsewhere
    out = []
    th = threading.Thread(target=lambda: out.extend([math_answer_reward("\\boxed{\\frac{2}{4}}", "1/2"),
                                                     math_answer_reward("\\boxed{3}", "1/2")]))
    th.start(); th.join()
    assert out == [1.0, 0.0]


def test_format_reward():
    assert format_reward(" 3+4\n#### 7") == 1.0
    assert format_reward(" 3+4\n#### 7\n\n") == 1.0
    assert format_reward("#### -12") == 1.0
    assert format_reward("so $\\boxed{\\frac{1}{2}}$.") == 1.0
    assert format_reward("\\boxed{7}") == 1.0
    assert format_reward("#### 7\nand then some more text") == 0.0     # answer line is not last
    assert format_reward("the answer is 7") == 0.0
    assert format_reward("\\boxed{7") == 0.0                            # unclosed
    assert format_reward("\\boxed{} ") == 0.0                           # empty
    assert format_reward("\\boxed{7} and more words") == 0.0
    assert format_reward("#### " + "9" * 500) == 0.0                   # not a sane final line
    for g in GARBAGE:
        assert format_reward(g) == 0.0, g
    assert format_reward(None) == 0.0
    # Qwen's display-math endings and Markdown bold around the box
    for text in ("Thus:\n\\[\n\\boxed{18}\n\\]", "$$\n\\boxed{18}\n$$", "**\\boxed{18}**", "\\[ \\boxed{18} \\]"):
        assert format_reward(text) == 1.0, text
    assert format_reward("\\]") == 0.0 and format_reward("\\boxed{7} and more\n$$") == 0.0
    assert format_reward("\\[ \\boxed{18}\n\\]") == 1.0  # the box's line and the closing line alone


def test_rewards_on_task_rows():
    from rpo_engine.data.arithmetic import make_split

    for r in make_split("eval", 30, seed=0):
        sol = r["solution"]
        assert extract_answer(sol) == r["answer"]
        assert exact_answer_reward(sol, r["answer"]) == 1.0
        assert math_answer_reward(sol, r["answer"]) == 1.0
        assert format_reward(sol) == 1.0
        wrong = sol.rsplit("#### ", 1)[0] + f"#### {int(r['answer']) + 1}"
        assert exact_answer_reward(wrong, r["answer"]) == 0.0
        assert math_answer_reward(wrong, r["answer"]) == 0.0
        assert format_reward(sol.rsplit("\n", 1)[0]) == 0.0  # truncated before the answer line


def test_load_reward_fn(tmp_path, monkeypatch):
    assert load_reward_fn("rpo_engine.rewards:exact_answer_reward") is exact_answer_reward
    assert load_reward_fn("rpo_engine.rewards.answers:math_answer_reward") is math_answer_reward
    assert load_reward_fn("exact_answer") is exact_answer_reward
    assert load_reward_fn("format")("#### 3", "3") == 1.0

    (tmp_path / "my_rewards.py").write_text(
        "def score(completion_text, answer):\n    return float(answer in completion_text)\n"
        "class K:\n    @staticmethod\n    def m(c, a):\n        return 0.5\n"
        "NOT_CALLABLE = 3\n")
    (tmp_path / "broken_rewards.py").write_text("import does_not_exist_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert load_reward_fn("my_rewards:score")("abc 42", "42") == 1.0
    assert load_reward_fn("my_rewards:K.m")("", "") == 0.5
    assert load_reward_fn(f"{tmp_path / 'my_rewards.py'}:score")("x", "x") == 1.0

    cases = {
        "no_such_module_xyz:fn": "cannot import",
        "broken_rewards:fn": "cannot import",
        "my_rewards:nope": "no attribute",
        "my_rewards:NOT_CALLABLE": "not a callable",
        "my_rewards": "expected 'module:function'",
        ":score": "expected 'module:function'",
        f"{tmp_path / 'missing.py'}:score": "no such file",
    }
    for path, why in cases.items():
        with pytest.raises(UserError) as e:
            load_reward_fn(path)
        msg = str(e.value)
        assert path in msg and why in msg and "\n" not in msg, msg
    with pytest.raises(UserError):
        load_reward_fn("")


def test_a_reward_file_imports_the_modules_beside_it(tmp_path):
    """--reward path/to/rewards.py:fn imports a helpers.py beside it, as the file run as a script would; sys.path
    is left as it was, and another file's own helpers.py, loaded later in the process, is its own."""
    import sys

    path_before = list(sys.path)
    for name, value in (("a", 1.0), ("b", 0.5)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "helpers.py").write_text(f"VALUE = {value}\n")
        (tmp_path / name / "rewards.py").write_text(
            "from helpers import VALUE\n\ndef score(completion_text, answer):\n    return VALUE\n")
    assert load_reward_fn(f"{tmp_path / 'a' / 'rewards.py'}:score")("x", "x") == 1.0
    assert load_reward_fn(f"{tmp_path / 'b' / 'rewards.py'}:score")("x", "x") == 0.5
    assert sys.path == path_before and "helpers" not in sys.modules


def test_user_reward_mistakes_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "user_rewards.py").write_text(
        "import math\n"
        "def text(c, a):\n    return 'right'\n"
        "def nothing(c, a):\n    pass\n"
        "def nan(c, a):\n    return math.nan\n"
        "def boom(c, a):\n    return 1 / 0\n"
        "def numpyish(c, a):\n    return True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for fn, why in (("text", "returned 'right' (str)"), ("nothing", "returned None"), ("nan", "returned nan"),
                    ("boom", "raised ZeroDivisionError: division by zero (")):
        with pytest.raises(UserError) as e:
            load_reward_fn(f"user_rewards:{fn}")("#### 3", "3")
        msg = str(e.value)
        assert f"user_rewards:{fn}" in msg and why in msg and "reference answer '3'" in msg and "\n" not in msg, msg
    assert "user_rewards.py:9;" in msg  # where the user's code raised
    assert load_reward_fn("user_rewards:numpyish")("", "") == 1.0  # a bool is a number


def test_trl_style_reward_is_called_the_way_trl_calls_it(tmp_path, monkeypatch):
    """A function with a `completions` parameter gets TRL's keyword arguments, one call for all."""
    from rpo_engine.rewards import TRLStyleReward, score_completions

    (tmp_path / "trl_rewards.py").write_text(
        "calls = []\n"
        "def accuracy(completions, solution, **kwargs):\n"
        "    calls.append(dict(kwargs, completions=completions, solution=solution))\n"
        "    return [float(s in (c if isinstance(c, str) else c[0]['content'])) for c, s in zip(completions, solution)]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reward = load_reward_fn("trl_rewards:accuracy")
    assert isinstance(reward, TRLStyleReward)
    import trl_rewards

    # a "completion" column (an SFT dataset's) is left out, as TRL leaves it out
    rows = [{"id": "a", "prompt": "1+1=", "answer": "2", "solution": "2", "completion": "2"},
            {"id": "b", "prompt": "2+2=", "answer": "4", "solution": "4", "completion": "4"}]
    assert score_completions(reward, ["it is 2", "it is 5"], rows, [[7, 8], [9]]) == [1.0, 0.0]
    call = trl_rewards.calls[-1]
    # TRL's trainer_state, log_metric and log_extra come too (**kwargs takes them): outside a run, a fresh state
    state, log_metric, log_extra = (call.pop(k) for k in ("trainer_state", "log_metric", "log_extra"))
    assert (state.global_step, state.epoch) == (0, 0) and callable(log_metric) and callable(log_extra)
    assert call == {"prompts": ["1+1=", "2+2="], "completions": ["it is 2", "it is 5"], "completion_ids": [[7, 8], [9]],
                    "answer": ["2", "4"], "id": ["a", "b"], "solution": ["2", "4"]}
    chat = [dict(rows[0], prompt=[{"role": "user", "content": "1+1="}])]
    assert score_completions(reward, ["2"], chat) == [1.0]  # a conversation's completion is an assistant message
    assert trl_rewards.calls[-1]["completions"] == [[{"role": "assistant", "content": "2"}]]
    # ours, one call per completion, through the same entry point
    assert score_completions(exact_answer_reward, ["#### 2", "#### 3"], rows, None) == [1.0, 0.0]


def test_trl_style_reward_mistakes_are_one_line_errors(tmp_path, monkeypatch):
    (tmp_path / "bad_trl_rewards.py").write_text(
        "def short(completions, **kwargs):\n    return [1.0]\n"
        "def none(completions, **kwargs):\n    return [None for _ in completions]\n"
        "def scalar(completions, **kwargs):\n    return 1.0\n"
        "def boom(completions, **kwargs):\n    return [1 / 0]\n"
        "def keyed(completions, **kwargs):\n    return {i: 1.0 for i in range(len(completions))}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from rpo_engine.rewards import score_completions

    rows = [{"id": "a", "prompt": "p", "answer": "2"}] * 2
    for fn, why in (("short", "returned 1 values for 2 completions"), ("none", "returned None (NoneType)"),
                    ("scalar", "returned 1.0 for 2 completions"),
                    ("keyed", "returned a dict for 2 completions"),  # its keys are not scores
                    ("boom", "raised ZeroDivisionError: division by zero (")):
        with pytest.raises(UserError) as e:
            score_completions(load_reward_fn(f"bad_trl_rewards:{fn}"), ["x", "y"], rows)
        msg = str(e.value)
        assert f"bad_trl_rewards:{fn}" in msg and why in msg and "\n" not in msg, msg
    assert "bad_trl_rewards.py:8;" in msg
    # the trainer's call: the first function decides right answers, so its None is an error; a later one's is NaN
    from rpo_engine.rewards.answers import score_functions
    none = load_reward_fn("bad_trl_rewards:none")
    with pytest.raises(UserError, match="returned None"):
        score_functions([none, exact_answer_reward], [["x", "y"]], rows[:1])
    (first,), (extra,) = score_functions([exact_answer_reward, none], [["x", "#### 2"]], rows[:1])
    assert first == [0.0, 1.0] and all(math.isnan(x) for x in extra)
    # an extra reward's None ("does not apply"): NaN, which the trainer adds as 0 and leaves out of its mean (TRL's)
    scores = score_completions(load_reward_fn("bad_trl_rewards:none"), ["x", "y"], rows, none_as_nan=True)
    assert len(scores) == 2 and all(math.isnan(x) for x in scores)


def test_trl_rewards_are_called_once_a_batch_and_async_ones_awaited_together_on_one_lasting_loop(tmp_path, monkeypatch):
    """TRL-style functions are called once for all the groups scored together (TRL's once a batch), and the async
    ones (TRL awaits them) together: two judges that each wait for the other at a barrier would time out one
    after the other. The event loop is the same from one scoring to the next (a client made in an earlier call
    stays usable). An async callable object and a functools.partial of an async function are awaited too."""
    from rpo_engine.rewards.answers import score_functions, score_groups

    (tmp_path / "async_rewards.py").write_text(
        "import asyncio, functools\n"
        "calls, barriers = [], {}\n"
        "async def judge(completions, answer, **kwargs):\n"
        "    calls.append((asyncio.get_running_loop(), len(completions)))\n"
        "    barrier = barriers.setdefault(len(calls) > 2, asyncio.Barrier(2))\n"
        "    await asyncio.wait_for(barrier.wait(), 10)\n"
        "    return [float(c == a) for c, a in zip(completions, answer)]\n"
        "other_judge = judge\n"
        "class Judge:\n"
        "    async def __call__(self, completions, answer, **kwargs):\n"
        "        return [float(c == a) for c, a in zip(completions, answer)]\n"
        "judge_object = Judge()\n"
        "async def _scaled(completions, answer, scale, **kwargs):\n"
        "    return [scale * (c == a) for c, a in zip(completions, answer)]\n"
        "judge_partial = functools.partial(_scaled, scale=2.0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import async_rewards

    rows = [{"id": str(i), "prompt": f"{i}+0=", "answer": str(i)} for i in range(3)]
    texts = [["0", "9"], ["1"], ["5", "2", "2"]]
    expected = [[1.0, 0.0], [1.0], [0.0, 1.0, 1.0]]
    judges = [load_reward_fn("async_rewards:judge"), load_reward_fn("async_rewards:other_judge")]
    for _ in range(2):  # twice: the second scoring's calls meet on the first's loop
        assert score_functions(judges, texts, rows) == [expected, expected]
    assert [n for _, n in async_rewards.calls] == [6] * 4 and len({loop for loop, _ in async_rewards.calls}) == 1
    assert score_groups(load_reward_fn("async_rewards:judge_object"), texts, rows) == expected
    assert score_groups(load_reward_fn("async_rewards:judge_partial"), texts, rows) == [[2 * x for x in e] for e in expected]


def test_trl_reward_logging_and_state_mistakes_are_one_line_errors(tmp_path, monkeypatch):
    """What TRL lets a reward function log, checked: log_metric takes a finite number, log_extra one value per
    completion of its call, a column once per group; an async function's exception names it and its line. A
    function that takes none of TRL's extra arguments gets none of them."""
    from rpo_engine.rewards.answers import RewardLog, score_groups

    (tmp_path / "logging_rewards.py").write_text(
        "def nan_metric(completions, log_metric, **kwargs):\n    log_metric('judge/score', float('nan'))\n    return [0.0] * len(completions)\n"
        "def short_column(completions, log_extra, **kwargs):\n    log_extra('why', ['a'])\n    return [0.0] * len(completions)\n"
        "def twice(completions, log_extra, **kwargs):\n    log_extra('why', ['a'] * len(completions))\n"
        "    log_extra('why', ['b'] * len(completions))\n    return [0.0] * len(completions)\n"
        "async def boom(completions, **kwargs):\n    return [1 / 0]\n"
        "def good(completions, trainer_state, log_metric, log_extra, **kwargs):\n"
        "    log_metric('judge/step', trainer_state.global_step)\n"
        "    log_extra('why', [f'{c}!' for c in completions])\n    return [1.0] * len(completions)\n"
        "def bare(completions, prompts, completion_ids, answer, id):\n    return [1.0] * len(completions)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"id": "a", "prompt": "p", "answer": "2"}, {"id": "b", "prompt": "q", "answer": "3"}]
    texts = [["x", "y"], ["z"]]
    for fn, why in (("nan_metric", "logged nan (float) as metric 'judge/score', expected a finite number"),
                    ("short_column", "logged 1 values as column 'why' for 3 completions"),
                    ("twice", "logged column 'why' twice for the same completions"),
                    ("boom", "raised ZeroDivisionError: division by zero (")):
        with pytest.raises(UserError) as e:
            score_groups(load_reward_fn(f"logging_rewards:{fn}"), texts, rows)
        msg = str(e.value)
        assert f"logging_rewards:{fn}" in msg and why in msg and "\n" not in msg, msg
    assert "logging_rewards.py:12;" in msg  # where the awaited code raised
    log, state = RewardLog(), types.SimpleNamespace(global_step=7)
    assert score_groups(load_reward_fn("logging_rewards:good"), texts, rows, trainer_state=state, log=log) == [[1.0, 1.0], [1.0]]
    # one call for both groups; its column cut back into the groups'
    assert log.metrics == {"judge/step": [7]} and log.columns == {0: {"why": ["x!", "y!"]}, 1: {"why": ["z!"]}}
    assert RewardLog.metric_means([log.metrics, {"judge/step": [1, 4]}], "eval_") == {"eval_judge/step": 4.0}
    assert score_groups(load_reward_fn("logging_rewards:bare"), texts, rows) == [[1.0, 1.0], [1.0]]


def test_trls_own_reward_functions_score_through_ours():
    """TRL's reward functions (trl.rewards) by their import path: accuracy_reward (math-verify against a `solution`
    column, logging its parses through log_extra) and think_format_reward, on conversational rows, in one batch."""
    pytest.importorskip("trl")
    from rpo_engine.rewards.answers import RewardLog, score_functions

    accuracy, think = load_reward_fn("trl.rewards:accuracy_reward"), load_reward_fn("trl.rewards:think_format_reward")
    rows = [{"id": "a", "prompt": [{"role": "user", "content": "2+2?"}], "answer": "4", "solution": "$4$"},
            {"id": "b", "prompt": [{"role": "user", "content": "3*3?"}], "answer": "9", "solution": "$9$"}]
    texts = [["<think>2 and 2</think> It is $\\boxed{4}$.", "no idea"], ["<think>hm</think> $\\boxed{6}$"]]
    log = RewardLog()
    assert score_functions([accuracy, think], texts, rows, log=log) == [[[1.0, 0.0], [0.0]], [[1.0, 0.0], [1.0]]]
    assert log.columns[0]["solution"] == ["$4$", "$4$"] and log.columns[1]["solution"] == ["$9$"]
    assert log.columns[0]["answer_parsed"][1] == "[unparseable]"


# ---- a reward model (TRL's reward_funcs given a model) ----------------------------------------------

@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    """A random 2-layer Qwen2 sequence classifier with one label and the task tokenizer, plus a chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from rpo_engine.data.tokenizer import build_task_tokenizer

    directory = tmp_path_factory.mktemp("reward_model")
    tok = build_task_tokenizer()
    tok.chat_template = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}[assistant] {% endif %}")
    config = AutoConfig.for_model("qwen2", vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                                  pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def test_reward_model_scores_every_group_of_a_batch_in_one_call(reward_model_dir):
    """score_functions hands a reward model all the groups' completions at once (its forwards batch them), as
    TRL scores a batch, and cuts the scores back into the groups: the scores one group at a time gives."""
    from rpo_engine.rewards.answers import score_functions
    from rpo_engine.rewards.model import RewardModel

    model, calls = RewardModel(str(reward_model_dir), batch_size=4), []
    score = model.score
    model.score = lambda texts, rows, *args: (calls.append(len(texts)), score(texts, rows, *args))[1]
    rows = [{"prompt": "12+3=", "answer": "15"}, {"prompt": "7+8=", "answer": "15"}, {"prompt": "2+2=", "answer": "4"}]
    texts = [[" 15", " 16", " 15 and more"], [" 1"], [" 4", " 44"]]
    together = score_functions([model], texts, rows)[0]
    assert calls == [6] and [len(g) for g in together] == [3, 1, 2]
    apart = [score(group, [row] * len(group)) for group, row in zip(texts, rows)]
    assert together == [pytest.approx(a, abs=1e-5) for a in apart]


def test_reward_model_scores_prompt_and_completion_as_transformers_does(reward_model_dir):
    """Each completion's reward is the classifier's logit on prompt + completion (string prompts) or on the
    conversation with the completion as the assistant's turn, whatever the batch and its padding."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rpo_engine.rewards import score_completions
    from rpo_engine.rewards.model import RewardModel

    rows = [{"prompt": "12+3=", "answer": "15"}, {"prompt": "7+8=", "answer": "15"},
            {"prompt": [{"role": "user", "content": "2+2="}], "answer": "4"}]
    texts = [" 15\n#### 15", " 1\n#### 1 and a much longer completion 1+1+1+1", " 4"]
    model = RewardModel(str(reward_model_dir), batch_size=2)  # two batches, ragged within the first
    got = score_completions(model, texts, rows)
    hf = AutoModelForSequenceClassification.from_pretrained(str(reward_model_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(reward_model_dir))
    inputs = ["12+3= 15\n#### 15", "7+8= 1\n#### 1 and a much longer completion 1+1+1+1",
              "[user] 2+2=\n[assistant]  4\n"]
    with torch.no_grad():
        want = [hf(**tok(t, return_tensors="pt", add_special_tokens=False)).logits[0, 0].item() for t in inputs]
    assert got == pytest.approx(want, abs=1e-5)
    assert len(set(got)) == 3 and model.__name__ == reward_model_dir.name


def test_reward_model_mistakes_are_one_line_errors(tmp_path, reward_model_dir, tiny_model_dir):
    from rpo_engine.config import config_from_dict
    from rpo_engine.rewards.model import RewardModel
    from rpo_engine.train import resolve_rewards

    with pytest.raises(UserError, match="the first reward decides right answers"):
        resolve_rewards(config_from_dict({"reward": f"{reward_model_dir},exact"}))
    with pytest.raises(UserError, match="not a \\*ForSequenceClassification model"):
        RewardModel(str(tiny_model_dir))  # a causal LM
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json: not a readable model config"):
        RewardModel(str(broken))
    with pytest.raises(UserError, match="or a reward model directory"):
        resolve_rewards(config_from_dict({"reward": f"exact,{tmp_path / 'missing'}"}))


def test_a_reward_model_scoring_nan_is_a_one_line_error(reward_model_dir):
    """A reward model whose score is not finite (weights or activations overflowing, say in bf16) stops the run
    naming it and the row; a NaN reward otherwise made NaN advantages, every update skipped with a warning."""
    import torch

    from rpo_engine.rewards.model import RewardModel

    model = RewardModel(str(reward_model_dir))
    rows, texts = [{"prompt": "12+3=", "answer": "15", "id": "q7"}] * 2, [" 15", " 16"]
    assert all(math.isfinite(x) for x in model.score(texts, rows))
    with torch.no_grad():
        model.model.score.weight.fill_(float("nan"))
    with pytest.raises(UserError, match=r"reward model .*: score nan for row 'q7' \(not finite"):
        model.score(texts, rows)


def test_reward_model_by_hub_id(tmp_path, monkeypatch, reward_model_dir):
    """--reward math,org/rm: the reward model in the Hugging Face cache (TRL takes a model id among its
    reward_funcs), scoring as its directory does, named rewards/rm/mean; an id in no cache names itself."""
    import huggingface_hub

    from rpo_engine.config import config_from_dict
    from rpo_engine.train import resolve_rewards
    from tests.helpers import hub_snapshot

    hub_snapshot(tmp_path / "hub", "org/rm", reward_model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (_, by_id), (_, by_dir) = (resolve_rewards(config_from_dict({"reward": f"exact,{rm}"}))
                               for rm in ("org/rm", reward_model_dir))
    rows, texts = [{"prompt": "12+3=", "answer": "15"}], [" 15"]
    assert by_id.__name__ == "rm" and by_id.score(texts, rows) == by_dir.score(texts, rows)
    with pytest.raises(UserError, match="^org/missing: no such directory, and no Hugging Face Hub model"):
        resolve_rewards(config_from_dict({"reward": "exact,org/missing"}))
    # one lookup of the id (online, each is a request), and none where only the first reward is used (eval's)
    lookups, snapshot_download = [], huggingface_hub.snapshot_download
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo_id, **kw: lookups.append(repo_id) or snapshot_download(repo_id, **kw))
    resolve_rewards(config_from_dict({"reward": "exact,org/rm"}))
    assert lookups == ["org/rm"]
    assert len(resolve_rewards(config_from_dict({"reward": "exact,org/missing"}), first_only=True)) == 1
    assert lookups == ["org/rm"]


def test_reward_model_named_by_a_relative_directory(monkeypatch, reward_model_dir):
    """A reward model given as "." (run from inside its directory) is named by that directory, not ''."""
    from rpo_engine.rewards.model import RewardModel

    monkeypatch.chdir(reward_model_dir)
    assert RewardModel(".", progress=False).__name__ == reward_model_dir.name


def test_reward_model_adds_its_weighted_score_in_training(reward_model_dir, tiny_model_dir):
    """--reward fn,RM_DIR --reward-weights 1,0.5: each completion's reward is its accuracy plus half the reward
    model's logit on it; the metric rewards/<model>/mean is the model's mean score."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--no-progress", "--no-rpo", "--eval-steps", "0",
                                        "--prompts-per-step", "2", "--num-generations", "3",
                                        "--max-completion-length", "16", "--no-length-shaping",
                                        "--reward", f"tests.reward_fns:hash_reward,{reward_model_dir}",
                                        "--reward-weights", "1,0.5"]))
    rm = trainer.extra_rewards[0]
    scored = []
    score = trainer.score_groups

    def spy(groups):
        score(groups)
        scored.extend(groups)

    trainer.score_groups = spy
    metrics = trainer.step()
    model_scores = [x for g in scored for x in g.scores[1]]
    for g in scored:
        texts = [trainer.tokenizer.decode(g.answer_ids(i), skip_special_tokens=True) for i in range(len(g.suffix_ids))]
        assert g.scores[1] == pytest.approx(rm.score(texts, [g.row] * len(texts)), abs=1e-6)
        assert g.rewards == pytest.approx([a + 0.5 * m for a, m in zip(g.scores[0], g.scores[1])], abs=1e-6)
    assert metrics[f"rewards/{reward_model_dir.name}/mean"] == pytest.approx(sum(model_scores) / len(model_scores))


def test_reward_pool_scores_as_the_functions_do():
    """RewardPool: each pooled function's scores from worker processes equal its own calls here, in order, on
    completions of every kind (plain numbers, LaTeX, #### answers, garbage), chunked over two workers."""
    import random

    from rpo_engine.rewards.pool import RewardPool, reward_function

    rng = random.Random(0)
    forms = ["The answer is \\boxed{{{a}}}.", "so x = {a}\n#### {a}", "#### {b}", "\\boxed{{\\frac{{{a}}}{{2}}}}",
             "no answer here", "", "{a}.0", "$${b}$$"]
    texts, answers = [], []
    for _ in range(37):  # not a multiple of the chunking
        a, b = rng.randint(0, 20), rng.randint(0, 20)
        texts.append(rng.choice(forms).format(a=a, b=b))
        answers.append(rng.choice([str(a), f"\\frac{{{a}}}{{2}}", str(b)]))
    names = {0: "math", 2: "exact", 3: "tests.reward_fns:hash_reward"}
    with RewardPool(names, workers=2) as pool:
        assert not pool.serves(1)
        for index, name in names.items():
            fn = reward_function(name)
            expected = [float(fn(t, a)) for t, a in zip(texts, answers)]
            assert pool.score(index, texts, answers) == expected, name
            assert 0 < sum(expected) < len(expected), name  # both verdicts occurred
        assert pool.score(0, [], []) == []


def test_reward_pool_reports_a_user_functions_mistake():
    from rpo_engine.rewards.pool import RewardPool

    with RewardPool({0: "tests.reward_fns:text_reward", 1: "tests.reward_fns:failing_reward"}, workers=1) as pool:
        with pytest.raises(UserError, match="text_reward.* returned 'wrong'"):
            pool.score(0, ["x"], ["42"])
        with pytest.raises(UserError, match="failing_reward"):
            pool.score(1, ["x"], ["42"])
        assert pool.score(0, [], []) == []  # the workers live on
    with RewardPool({0: "tests.reward_fns:exiting_reward"}, workers=1) as pool:
        with pytest.raises(UserError, match="exiting_reward.*a --reward-workers process died"):
            pool.score(0, ["x"], ["42"])
    with RewardPool({0: "tests.reward_fns:no_such_reward"}, workers=1) as pool:  # the worker's own import of it
        with pytest.raises(UserError, match="'tests.reward_fns' has no attribute 'no_such_reward'"):
            pool.score(0, ["x"], ["42"])


def test_reward_pool_left_on_an_error_stops_its_workers_at_once():
    """Leaving a pool's `with` block by an exception (an interrupt, a failing step) stops its workers mid-call
    instead of waiting out the work in flight (here 10 s of it)."""
    from rpo_engine.rewards.pool import RewardPool

    start, outcome = None, []
    with pytest.raises(RuntimeError, match="stop"):
        with RewardPool({0: "tests.reward_fns:slow_reward"}, workers=1) as pool:
            assert pool.score(0, ["x"], ["1"]) == [0.0]  # the worker is up
            # a call in flight from another thread (an eval thread, a user's): it fails, and is not scored here instead
            scoring = threading.Thread(target=lambda: outcome.append(_outcome(pool.score, 0, ["x"] * 20, ["1"] * 20)))
            scoring.start()
            time.sleep(1.0)  # the worker is inside that call
            processes = list(pool.processes)
            start = time.perf_counter()
            raise RuntimeError("stop")
    assert time.perf_counter() - start < 5
    assert all(process_ended(process.pid, 5) for process in processes)
    scoring.join(5)
    assert not scoring.is_alive() and "closed while scoring" in str(outcome[0])


def test_reward_pool_call_left_by_any_exception_leaves_no_reply_to_a_later_call():
    """An exception out of a scoring call other than Ctrl-C (a user's signal handler: a time limit on eval) left its
    chunks with the workers, and the next call read their replies as its own: 3 scores for 1 text. The pool stops
    its workers as for Ctrl-C, and says it is closed."""
    import signal

    from rpo_engine.rewards.pool import RewardPool

    class TimeLimit(Exception):
        pass

    def time_limit(signum, frame):
        raise TimeLimit()

    previous = signal.signal(signal.SIGALRM, time_limit)
    try:
        with RewardPool({0: "tests.reward_fns:slow_reward"}, workers=2) as pool:
            assert pool.score(0, ["x"], ["1"]) == [0.0]  # the workers are up
            processes = list(pool.processes)
            signal.setitimer(signal.ITIMER_REAL, 0.5)
            with pytest.raises(TimeLimit):
                pool.score(0, ["x"] * 20, ["1"] * 20)  # chunks of 3 texts, 1.5 s each
            time.sleep(2.0)  # the chunks' replies are back, where no worker was stopped
            with pytest.raises(RuntimeError, match="this reward pool is closed"):
                pool.score(0, ["x"], ["1"])
            assert all(process_ended(process.pid, 5) for process in processes)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_reward_pool_sees_a_worker_die_whose_helper_process_lives_on():
    """A worker killed (the OOM killer) while a process it forked (a user function's helper) lives on: that process
    holds the worker's end of the pipe and its exit sentinel open, so neither said it died, and the call waited as long
    as the helper lived (for ever, for a server). Its exit code says so within a second or two."""
    import os
    import signal

    from rpo_engine.rewards.pool import RewardPool
    from tests.reward_fns import hash_reward

    with RewardPool({0: "tests.reward_fns:helper_process_reward"}, workers=1) as pool:
        assert pool.score(0, ["a", "e"], ["1", "1"]) == [hash_reward("a", "1"), hash_reward("e", "1")]
        os.kill(pool.processes[0].pid, signal.SIGKILL)
        outcome = []
        scoring = threading.Thread(target=lambda: outcome.append(_outcome(pool.score, 0, ["a"], ["1"])), daemon=True)
        scoring.start()
        scoring.join(10)
        assert not scoring.is_alive()
        assert isinstance(outcome[0], UserError) and "signal SIGKILL" in str(outcome[0])


def test_reward_pool_names_a_worker_death_by_a_signal_without_a_name():
    """A worker ended by a real-time signal (no name in signal.Signals) failed on a ValueError traceback, not the
    one-line 'died while scoring' error."""
    import os
    import signal

    from rpo_engine.rewards.pool import RewardPool

    with RewardPool({0: "exact"}, workers=1) as pool:
        assert pool.score(0, ["#### 1"], ["1"]) == [1.0]
        os.kill(pool.processes[0].pid, signal.SIGRTMIN + 1)
        with pytest.raises(UserError, match=rf"died while scoring \(signal {signal.SIGRTMIN + 1}: "):
            pool.score(0, ["#### 1"], ["1"])


def _outcome(fn, *args):
    try:
        return fn(*args)
    except Exception as error:  # noqa: BLE001
        return error


def test_reward_model_loads_without_a_bar_under_no_progress(reward_model_dir, capfd):
    """--no-progress silences transformers' "Loading weights" bar too, and leaves it on for whoever comes after."""
    from transformers.utils import logging as hf_logging

    from rpo_engine.rewards.model import RewardModel

    RewardModel(str(reward_model_dir), progress=False)
    assert "Loading weights" not in capfd.readouterr().err and hf_logging.is_progress_bar_enabled()
    RewardModel(str(reward_model_dir))
    assert "Loading weights" in capfd.readouterr().err


# ----------------------------------------------------------------------------- mutation-audit additions

def test_math_reward_fast_path_compares_decimals_by_value():
    """The plain-number fast path keeps a decimal's point: 1.5 is not 15 (kills reading the number without its
    '.'), and 3.50 is 3.5."""
    assert math_answer_reward("#### 1.5", "15") == 0.0
    assert math_answer_reward("#### 3.50", "3.5") == 1.0
    assert math_answer_reward("#### 12.5 dollars", "125") == 0.0


def test_math_reward_reads_plain_numbers_without_math_verify(monkeypatch):
    """Plain numbers (thousands commas, a trailing period, inline math) are compared exactly on the fast path:
    math-verify's parse is slow and its timeout works in the main thread only."""
    from rpo_engine.rewards import answers

    parsed = []
    monkeypatch.setattr(answers, "_parse", lambda text, timeout: parsed.append(text))
    for completion, reference in (("1234", "1,234"), ("1,234", "1234"), ("42.", "42"), ("42", "42."), ("$42$", "42"),
                                  ("#### 42", "$42$"), ("#### 1,234 apples", "1234")):
        assert math_answer_reward(completion, reference) == 1.0, (completion, reference)
    assert math_answer_reward("#### 41", "$42$") == 0.0
    assert parsed == []


def test_math_reward_reads_after_the_last_think_end():
    """Only what follows the LAST </think> counts (kills rfind -> find): a box between two thinking blocks is a
    draft, not the answer."""
    text = "<think>first try</think> draft \\boxed{5} <think>no, check again</think> The total is 7."
    assert math_answer_reward(text, "7") == 1.0
    assert math_answer_reward(text, "5") == 0.0


def test_format_reward_final_line_length_limit_and_boxes():
    # '#### <answer>' with an answer of at most 100 characters (kills {0,99} -> {0,98})
    assert format_reward("#### " + "9" * 100) == 1.0
    assert format_reward("#### " + "9" * 101) == 0.0
    # a box of blanks is an empty answer (kills `content.strip()` -> `content`)
    assert format_reward("\\boxed{ }") == 0.0 and format_reward("so \\boxed{  }.") == 0.0
    # the last box of the last line is the answer, earlier ones on it are drafts (kills rfind -> find)
    assert format_reward("first \\boxed{5}, then corrected: \\boxed{7}") == 1.0


def test_user_reward_returning_inf_or_a_numeric_string_is_an_error(tmp_path, monkeypatch):
    """checked_reward: infinity is no finite score (kills isfinite -> isnan), and a str is no number even when it
    reads as one (kills float() on strings)."""
    (tmp_path / "mutaudit_rewards.py").write_text(
        "import math\n"
        "def inf(c, a):\n    return math.inf\n"
        "def numeric_text(c, a):\n    return '1.0'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for fn, why in (("inf", "returned inf (float)"), ("numeric_text", "returned '1.0' (str)")):
        with pytest.raises(UserError) as e:
            load_reward_fn(f"mutaudit_rewards:{fn}")("#### 3", "3")
        assert why in str(e.value) and "expected a finite number" in str(e.value), str(e.value)


def test_score_groups_through_a_pool_pairs_each_group_with_its_row():
    """score_groups' PooledReward path flattens groups of different sizes and pairs each completion with its own
    group's row (kills pairing every completion with the first row, or mis-reshaping), as the per-group path does.
    The pool here scores in this process: the pairing is what is tested, not the workers."""
    from rpo_engine.rewards.answers import score_groups
    from rpo_engine.rewards.pool import PooledReward

    class InProcessPool:
        def score(self, index, texts, answers):
            assert index == 3
            return [exact_answer_reward(t, a) for t, a in zip(texts, answers)]

    pooled = PooledReward(InProcessPool(), 3, exact_answer_reward)
    texts = [["#### 1", "#### 2"], ["#### 2"], ["#### 3", "#### 1", "#### 3"]]
    rows = [{"answer": "1"}, {"answer": "2"}, {"answer": "3"}]
    expected = [[1.0, 0.0], [1.0], [1.0, 0.0, 1.0]]
    assert score_groups(pooled, texts, rows) == expected
    assert score_groups(exact_answer_reward, texts, rows) == expected


def test_reward_pool_refuses_texts_and_answers_of_different_lengths():
    """RewardPool.score checks the lengths before any work is sent (kills dropping the check, which zip would
    silently truncate); no worker is started for it."""
    from rpo_engine.rewards.pool import RewardPool

    pool = RewardPool({0: "exact"}, workers=1)
    try:
        with pytest.raises(ValueError, match="2 texts for 1 answers"):
            pool.score(0, ["#### 1", "#### 2"], ["1"])
    finally:
        pool.close(wait=False)


def test_reward_workers_with_nothing_to_pool_is_an_error():
    # a TRL-style function scores a batch a call, in the trainer's process: the workers were silently never started
    from rpo_engine.config import parse_args
    from rpo_engine.errors import UserError
    from rpo_engine.train import resolve_rewards, reward_pool

    config = parse_args(["--reward", "tests.reward_fns:trl_hash_reward", "--reward-workers", "2"])
    with pytest.raises(UserError, match="^--reward-workers does nothing with --reward tests.reward_fns:trl_hash_reward: "):
        reward_pool(config, resolve_rewards(config))
    assert reward_pool(parse_args(["--reward", "tests.reward_fns:trl_hash_reward"]), resolve_rewards(config)) is None


def test_a_reward_model_without_a_chat_template_on_conversations_is_one_line(tmp_path, reward_model_dir, tiny_model_dir):
    """A reward model reads a conversation prompt (--system-prompt makes every prompt one; a dataset's messages)
    through its own chat template: without one, step 1's scoring raised transformers' ValueError, a traceback after
    the loading. Named before training now; string prompts still need none."""
    import re
    import shutil

    from rpo_engine import load_tokenizer
    from rpo_engine.config import parse_args
    from rpo_engine.errors import UserError
    from rpo_engine.train import build_trainer
    from tests.helpers import with_chat_template

    plain = tmp_path / "rm_plain"
    shutil.copytree(reward_model_dir, plain)
    tokenizer = load_tokenizer(plain)
    tokenizer.chat_template = None
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer.save_pretrained(str(plain))
    assert not load_tokenizer(plain).chat_template
    policy = with_chat_template(tiny_model_dir, tmp_path / "chat", "{% for m in messages %}{{ m['content'] }}{% endfor %}")
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2=", "answer": "4"}\n')
    args = ["--model", str(policy), "--dataset", str(data), "--eval-steps", "0", "--no-progress", "--prompts-per-step", "2",
            "--num-generations", "2", "--max-completion-length", "4", "--reward", f"exact,{plain}"]
    with pytest.raises(UserError, match=f"^--reward exact,{re.escape(str(plain))}: the reward model {re.escape(str(plain))} "
                                        f"has no chat template to read the conversation prompts \\(--system-prompt makes "
                                        f"every prompt one\\)"):
        build_trainer(parse_args([*args, "--system-prompt", "Box it."]))
    build_trainer(parse_args(args)).step()  # string prompts: joined to the completion, no template needed


def test_trl_style_reward_that_edits_its_arguments_leaves_the_dataset_rows_as_they_were():
    """A conversational prompt (a list of messages) and a list column were the dataset row's own objects: a function
    that edited them in place (appended a message, say) changed the row for every later call (the edits piling up
    each step), for completions.jsonl, and for the prompt digest a checkpoint stores (a resume then dropped the
    cached paths as saved for another prompt)."""
    import copy

    from rpo_engine.rewards import TRLStyleReward, score_completions

    def editing(prompts, completions, tests, **kwargs):
        for prompt, test in zip(prompts, tests):
            prompt.append({"role": "assistant", "content": "x"})
            prompt[0]["content"] = "edited"
            test.clear()
        return [1.0] * len(completions)

    rows = [{"id": "a", "prompt": [{"role": "user", "content": "1+1="}], "answer": "2", "tests": ["assert f(1)"]}]
    before = copy.deepcopy(rows)
    assert score_completions(TRLStyleReward(editing, "editing"), ["2"], rows) == [1.0]
    assert rows == before


def test_trl_style_reward_that_edits_completion_ids_leaves_them_to_the_next_function():
    """completion_ids were the caller's lists: a function that edited one (cut its eos, say) changed what the next
    function read, and the lengths the overlong penalty takes from them."""
    from rpo_engine.rewards.answers import TRLStyleReward, score_functions

    def cutting(completions, completion_ids, **kwargs):
        for ids in completion_ids:
            del ids[1:]
        return [1.0] * len(completions)

    def counting(completions, completion_ids, **kwargs):
        return [float(len(ids)) for ids in completion_ids]

    ids = [[[5, 6, 7], [8, 9]]]
    got = score_functions([TRLStyleReward(cutting, "cutting"), TRLStyleReward(counting, "counting")],
                          [["a", "b"]], [{"id": "q", "prompt": "1+1=", "answer": "2"}], ids)
    assert got == [[[1.0, 1.0]], [[3.0, 2.0]]] and ids == [[[5, 6, 7], [8, 9]]]


def test_reward_function_calling_sys_exit_is_a_one_line_error(tmp_path, monkeypatch):
    """sys.exit() (or exit()) in a reward function, of either kind, sync or async: SystemExit is no Exception, so
    it went past the one-line errors and ended the run with the function's code, 0 (a scheduler's success) for a
    bare sys.exit(), with no message and no final/. It is named like any other exception; a KeyboardInterrupt
    still stops the run (the test above)."""
    (tmp_path / "exiting_rewards.py").write_text(
        "import sys\n"
        "def ours(completion_text, answer):\n    sys.exit(0)\n"
        "def trl(completions, **kwargs):\n    sys.exit(3)\n"
        "async def awaited(completions, **kwargs):\n    sys.exit()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from rpo_engine.rewards import score_completions

    rows = [{"id": "a", "prompt": "p", "answer": "2"}]
    for fn, code, line in (("ours", 0, 3), ("trl", 3, 5), ("awaited", None, 7)):
        with pytest.raises(UserError) as e:
            score_completions(load_reward_fn(f"exiting_rewards:{fn}"), ["x"], rows)
        assert f"reward function 'exiting_rewards:{fn}' raised SystemExit with code {code!r} (a reward function " \
               f"returns its scores; sys.exit() would end the run) (" in str(e.value), str(e.value)
        assert f"exiting_rewards.py:{line};" in str(e.value)


def test_trl_style_async_function_raising_keyboard_interrupt_neither_hangs_nor_stops_the_loop():
    """A KeyboardInterrupt (or SystemExit) raised in an async reward function reaches the caller; before, it
    ended the event loop's thread, and this call and every later one waited forever."""
    import asyncio
    import concurrent.futures

    from rpo_engine.rewards.answers import TRLStyleReward, score_functions

    async def fine(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    async def interrupted(prompts, completions, **kwargs):
        await asyncio.sleep(0)
        raise KeyboardInterrupt

    rows = [{"prompt": "p", "answer": "1"}]
    calls = concurrent.futures.ThreadPoolExecutor(1)  # a hang fails the test, not the run
    first = calls.submit(score_functions, [TRLStyleReward(fine, "fine"), TRLStyleReward(interrupted, "interrupted")],
                         [["a", "b"]], rows)
    with pytest.raises(KeyboardInterrupt):
        first.result(timeout=5)
    assert calls.submit(score_functions, [TRLStyleReward(fine, "fine")], [["a"]], rows).result(timeout=5) == [[[1.0]]]
    calls.shutdown(wait=False)


def test_trl_style_reward_object_with_attributes_named_like_ours():
    """A reward class instance (async __call__) whose attributes are named `fn` and `name` is still what is
    called, under the name it was loaded by (functools.update_wrapper copied its __dict__ over ours)."""
    from rpo_engine.rewards.answers import TRLStyleReward, score_functions

    class Judge:
        def __init__(self):
            self.name, self.fn = "judge", lambda **kwargs: "not the reward"

        async def __call__(self, prompts, completions, trainer_state, **kwargs):
            return [float(trainer_state.global_step) + 0.5] * len(completions)

    reward = TRLStyleReward(Judge(), "judges.py:judge")
    assert reward.name == "judges.py:judge"
    assert score_functions([reward], [["a", "b"]], [{"prompt": "p", "answer": "1"}]) == [[[0.5, 0.5]]]


def test_trl_style_log_extra_nan_stays_valid_json():
    """log_extra values that JSON has no number for (NaN, inf; numpy's too, nested) are written as null, so
    completions.jsonl stays valid JSON."""
    import json

    import numpy as np

    from rpo_engine.rewards.answers import RewardLog, TRLStyleReward, score_functions

    def logs(prompts, completions, log_extra, log_metric, **kwargs):
        for i in range(50):
            log_metric("calls", np.float32(i))
        log_extra("judge_score", np.array([1.5, np.nan]))
        log_extra("details", [{"p": np.float64(np.inf), "ids": np.arange(2)}, (float("-inf"), b"x")])
        return np.array([0.5, 1.0])

    log = RewardLog()
    assert score_functions([TRLStyleReward(logs, "logs")], [["a", "b"]], [{"prompt": "p", "answer": "1"}],
                           log=log) == [[[0.5, 1.0]]]
    assert RewardLog.metric_means([log.metrics]) == {"calls": 24.5}
    assert json.loads(json.dumps(log.columns[0], allow_nan=False)) == {
        "judge_score": [1.5, None], "details": [{"p": None, "ids": [0, 1]}, [None, "b'x'"]]}


def test_trl_style_reward_objects_and_partials_are_named_as_trl_names_them():
    """The trainer's metric names (reward/NAME) for a TRL-style class instance and a functools.partial are TRL's
    get_callable_name: the class's name, the wrapped function's (not 'TRLStyleReward')."""
    import functools
    from types import SimpleNamespace

    from rpo_engine.rewards.answers import TRLStyleReward
    from rpo_engine.trainer import Trainer

    class Judge:
        def __call__(self, prompts, completions, **kwargs):
            return [1.0] * len(completions)

    def graded(prompts, completions, strict, **kwargs):
        return [1.0] * len(completions)

    trainer = SimpleNamespace(reward_fn=TRLStyleReward(Judge(), "judges.py:Judge"),
                              extra_rewards=[TRLStyleReward(functools.partial(graded, strict=True), "graded.py:strict"),
                                             TRLStyleReward(graded, "graded.py:graded")])
    assert Trainer.reward_names(trainer) == ["Judge", "graded_1", "graded_2"]


def test_reward_module_that_exits_on_import_is_a_one_line_error(tmp_path, monkeypatch):
    # a script with sys.exit() or argparse at module level: SystemExit is no Exception, and escaped the import
    # (`sys.exit()` ended the command with code 0, having done nothing)
    (tmp_path / "exits_quietly.py").write_text("import sys\nsys.exit()\ndef score(c, a):\n    return 1.0\n")
    (tmp_path / "parses_args.py").write_text("import sys\nsys.exit(2)\ndef score(c, a):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for path in ("exits_quietly:score", "parses_args:score", f"{tmp_path / 'exits_quietly.py'}:score"):
        with pytest.raises(UserError) as e:
            load_reward_fn(path)
        msg = str(e.value)
        assert path in msg and "cannot import" in msg and "SystemExit" in msg and "\n" not in msg, msg


def test_length_aware_accuracy_of_far_apart_lengths_does_not_overflow():
    from rpo_engine.rewards.shaping import length_aware_accuracy

    # 8k-token completions: one right answer ~7.2k tokens past its group's mean took math.exp past a float
    shaped = length_aware_accuracy([True] * 8, [100] * 7 + [8300], alpha=0.1)
    assert shaped[-1] == 0.5 and shaped[:7] == [1.0] * 7
    assert length_aware_accuracy([True, True, False], [10, 3000, 5], alpha=1.0) == [1.0, 0.5, 0.0]


def test_reward_model_with_broken_files_is_a_one_line_error(tmp_path, reward_model_dir):
    """A truncated safetensors file (SafetensorError, no OSError), a config.json that is no object, and a
    directory without tokenizer files (transformers 5 then makes an empty tokenizer, and the first scoring, a
    training step in, failed in the model) are each one line naming the reward model, at load."""
    import json
    import shutil

    from rpo_engine.rewards.model import RewardModel

    def variant(name, change):
        directory = tmp_path / name
        shutil.copytree(reward_model_dir, directory)
        change(directory)
        return directory

    weights = (reward_model_dir / "model.safetensors").read_bytes()
    cases = {
        "truncated": (lambda d: (d / "model.safetensors").write_bytes(weights[:500]), "cannot load"),
        "list_config": (lambda d: (d / "config.json").write_text(json.dumps([1])), "not a readable model config"),
        "no_tokenizer": (lambda d: [p.unlink() for p in d.iterdir() if p.name.startswith(("tokenizer", "special"))],
                         "tokenizer encodes no text"),
    }
    for name, (change, why) in cases.items():
        directory = variant(name, change)
        with pytest.raises(UserError) as e:
            RewardModel(str(directory)).score(["a"], [{"prompt": "p", "answer": "1"}])
        msg = str(e.value)
        assert str(directory) in msg and why in msg and "\n" not in msg, msg


def test_math_reward_reads_past_trailing_whitespace():
    # a completion that ran out its budget on newlines: its last 2000 characters held no answer at all
    for tail in ("\n" * 3000, " \n" * 1500, "\t" * 2500):
        assert math_answer_reward("So the total is 7" + tail, "7") == 1.0
        assert math_answer_reward("So the total is 7" + tail, "8") == 0.0
        assert math_answer_reward("7" + tail, "7") == 1.0


def test_a_reward_model_whose_chat_template_refuses_a_conversation_is_one_line(tmp_path, reward_model_dir):
    """A template's raise_exception (Mistral's "roles must alternate", one without a system role) while the reward
    model reads a conversation: a jinja2 TemplateError traceback in a training step before; one line naming it."""
    import shutil

    from rpo_engine.rewards.model import RewardModel

    strict = tmp_path / "rm_strict"
    shutil.copytree(reward_model_dir, strict)
    model = RewardModel(str(strict))
    model.tokenizer.chat_template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                                     "{{ raise_exception('System role not supported') }}{% endif %}"
                                     "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}")
    rows = [{"prompt": [{"role": "user", "content": "2+2="}], "answer": "4", "id": "a"},
            {"prompt": [{"role": "system", "content": "Box it."}, {"role": "user", "content": "2+2="}],
             "answer": "4", "id": "b"}]
    assert len(model.score([" 4"], rows[:1])) == 1
    with pytest.raises(UserError) as e:
        model.score([" 4", " 4"], rows)
    msg = str(e.value)
    assert str(strict) in msg and "System role not supported" in msg and "'b'" in msg and "\n" not in msg, msg


# ----------------------------------------------------------------------------- peer-comparison audit

def test_math_reward_gives_an_unclosed_thinking_block_no_credit():
    """A completion cut off inside its <think> block gave no answer: a draft box in the thinking is not one
    (TRL's reasoning_accuracy_reward scores it 0), or the experience cache kept a truncated path as verified."""
    m = math_answer_reward
    assert m("<think>\nSo maybe \\boxed{72}. Wait, let me re-check: 48 divided by", "72") == 0.0
    assert m("<think>a</think> draft \\boxed{5} <think>checking again: \\boxed{72}, and", "72") == 0.0
    assert m("<think>\nSo \\boxed{72}.\n</think>\nThe answer is \\boxed{72}.", "72") == 1.0
    assert m("No thinking at all: \\boxed{72}", "72") == 1.0


def test_math_reward_gives_an_unfinished_last_equation_no_credit():
    """A completion that stops at '=' (cut off before the result) stated no answer: math-verify read the left
    side (48 + 24) as the answer and verified it against 72."""
    m = math_answer_reward
    assert m("Let me compute 48/2 = 24 and then 48 + 24 =", "72") == 0.0
    assert m("So $48 + 24 =", "72") == 0.0
    assert m("So the answer is \\boxed{72}. Checking: 48 + 24 =", "72") == 1.0  # a box before it is the answer
    assert m("48/2 = 24, and 48 + 24 = 72", "72") == 1.0


def test_math_reward_reads_a_reference_given_as_a_number():
    """JSON gives a dataset's numeric answers as int / float; str(1e-05) is '1e-05', which math-verify read as 1
    (so every right answer scored 0 and the answer 1 scored 1)."""
    m = math_answer_reward
    assert m("\\boxed{72}", 72) == 1.0 and m("\\boxed{72}", 72.0) == 1.0 and m("\\boxed{0.5}", 0.5) == 1.0
    assert m("\\boxed{0.00001}", 1e-05) == 1.0 and m("\\boxed{1}", 1e-05) == 0.0
    assert m("\\boxed{\\frac{1}{100000}}", 1e-05) == 1.0
    assert m("#### 100000000000000000000", 1e20) == 1.0 and m("\\boxed{1}", 1e20) == 0.0
    assert m("\\boxed{0.00001}", "1e-05") == 1.0
    assert exact_answer_reward("#### 18", 18.0) == 1.0 and exact_answer_reward("#### 0.00001", 1e-05) == 1.0


def test_math_reward_in_a_thread_is_bounded_in_time():
    """math-verify's timeouts are signal alarms, which work in the main thread only: in another thread (train() in
    a framework's worker thread) a tower of powers held the step for ever, and the GIL with it. There it runs in
    a helper process, where they work, killed past a deadline."""
    import subprocess
    import sys

    code = ("import threading, time\n"
            "from rpo_engine.rewards import math_answer_reward as m\n"
            "out = []\n"
            "def run():\n"
            "    out.append(m('\\\\boxed{10^{10^{10}}}', '5'))\n"
            "    t = time.monotonic(); out.append(m('\\\\boxed{9^{9^{9}}}', '5')); out.append(time.monotonic() - t)\n"
            "    out.append(m('\\\\boxed{\\\\frac{2}{4}}', '1/2'))\n"
            "th = threading.Thread(target=run); th.start(); th.join()\n"
            "print(out)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("a tower of powers held math_answer_reward in a thread past 120 s")
    assert done.returncode == 0, done.stderr[-2000:]
    first, second, seconds, third = eval(done.stdout.strip().splitlines()[-1])
    assert (first, second, third) == (0.0, 0.0, 1.0) and seconds < 30


def test_math_reward_helper_agrees_with_the_main_thread_and_is_killed_past_its_deadline(monkeypatch):
    """Outside the main thread the same verdicts come from the helper process; one that does not answer by the
    deadline is killed, that answer scores 0, and the next call starts a new one."""
    from rpo_engine.rewards import answers

    cases = [("\\boxed{\\frac{2}{4}}", "1/2"), ("\\boxed{3}", "1/2"), ("#### x^2 + 2x + 1", "(x+1)^2"),
             ("so \\boxed{\\$1.17}", "\\$1.17"), ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]"), ("\\boxed{2, -3}", "-3, 2"),
             ("The answer is $x = 3$.", "3"), ("\\boxed{5} or \\boxed{6}", "5")]

    def in_a_thread(fn):
        out = []
        th = threading.Thread(target=lambda: out.append(fn()))
        th.start(); th.join()
        return out[0]

    expected = [math_answer_reward(c, a) for c, a in cases]
    assert expected == [1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert in_a_thread(lambda: [math_answer_reward(c, a) for c, a in cases]) == expected
    helper = answers._HELPER.process
    monkeypatch.setattr(answers._MathVerifyHelper, "DEADLINE_S", 0.2)  # \boxed{10^{10^{10}}} takes its 2 s timeout
    assert in_a_thread(lambda: math_answer_reward("\\boxed{10^{10^{10}}}", "5")) == 0.0
    assert answers._HELPER.process is None and helper.poll() is not None  # killed
    monkeypatch.undo()
    assert in_a_thread(lambda: math_answer_reward("\\boxed{\\frac{2}{4}}", "0.5")) == 1.0


def test_math_reward_reads_latex_spaced_thousands():
    """1\\,000 (a thin space between digit groups, as LaTeX typesets thousands) is 1000: math-verify read it as 1*0,
    so it scored 0 against 1000 and 1 against 0."""
    m = math_answer_reward
    for written in ("\\boxed{1\\,000}", "\\boxed{1\\ 000}", "\\boxed{1~000}", "The total is $1\\,000$."):
        assert m(written, "1000") == 1.0 and m(written, "0") == 0.0, written
    assert m("\\boxed{1\\,000\\,000}", "10^6") == 1.0 and m("\\boxed{1000}", "1\\,000") == 1.0
    assert m("\\boxed{2\\,x}", "2x") == 1.0 and m("\\boxed{(1,\\,234)}", "(1,234)") == 1.0  # other thin spaces stay


def test_math_reward_helper_outlives_the_thread_that_started_it():
    """The helper's end-with-the-caller was PR_SET_PDEATHSIG, which fires when the *thread* that started it ends:
    a thread's last call killed it, so the next thread paid a restart (the torch import), and a call already
    under way in another thread found it dead and scored a right answer 0."""
    from rpo_engine.rewards import answers

    def in_a_thread():
        out = []
        th = threading.Thread(target=lambda: out.append(math_answer_reward("\\boxed{\\frac{2}{4}}", "1/2")))
        th.start(); th.join()
        return out[0]

    assert in_a_thread() == 1.0
    helper = answers._HELPER.process
    time.sleep(0.5)
    assert helper.poll() is None and in_a_thread() == 1.0 and answers._HELPER.process is helper


def test_math_reward_helper_that_cannot_start_is_not_restarted_on_every_call(monkeypatch):
    """A helper that cannot start (its python cannot import rpo_engine, or hangs in its import) was started again
    on every later call, each paying the start (up to START_DEADLINE_S, 300 s, for one that hangs): a step of
    many completions stalled by minutes. One failed start is warned about, and the next waits RETRY_AFTER_S."""
    import subprocess
    import sys

    from rpo_engine.rewards import answers

    started = []
    real_popen = subprocess.Popen

    def cannot_import(args, **kwargs):
        started.append(args)
        return real_popen([sys.executable, "-c", "raise SystemExit(1)"], **kwargs)

    answers._HELPER._stop()
    monkeypatch.setattr(subprocess, "Popen", cannot_import)
    monkeypatch.setattr(answers, "_HELPER", answers._MathVerifyHelper())
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        th = threading.Thread(target=lambda: out.extend(math_answer_reward("\\boxed{\\frac{2}{4}}", "1/2")
                                                         for _ in range(3)))
        th.start(); th.join()
    assert out == [0.0, 0.0, 0.0] and len(started) == 1
    assert sum("math-verify helper" in str(w.message) for w in caught) == 1


def test_math_reward_helper_imports_the_callers_rpo_engine_not_the_one_in_its_cwd(tmp_path, monkeypatch):
    """The helper ran `python -c`, whose sys.path starts with the cwd: a caller run from a directory holding
    another rpo_engine (an older checkout) had a helper import that one, and scored every answer 0."""
    from rpo_engine.rewards import answers

    (tmp_path / "rpo_engine").mkdir()
    (tmp_path / "rpo_engine" / "__init__.py").write_text("raise ImportError('another checkout')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(answers, "_HELPER", answers._MathVerifyHelper())
    out = []
    th = threading.Thread(target=lambda: out.append(math_answer_reward("\\boxed{\\frac{2}{4}}", "1/2")))
    th.start(); th.join()
    answers._HELPER._stop()
    assert out == [1.0]



@pytest.mark.parametrize("held", ["between its write and its flush", "in its flush"])
def test_math_reward_helper_in_a_child_forked_during_a_call(monkeypatch, held):
    """A child forked while another thread was mid-call inherited the held lock, so its first call off the main
    thread waited for ever, and the parent's helper and pipes: a child that dropped them flushed its copy of a
    request written but not yet flushed into the parent's helper, whose extra answer the parent's next call then
    read, and one that kept them (the dead thread's frames hold what they used) kept the helper's stdin open past
    the parent's end. The child gets a fresh lock and a helper of its own; the parent's helper answers the parent
    right and ends with its stdin."""
    import inspect
    import os
    import select
    import sys

    from rpo_engine.rewards import answers

    def in_a_thread(completion, answer):
        out = []
        th = threading.Thread(target=lambda: out.append(math_answer_reward(completion, answer)))
        th.start(); th.join()
        return out[0]

    helper = answers._MathVerifyHelper()
    monkeypatch.setattr(answers, "_HELPER", helper)
    assert in_a_thread("\\boxed{\\frac{2}{4}}", "1/2") == 1.0
    written, release = threading.Event(), threading.Event()

    def hold():
        written.set()
        release.wait(60)

    class FlushHeld:  # the helper's stdin, held in its flush: the call's frames hold it
        def __init__(self, pipe):
            self.pipe = pipe

        def write(self, text):
            return self.pipe.write(text)

        def flush(self):
            hold()
            self.pipe.flush()

        def fileno(self):
            return self.pipe.fileno()

    lines, first = inspect.getsourcelines(answers._MathVerifyHelper.verdict)
    flush_line = first + next(i for i, line in enumerate(lines) if ".stdin.flush()" in line)

    def at_the_flush_line(frame, event, arg):  # held with no frame holding the pipe, as a thread switch leaves it
        if frame.f_code is answers._MathVerifyHelper.verdict.__code__:
            if event == "line" and frame.f_lineno == flush_line:
                hold()
            return at_the_flush_line
        return None

    def call():
        if held == "in its flush":
            helper.process.stdin = FlushHeld(helper.process.stdin)
        else:
            sys.settrace(at_the_flush_line)
        parent_out.append(math_answer_reward("\\boxed{3}", "1/2"))

    parent_out = []
    caller = threading.Thread(target=call)
    caller.start()
    assert written.wait(60)
    report_read, report_write = os.pipe()
    exit_read, exit_write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            child_out = []
            th = threading.Thread(target=lambda: child_out.append(
                math_answer_reward("\\boxed{\\frac{2}{4}}", "1/2")), daemon=True)
            th.start(); th.join(60)
            os.write(report_write, repr(child_out).encode())
            os.read(exit_read, 1)  # alive (holding whatever it kept) until the parent has checked its helper
        finally:
            os._exit(0)
    os.close(report_write); os.close(exit_read)
    try:
        ready, _, _ = select.select([report_read], [], [], 90)
        child_out = os.read(report_read, 100).decode() if ready else "no report in 90 s"
        release.set(); caller.join()
        if isinstance(helper.process.stdin, FlushHeld):
            helper.process.stdin = helper.process.stdin.pipe
        assert child_out == "[1.0]" and parent_out == [0.0]
        assert in_a_thread("\\boxed{\\frac{2}{4}}", "1/2") == 1.0 and in_a_thread("\\boxed{5}", "1/2") == 0.0
        process = helper.process
        process.stdin.close()
        assert process.wait(timeout=30) is not None  # EOF on its stdin: no copy of the write end left in the child
    finally:
        release.set()
        os.write(exit_write, b"x"); os.close(exit_write); os.close(report_read)
        os.waitpid(pid, 0)
        helper._stop()


def test_math_reward_helper_answers_right_when_its_libraries_write_to_stdout(monkeypatch):
    """The helper answered on its stdout, where C code (or a library writing to fd 1) in math-verify's parsers
    wrote too: the caller read that as an answer, and the answers after it belonged to earlier calls. Answers
    go out on a private copy of fd 1, and fd 1 itself to stderr."""
    import subprocess

    from rpo_engine.rewards import answers

    noisy_helper = ("import os, sys; sys.path[0] = sys.argv[1]\n"
                    "from rpo_engine.rewards import answers\n"
                    "verdict = answers._math_verify_verdict\n"
                    "def noisy_verdict(*args):\n"
                    "    os.write(1, b'1.0\\n0.0\\nunfinished line, ')\n"
                    "    return verdict(*args)\n"
                    "answers._math_verify_verdict = noisy_verdict\n"
                    "answers._serve_math_verify()\n")
    real_popen, started = subprocess.Popen, []

    def noisy(args, **kwargs):  # the helper's command, its code run after noisy_helper's patch
        assert args[1] == "-c" and "_serve_math_verify()" in args[2]
        started.append(args)
        return real_popen([args[0], "-c", noisy_helper, *args[3:]], **kwargs)

    monkeypatch.setattr(subprocess, "Popen", noisy)
    monkeypatch.setattr(answers, "_HELPER", answers._MathVerifyHelper())
    cases = [("\\boxed{\\frac{2}{4}}", "1/2"), ("\\boxed{3}", "1/2"), ("#### x^2 + 2x + 1", "(x+1)^2"),
             ("\\boxed{5} or \\boxed{6}", "5"), ("\\boxed{(-\\infty, 3]}", "(-\\infty,3]"), ("\\boxed{2}", "x")]
    out = []
    th = threading.Thread(target=lambda: out.extend(math_answer_reward(c, a) for c, a in cases))
    th.start(); th.join()
    answers._HELPER._stop()
    assert out == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0] and len(started) == 1  # one helper answered them all


def test_math_reward_helper_ends_quietly_when_its_caller_ends_mid_call():
    """A caller that ended (killed, or Ctrl-C) while the helper worked on a call left it to write the answer
    into a pipe nobody read: a BrokenPipeError traceback on the terminal after the caller had gone. It ends
    quietly."""
    import subprocess
    import sys

    code = ("import os, threading, time\n"
            "from rpo_engine.rewards import answers, math_answer_reward as m\n"
            "threading.Thread(target=lambda: m('\\\\boxed{\\\\frac{2}{4}}', '1/2'), daemon=True).start()\n"
            "while answers._HELPER.process is None or not answers._HELPER.lock.locked(): time.sleep(0.01)\n"
            "while answers._HELPER.lock.locked(): time.sleep(0.01)\n"
            "threading.Thread(target=lambda: m('\\\\boxed{10^{10^{10}}}', '5'), daemon=True).start()\n"
            "while not answers._HELPER.lock.locked(): time.sleep(0.01)\n"
            "time.sleep(0.5)\n"  # the helper at work on the tower: its 2 s timeout
            "print(answers._HELPER.process.pid, flush=True)\n"
            "os._exit(0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr[-2000:]  # to its end: the helper's too
    assert process_ended(int(done.stdout), 30)


def test_math_reward_helper_killed_past_its_deadline_has_its_pipes_closed(monkeypatch):
    """A helper killed past its deadline was dropped with its pipes open, left to the garbage collector: a
    ResourceWarning for each (under -W default, -X dev). They are closed with it."""
    from rpo_engine.rewards import answers

    monkeypatch.setattr(answers, "_HELPER", answers._MathVerifyHelper())
    monkeypatch.setattr(answers._MathVerifyHelper, "DEADLINE_S", 0.2)  # \boxed{10^{10^{10}}} takes its 2 s timeout
    out = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        th = threading.Thread(target=lambda: out.append(math_answer_reward("\\boxed{10^{10^{10}}}", "5")))
        th.start(); th.join()
    assert out == [0.0] and answers._HELPER.process is None
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
