"""Options and config files: a mistake in them is a one-line UserError naming the file or option."""
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from rpo_engine.config import build_parser, parse_args, reward_weights
from rpo_engine.data.datasets import load_dataset_rows
from rpo_engine.errors import UserError
from tests.helpers import process_ended
from tests.reward_fns import hash_reward

REPO = Path(__file__).resolve().parent.parent


def _config_error(tmp_path, text: str | bytes) -> str:
    """The one-line error of `--config` with a file holding `text`."""
    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(UserError) as e:
        parse_args(["--config", str(cfg)])
    message = str(e.value)
    assert "\n" not in message and str(cfg) in message, message
    return message


def test_help_says_grpo_epsilon_high_follows_epsilon():
    text = " ".join(build_parser().format_help().split())  # argparse wraps the help text
    assert "--epsilon-high EPSILON_HIGH upper clip range (default: grpo the same as --epsilon, dapo 0.28)" in text


@pytest.mark.parametrize("flags,want", [
    ([], (0.2, 0.2, "seq-mean-token-mean", False)),
    (["--epsilon", "0.1"], (0.1, 0.1, "seq-mean-token-mean", False)),  # grpo's epsilon_high follows --epsilon
    (["--algo", "dapo"], (0.2, 0.28, "token-mean", True)),
    (["--algo", "dapo", "--epsilon-high", "0.3", "--loss-agg", "seq-mean-token-mean", "--no-dynamic-sampling"],
     (0.2, 0.3, "seq-mean-token-mean", False)),
    (["--loss-type", "bnpo"], (0.2, 0.2, "token-mean", False)),
    (["--loss-type", "dapo"], (0.2, 0.2, "token-mean", False)),  # TRL's aggregation only, not --algo dapo
    (["--loss-type", "dr_grpo"], (0.2, 0.2, "seq-mean-token-sum-norm", False)),
    (["--loss-type", "luspo"], (0.2, 0.2, "seq-mean-token-sum", False)),
    (["--loss-type", "sapo"], (0.2, 0.2, "seq-mean-token-mean", False)),
    (["--loss-type", "vespo"], (0.2, 0.2, "token-mean", False)),
    (["--loss-type", "cispo", "--epsilon-high", "5"], (0.2, 5.0, "token-mean", False))])
def test_algo_defaults_resolve_per_algo_and_loss_type(flags, want):
    """What --algo and --loss-type leave unset resolves as the help and README say: (epsilon, epsilon_high,
    loss_agg, dynamic_sampling); the loss's upper clip is epsilon_high, CISPO's cap epsilon_high itself."""
    algo = parse_args(flags).algo
    assert (algo.epsilon, algo.epsilon_high, algo.loss_agg, algo.dynamic_sampling) == want
    assert algo.loss_eps_high == (want[1] - 1 if "cispo" in flags else want[1])


def test_help_lists_every_option_once_by_section():
    """--help groups the ~100 options by what they set (an option added without a group fails to build the
    parser), each listed once, under a one-line usage."""
    from rpo_engine.config import HELP_GROUPS, _flat_fields

    parser = build_parser()
    text = parser.format_help()
    assert text.startswith("usage: python -m rpo_engine.train [options]\n")
    flags = ["--" + f.name.replace("_", "-") for _, f in _flat_fields()]
    listed = re.findall(r"^  (--[a-z0-9-]+)", text, flags=re.M)
    assert sorted(listed) == sorted(flags) and len(flags) == len(set(flags)) > 90
    titles = [g.title for g in parser._action_groups if g._group_actions and g.title != "options"]
    assert titles == [members[0] if key in ("rpo", "algo") else key for key, members in HELP_GROUPS.items()]
    for group in parser._action_groups:  # RPO's options under RPO, the algorithm's under algorithm
        options = {a.dest for a in group._group_actions}
        if group.title == "RPO":
            assert "rpo_max_cut" in options and "epsilon" not in options
        if group.title == "algorithm":
            assert {"epsilon", "beta", "loss_type"} <= options and "rpo" not in options


def test_help_sections_hold_each_top_level_option_once(monkeypatch):
    """HELP_GROUPS' sections hold every top-level option (the rpo and algo sections aside) exactly once, by what it
    sets (the dataset options under model and data, --report-to with logging); an option left out of them fails
    build_parser with its name, rather than landing in some section."""
    from rpo_engine import config

    members = [m for title, ms in config.HELP_GROUPS.items() if title not in config.SECTIONS for m in ms]
    assert sorted(members) == sorted(f.name for section, f in config._flat_fields() if section is None)
    assert {"dataset_config", "dataset_train_split", "dataset_test_split", "dataset_prompt_column",
            "dataset_answer_column"} <= set(config.HELP_GROUPS["model and data"])
    assert "report_to" in config.HELP_GROUPS["evaluation, checkpoints and logging"]
    monkeypatch.setitem(config.HELP_GROUPS, "run", ("output", "resume", "resume_from_checkpoint", "config", "steps"))
    with pytest.raises(KeyError, match="seed"):
        config.build_parser()


def _ignores_sigint(pid: int, signum: int = signal.SIGINT) -> bool:
    status = open(f"/proc/{pid}/status").read()
    mask = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16)
    return bool(mask & (1 << (signum - 1)))


def test_reward_workers_leave_ctrl_c_to_the_trainer(capfd):
    """A terminal's Ctrl-C reaches every process of the group: the workers ignore it (the trainer's process
    stops the pool) instead of each printing its own KeyboardInterrupt traceback and dying."""
    from rpo_engine.rewards.pool import RewardPool

    with RewardPool({0: "tests.reward_fns:hash_reward"}, workers=2) as pool:
        assert pool.score(0, ["a", "b"], ["1", "1"]) == [hash_reward("a", "1"), hash_reward("b", "1")]
        processes = list(pool.processes)
        deadline = time.monotonic() + 30
        while not all(_ignores_sigint(p.pid) for p in processes) and time.monotonic() < deadline:
            time.sleep(0.1)  # a worker still starting up
        for process in processes:
            os.kill(process.pid, signal.SIGINT)
        time.sleep(0.5)
        assert all(p.is_alive() for p in processes)
        assert pool.score(0, ["c"], ["1"]) == [hash_reward("c", "1")]
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def _signal_state(pid: int, signum: int) -> dict:
    fields = dict(line.split(":\t", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":\t" in line)
    return {key: bool(int(fields[key], 16) & (1 << (signum - 1))) for key in ("SigBlk", "SigIgn", "SigCgt")}


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGUSR1])
def test_ctrl_c_while_the_reward_workers_start_leaves_them_scoring(capfd, signum):
    """A Ctrl-C (or SLURM's SIGUSR1) that reaches the process group in the seconds the workers spend starting (the
    first scoring call: spawn imports torch and rpo_engine before _start_worker ignores it) killed each with a
    KeyboardInterrupt traceback, and the run, asked to stop after its step, failed on a 'died while scoring' error."""
    from rpo_engine.rewards.pool import RewardPool

    sent, scored = [], threading.Event()

    def interrupt_each_worker_once_python_runs():
        deadline = time.monotonic() + 60
        while len(sent) < 2 and not scored.is_set() and time.monotonic() < deadline:
            for process in list(pool.processes):
                try:
                    state = _signal_state(process.pid, signal.SIGINT)
                    cmdline = open(f"/proc/{process.pid}/cmdline").read()
                except (FileNotFoundError, ProcessLookupError):
                    continue
                # exec'd into the spawned interpreter, past its startup: Ctrl-C blocked, ignored or caught (Python's
                # KeyboardInterrupt) -- sooner, SIGUSR1's default action would end even a worker that goes on to ignore it
                if process.pid not in sent and "spawn_main" in cmdline and any(state.values()):
                    os.kill(process.pid, signum)
                    sent.append(process.pid)
            time.sleep(0.005)

    with RewardPool({0: "tests.reward_fns:hash_reward"}, workers=2) as pool:
        killer = threading.Thread(target=interrupt_each_worker_once_python_runs)
        killer.start()
        try:
            scores = pool.score(0, ["a", "b", "c", "d"], ["1"] * 4)
        finally:
            scored.set()
            killer.join()
        assert len(sent) == 2
        assert scores == [hash_reward(t, "1") for t in "abcd"]
    assert "KeyboardInterrupt" not in capfd.readouterr().err


def _script_with_a_pool(tmp_path, then: str):
    """A script of its own process that starts a 2-worker pool, scores, prints the workers' pids, then runs `then`.
    -> (its process, the pids)."""
    script = tmp_path / "pooled.py"
    script.write_text("from rpo_engine.rewards.pool import RewardPool\n"
                      "if __name__ == '__main__':\n"
                      "    pool = RewardPool({0: 'tests.reward_fns:hash_reward'}, workers=2)\n"
                      "    pool.score(0, ['a', 'b', 'c', 'd'], ['1'] * 4)\n"
                      "    print(*[p.pid for p in pool.processes], flush=True)\n" + then)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    pids = [int(pid) for pid in proc.stdout.readline().split()]
    assert len(pids) == 2
    return proc, pids


def test_reward_workers_leave_sigusr1_to_the_trainer_and_end_when_it_is_killed(tmp_path):
    """SLURM's --signal=USR1 reaches every process of the job: the workers ignore it (the trainer stops after its
    step). A trainer killed outright (SIGKILL, the OOM killer) shuts nothing down: its workers, which would wait
    for work for ever, end within seconds."""
    proc, pids = _script_with_a_pool(tmp_path, then="    import time; time.sleep(60)\n")
    try:
        deadline = time.monotonic() + 30
        while not all(_ignores_sigint(pid, signal.SIGUSR1) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in pids:
            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)
        assert not any(process_ended(pid, 1) for pid in pids)  # alive a second later
        proc.kill()
        proc.wait()
        assert all(process_ended(pid, 10) for pid in pids)
    finally:
        proc.kill()


def test_a_script_that_leaves_its_reward_pool_open_still_exits(tmp_path):
    """A pool nobody closed (a notebook's, a script's that returns early) must not hold its process at exit:
    multiprocessing's exit hook joins live workers, which wait for work for ever."""
    proc, pids = _script_with_a_pool(tmp_path, then="")  # and returns, the pool open
    try:
        assert proc.wait(timeout=30) == 0
        assert all(process_ended(pid, 10) for pid in pids)
    finally:
        proc.kill()


def test_reward_workers_of_a_trainer_killed_mid_chunk_end_quietly(tmp_path):
    """A trainer killed outright while its workers score: each finished its chunk, and its reply to the pool that
    was gone failed on a BrokenPipeError traceback in the user's terminal, one a worker."""
    script = tmp_path / "killed.py"
    script.write_text("from rpo_engine.rewards.pool import RewardPool\n"
                      "if __name__ == '__main__':\n"
                      "    pool = RewardPool({0: 'tests.reward_fns:slow_reward'}, workers=2)\n"
                      "    pool.score(0, ['x'], ['1'])\n"
                      "    print(*[p.pid for p in pool.processes], flush=True)\n"
                      "    pool.score(0, ['x'] * 8, ['1'] * 8)\n")  # chunks of 1 text, 0.5 s each
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        pids = [int(pid) for pid in proc.stdout.readline().split()]
        assert len(pids) == 2
        time.sleep(0.25)  # inside their first chunks
        proc.kill()
        proc.wait()
        assert all(process_ended(pid, 10) for pid in pids)
        assert "Traceback" not in proc.stderr.read()  # the workers' stderr is the script's
    finally:
        proc.kill()


def test_a_forked_copy_of_the_trainer_leaves_its_reward_workers_alone(tmp_path):
    """A process forked from one with a reward pool (os.fork) ran the pool's exit hook when it ended, and stopped its
    parent's workers: every later call was scored in the parent's process, said as a SIGTERM from outside."""
    script = tmp_path / "forks.py"
    script.write_text("import os, sys\n"
                      "from rpo_engine.rewards.pool import RewardPool\n"
                      "if __name__ == '__main__':\n"
                      "    pool = RewardPool({0: 'tests.reward_fns:hash_reward'}, workers=2)\n"
                      "    pool.score(0, ['a', 'b'], ['1', '1'])\n"
                      "    child = os.fork()\n"
                      "    if child == 0:\n"
                      "        sys.exit(0)  # a normal end runs the exit hooks\n"
                      "    os.waitpid(child, 0)\n"
                      "    print(all(p.is_alive() for p in pool.processes), pool.score(0, ['a', 'e'], ['1', '1']))\n"
                      "    pool.close()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, cwd=REPO, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split(maxsplit=1) == ["True", f"{[hash_reward('a', '1'), hash_reward('e', '1')]}\n"]
    assert "SIGTERM" not in done.stderr


def test_ctrl_c_while_scoring_stops_the_reward_workers_at_once(monkeypatch):
    """The workers ignore Ctrl-C, so an interrupt of the trainer's process in the middle of a scoring call
    stops them there, instead of leaving them to work through every queued chunk (10 s here); quietly, and for
    good: a later call says the pool is closed."""
    from rpo_engine.rewards.pool import RewardPool

    thread_errors = []
    monkeypatch.setattr(threading, "excepthook", lambda args: thread_errors.append(args.exc_value))
    pool = RewardPool({0: "tests.reward_fns:slow_reward"}, workers=2)
    # Ctrl-C's Python handler, also where the suite was started with SIGINT ignored (`cmd &` in a script)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert pool.score(0, ["x"], ["1"]) == [0.0]  # the workers are up
        processes = list(pool.processes)
        assert len(processes) == 2
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
        start = time.perf_counter()
        with pytest.raises(KeyboardInterrupt):
            pool.score(0, ["x"] * 40, ["1"] * 40)
        assert time.perf_counter() - start < 5
        assert all(process_ended(p.pid, 5) for p in processes)
        assert thread_errors == [] and pool.processes == []
        with pytest.raises(RuntimeError, match="this reward pool is closed"):
            pool.score(0, ["x"], ["1"])
    finally:
        pool.close(wait=False)
        signal.signal(signal.SIGINT, previous)


def test_config_file_that_is_not_utf8_or_not_a_file(tmp_path):
    message = _config_error(tmp_path, b"steps: 1\nseed: \xff\xfe\n")
    assert message.endswith("c.yaml:2: not valid UTF-8 (a config file is UTF-8 YAML)")
    (tmp_path / "d.yaml").mkdir()
    with pytest.raises(UserError, match="d.yaml: is a directory, not a config file"):
        parse_args(["--config", str(tmp_path / "d.yaml")])
    cfg = tmp_path / "bom.yaml"
    cfg.write_bytes("\ufeffsteps: 3\n".encode())  # a byte-order mark is still UTF-8
    assert parse_args(["--config", str(cfg)]).steps == 3


def test_config_key_given_twice(tmp_path):
    message = _config_error(tmp_path, "steps: 1\nseed: 2\nsteps: 2\n")
    assert message.endswith("c.yaml:3: key 'steps' given twice (give each option once)")
    nested = _config_error(tmp_path, "rpo:\n  rpo_max_cut: 5\n  rpo_max_cut: 6\n")
    assert "c.yaml:3: key 'rpo_max_cut' given twice" in nested
    # the same option by another spelling or at another level
    assert "option rpo_max_cut given twice" in _config_error(tmp_path, "rpo_max_cut: 5\nrpo:\n  rpo_max_cut: 6\n")
    assert "option rpo_max_cut given twice" in _config_error(tmp_path, "rpo-max-cut: 5\nrpo_max_cut: 6\n")
    # YAML's merge key sets defaults that a mapping's own keys override: not a repetition
    cfg = tmp_path / "merge.yaml"
    cfg.write_text("algo:\n  <<: {beta: 0.1, epsilon: 0.3}\n  epsilon: 0.25\n")
    config = parse_args(["--config", str(cfg)])
    assert (config.algo.beta, config.algo.epsilon) == (0.1, 0.25)


@pytest.mark.parametrize("text, key", [("1: 2\n", "key 1 "), ("null: 3\n", "key null "),
                                       ("steps: 1\ntrue: 3\n", "key true "), ("rpo:\n  1: 2\n", "rpo: key 1 ")])
def test_config_key_that_is_not_a_string(tmp_path, text, key):
    assert f"{key}is not an option name" in _config_error(tmp_path, text)


@pytest.mark.parametrize("text, message", [
    # YAML values JSON has no type for: json.dumps raised a TypeError traceback
    ("chat_template_kwargs: {day: 2024-01-01}\n", "chat_template_kwargs must be a JSON-like mapping"),
    ("chat_template_kwargs: {data: !!binary aGVsbG8=}\n", "chat_template_kwargs must be a JSON-like mapping"),
    ("stop: [2024-01-01]\n", "stop must be a list of strings"),
    # an integer past a float's range: float() raised an OverflowError traceback
    ("learning_rate: 1" + "0" * 400 + "\n", "learning_rate must be a number"),
])
def test_config_value_of_a_type_no_option_takes(tmp_path, text, message):
    assert message in _config_error(tmp_path, text)


@pytest.mark.parametrize("text", ["0\n", "false\n", "[steps]\n"])
def test_config_document_that_is_not_a_mapping(tmp_path, text):
    assert "expected a mapping of option: value" in _config_error(tmp_path, text)


@pytest.mark.parametrize("flags", [[], ["--algo", "dapo"], ["--loss-type", "sapo"], ["--algo", "dapo", "--loss-type", "vespo"],
                                   ["--loss-type", "cispo", "--epsilon-high", "5"], ["--use-peft", "--lora-r", "4"]])
def test_a_runs_config_json_is_a_config_file(tmp_path, flags):
    """A run's config.json (every option, as resolved, and `config: null`) fed back as --config is the same run."""
    import json

    from rpo_engine.config import config_to_dict

    recorded = config_to_dict(parse_args(flags))
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    again = config_to_dict(parse_args(["--config", str(tmp_path / "config.json")]))
    assert again == {**recorded, "config": str(tmp_path / "config.json")}


def test_a_resumed_runs_config_json_fed_back_does_not_resume(tmp_path):
    """A resumed run records `resume: true`; fed back (`--config runs/x/config.json --output runs/y`) that was an
    act on runs/x, not an option to repeat: it resumed whatever run runs/y held, where a command without --resume
    is refused there ("already holds a run"). --resume on the command line still resumes."""
    import json

    from rpo_engine.config import config_to_dict

    record = tmp_path / "config.json"
    record.write_text(json.dumps(config_to_dict(parse_args(["--resume", "--output", str(tmp_path / "x")]))))
    assert parse_args(["--config", str(record), "--output", str(tmp_path / "y")]).resume is False
    assert parse_args(["--config", str(record), "--resume"]).resume is True
    (tmp_path / "run.yaml").write_text("resume: true\n")  # a config file a user wrote: its resume is an option
    assert parse_args(["--config", str(tmp_path / "run.yaml")]).resume is True


def test_the_config_json_of_a_copied_or_moved_run_names_no_other_runs_output(tmp_path):
    """A run's config.json records its --output as an absolute path. Read from a copy of the run (the README's way
    to branch a run off) or from the run moved elsewhere, `--config COPY/config.json --resume` went on with the
    ORIGINAL run (its final/ replaced, its log extended with the copy's options) or started a new one where the
    run no longer is: refused, naming both directories; --output given, or the record read from its own run's
    directory, or from a file that is not in a run's directory, are as before."""
    import json

    from rpo_engine.config import config_to_dict

    run, copy = tmp_path / "runs" / "x", tmp_path / "runs" / "branch"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(config_to_dict(parse_args(["--output", str(run)]))))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    shutil.copytree(run, copy)
    assert parse_args(["--config", str(run / "config.json"), "--resume"]).output == str(run.resolve())
    with pytest.raises(UserError, match=re.escape(
            f"--config {copy / 'config.json'}: the record of the run in {run.resolve()}, read from another run's "
            f"directory (a copy, or the run moved?); pass --output {copy} to go on with this one")):
        parse_args(["--config", str(copy / "config.json"), "--resume"])
    assert parse_args(["--config", str(copy / "config.json"), "--resume", "--output", str(copy)]).output == str(copy)
    alone = tmp_path / "configs"
    alone.mkdir()
    shutil.copy(run / "config.json", alone / "config.json")  # a record kept as a config file: its --output stands
    assert parse_args(["--config", str(alone / "config.json")]).output == str(run.resolve())


def test_config_file_naming_another_config_file(tmp_path):
    assert "config: other.yaml: nested config files are not supported" in _config_error(
        tmp_path, "steps: 1\nconfig: other.yaml\n")


def test_the_config_json_of_a_run_started_from_a_yaml_file_is_a_config_file(tmp_path):
    """A run started with --config run.yaml records `config: run.yaml` among its resolved options; fed back (the
    README's `--config runs/x/config.json`), that line is where the options came from, not a file to read again:
    it was refused as a nested config file."""
    import dataclasses
    import json

    from rpo_engine.config import config_to_dict

    (tmp_path / "run.yaml").write_text("steps: 3\nalgo: dapo\n")
    run = parse_args(["--config", str(tmp_path / "run.yaml"), "--seed", "2", "--output", str(tmp_path.resolve())])
    record = tmp_path / "config.json"
    record.write_text(json.dumps(config_to_dict(run)))
    again = parse_args(["--config", str(record)])
    assert dataclasses.replace(again, config=run.config) == run


@pytest.mark.parametrize("value, want", [("2", [2.0]), ("0.5", [0.5]), ("[2]", [2.0]), ("'2'", [2.0])])
def test_config_reward_weights_as_a_number(tmp_path, value, want):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"reward_weights: {value}\n")
    flag = parse_args(["--reward-weights", value.strip("[]'")])
    assert reward_weights(parse_args(["--config", str(cfg)])) == want == reward_weights(flag)


def test_config_mistake_on_the_command_line_is_one_line(tmp_path):
    # the run's exit code and output for a YAML mistake (an integer key was an AttributeError traceback)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("1: 2\n")
    proc = subprocess.run([sys.executable, "-m", "rpo_engine.train", "--config", str(cfg), "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {cfg}: key 1 is not an option name (option names are strings)\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("line, what", [
    ('{"prompt": "x", "answer": "1"}\n{"prompt": "2 + \\ud800", "answer": "1"}',
     "d.jsonl:2: 'prompt' holds '\\ud800' at character 5"),
    ('{"prompt": "x", "answer": "\\udfff"}', "d.jsonl:1: 'answer' holds '\\udfff' at character 1"),
    ('{"id": "a\\ud800", "prompt": "x", "answer": "1"}', "d.jsonl:1: 'id' holds"),
    ('{"prompt": [{"role": "user", "content": "\\ud800"}], "answer": "1"}',
     "d.jsonl:1: prompt message 0's 'content' holds"),
    ('[{"prompt": "\\ud800", "answer": "1"}]', "d.json: row 0: 'prompt' holds")])
def test_dataset_string_with_a_lone_surrogate(tmp_path, line, what):
    """JSON's escape of half a surrogate pair decodes to a string that is not text: the loader rejects it
    (train and eval both load through it), where the tokenizer failed steps later with a TypeError."""
    path = tmp_path / ("d.json" if line.startswith("[") else "d.jsonl")
    path.write_text(line + "\n")
    with pytest.raises(UserError) as e:
        load_dataset_rows(path)
    assert str(e.value).startswith(f"{tmp_path}/{what}") and str(e.value).endswith("that UTF-8 cannot encode")
    path.write_text('{"prompt": "smile \\ud83d\\ude00", "answer": "1"}\n')  # a whole pair is one character
    assert load_dataset_rows(path)[0]["prompt"] == "smile \U0001F600"


@pytest.mark.parametrize("text, message", [("{", "not valid JSON (Expecting property name"),
                                           ("[1]", "expected a JSON object, got list"),
                                           ('{"eos_token_id": "</s>"}', "eos_token_id must be a token id")])
def test_broken_generation_config_names_its_file_once(tmp_path, text, message):
    from rpo_engine.model.config import read_generation_eos

    path = tmp_path / "generation_config.json"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        read_generation_eos(path)
    assert str(e.value).startswith(f"{path}: {message}") and str(e.value).count("generation_config.json") == 1


@pytest.mark.parametrize("flags, message", [
    (["--lora-r", "8", "--use-rslora"], "--lora-r and --use-rslora do nothing without --use-peft"),
    (["--lora-alpha", "8", "--lora-target-modules", "q_proj", "--lora-merged-rollout"],
     "--lora-alpha, --lora-target-modules and --lora-merged-rollout do nothing without --use-peft (the run trains "
     "every weight)"),
    (["--sapo-temperature-pos", "2"], "--sapo-temperature-pos does nothing without --loss-type sapo"),
    (["--loss-type", "vespo", "--sapo-temperature-neg", "1"],
     "--sapo-temperature-neg does nothing without --loss-type sapo"),
    (["--vespo-lambda-neg", "1"], "--vespo-lambda-neg does nothing without --loss-type vespo"),
    (["--importance-sampling-mode", "token_mask", "--importance-sampling-clip-max", "2"],
     "--importance-sampling-mode and --importance-sampling-clip-max do nothing without "
     "--importance-sampling-correction"),
    (["--importance-sampling-clip-min", "0.5"],
     "--importance-sampling-clip-min does nothing without --importance-sampling-correction"),
    (["--entropy-coef", "0.1", "--entropy-coef-max", "0.5"],
     "--entropy-coef-max does nothing without --use-adaptive-entropy"),
    (["--entropy-coef-min", "0.1", "--entropy-coef-delta", "0.1", "--entropy-target", "1"],
     "--entropy-coef-min, --entropy-coef-delta and --entropy-target do nothing without --use-adaptive-entropy"),
    (["--use-adaptive-entropy", "--entropy-coef-max", "0"],
     "--use-adaptive-entropy does nothing with --entropy-coef-max 0: the coefficient stays 0"),
    (["--beta", "0.1", "--ref-model-sync-steps", "2"], "--ref-model-sync-steps does nothing without --sync-ref-model"),
    # TRL's default interval, 512 steps, is longer than most runs: the reference never moved, silently
    (["--beta", "0.1", "--sync-ref-model", "--steps", "40"],
     "--sync-ref-model does nothing with --ref-model-sync-steps 512 above --steps 40"),
    # every cached path (at most --max-completion-length tokens) cut whole: RPO quietly became full-path GRPO
    (["--max-completion-length", "64", "--rpo-min-cut", "64"],
     "--rpo-min-cut 64 does nothing but regrow every cached path whole with --max-completion-length 64"),
    (["--max-resample-rounds", "1"], "--max-resample-rounds does nothing without dynamic sampling"),
    (["--algo", "dapo", "--no-dynamic-sampling", "--dynamic-sampling-metric", "reward"],
     "--dynamic-sampling-metric does nothing without dynamic sampling (--algo dapo, or --dynamic-sampling)"),
    (["--overlong-penalty", "2"], "--overlong-penalty does nothing without an overlong buffer"),
    (["--algo", "dapo", "--overlong-buffer", "0", "--overlong-penalty", "2"], "--overlong-penalty does nothing"),
    # the other way round: a buffer whose penalty is 0 subtracts 0 from every reward
    (["--overlong-buffer", "8", "--overlong-penalty", "0"], "--overlong-buffer does nothing with --overlong-penalty 0"),
    (["--multi-objective-aggregation", "normalize_then_sum", "--scale-rewards", "batch"],
     "--scale-rewards does nothing with --multi-objective-aggregation normalize_then_sum"),
    (["--loss-type", "sapo", "--epsilon", "0.1"],
     "--epsilon does nothing with --loss-type sapo: it has no clipped ratio"),
    (["--loss-type", "vespo", "--epsilon-high", "0.3"], "--epsilon-high does nothing with --loss-type vespo"),
    (["--loss-type", "cispo", "--epsilon-high", "5", "--epsilon", "0.1"],
     "--epsilon does nothing with --loss-type cispo"),
    (["--no-length-shaping", "--length-alpha", "0.2"], "--length-alpha does nothing with --no-length-shaping"),
    (["--dataset", "d.jsonl", "--train-size", "10"], "--train-size does nothing with --dataset"),
    (["--lr-scheduler-type", "constant", "--warmup-ratio", "0.1"],
     "--warmup-ratio does nothing with --lr-scheduler-type constant"),
    (["--lr-scheduler-type", "constant", "--warmup-steps", "3"],
     "--warmup-steps does nothing with --lr-scheduler-type constant"),
    (["--warmup-steps", "3", "--warmup-ratio", "0.1"], "--warmup-ratio does nothing with --warmup-steps"),
    # one mini-batch of at most --prompts-per-step groups: the default run, quietly (verl refuses it)
    (["--prompts-per-step", "8", "--ppo-mini-batch-size", "16"],
     "--ppo-mini-batch-size (16) does nothing above --prompts-per-step (8)"),
    # a --dataset run evaluates on --eval-dataset only: without it, no eval ran at all
    (["--dataset", "d.jsonl", "--eval-steps", "5"], "--eval-steps does nothing without --eval-dataset"),
    (["--dataset", "d.jsonl", "--eval-size", "64"], "--eval-size does nothing without --eval-dataset"),
    # TRL's name and ours for one setting, saying two things: neither wins quietly
    (["--loss-type", "dr_grpo", "--loss-agg", "token-mean"],
     "--loss-type dr_grpo is --loss-agg seq-mean-token-sum-norm, not token-mean"),
])
def test_option_that_does_nothing_in_this_run(flags, message):
    """A flag the run would ignore is an error naming it (LoRA's without --use-peft: the run quietly trained
    every weight)."""
    with pytest.raises(UserError) as e:
        parse_args(flags)
    assert str(e.value).startswith(message), str(e.value)


@pytest.mark.parametrize("flags", [
    ["--use-peft", "--lora-r", "8", "--use-rslora", "--lora-merged-rollout", "--lora-target-modules", "q_proj"],
    ["--lora-r", "16", "--no-use-rslora", "--lora-target-modules", "all-linear"],  # the defaults, repeated
    ["--loss-type", "sapo", "--sapo-temperature-pos", "2", "--epsilon", "0.2"],
    ["--loss-type", "vespo", "--vespo-k-pos", "1"],
    # the clip bound sapo and vespo have no use for, at the value it resolves to (as a run's record holds it)
    ["--loss-type", "sapo", "--epsilon-high", "0.2"], ["--algo", "dapo", "--loss-type", "vespo", "--epsilon-high", "0.28"],
    ["--loss-type", "dr_grpo", "--loss-agg", "seq-mean-token-sum-norm"],
    ["--importance-sampling-correction", "--importance-sampling-mode", "token_mask",
     "--importance-sampling-clip-max", "2"],
    ["--importance-sampling-correction", "--importance-sampling-mode", "token_truncate",
     "--importance-sampling-clip-min", "0.5"],
    ["--importance-sampling-correction", "--importance-sampling-clip-min", "0"],  # a floor no ratio is below
    ["--use-adaptive-entropy", "--entropy-coef-max", "0.5", "--entropy-target", "1"],
    ["--beta", "0.1", "--sync-ref-model", "--ref-model-sync-steps", "2", "--ref-model-mixup-alpha", "0.5"],
    ["--algo", "dapo", "--max-resample-rounds", "1", "--dynamic-sampling-metric", "reward"],
    ["--dynamic-sampling", "--max-resample-rounds", "1"],
    ["--algo", "dapo", "--overlong-penalty", "2"], ["--overlong-buffer", "8", "--overlong-penalty", "2"],
    ["--algo", "dapo", "--overlong-penalty", "0"],  # DAPO's shaping switched off, its buffer left at its default
    ["--multi-objective-aggregation", "normalize_then_sum", "--scale-rewards", "group"],
    ["--loss-type", "cispo", "--epsilon-high", "5"],
    ["--loss-type", "luspo", "--epsilon", "3e-4", "--epsilon-high", "4e-4"],
    ["--length-alpha", "0.2"], ["--dataset", "d.jsonl"],
    ["--max-completion-length", "64", "--rpo-min-cut", "63"], ["--no-rpo", "--max-completion-length", "8"],
    ["--lr-scheduler-type", "constant", "--warmup-ratio", "0"],  # TRL's default, which is what constant does
    ["--lr-scheduler-type", "constant_with_warmup", "--warmup-ratio", "0.1"],
    ["--no-rpo", "--rpo-max-cut", "8"],  # the RPO options stay: one command line runs both arms of a comparison
    ["--warmup-steps", "3", "--warmup-ratio", "0.05"], ["--lr-scheduler-type", "constant", "--warmup-steps", "0"],
    ["--prompts-per-step", "8", "--ppo-mini-batch-size", "8"],
    ["--dataset", "d.jsonl", "--eval-dataset", "e.jsonl", "--eval-steps", "5", "--eval-size", "64"],
    ["--dataset", "d.jsonl", "--eval-steps", "0", "--eval-size", "4"],  # no eval, said so: a shared size is moot
    ["--eval-steps", "5", "--eval-size", "64"],  # the built-in task's eval split
])
def test_option_that_acts_in_this_run(flags):
    parse_args(flags)


def test_config_file_option_that_does_nothing(tmp_path):
    # a file that repeats a default is harmless; one that sets an option the run would ignore is not
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lora_r: 16\nsapo_temperature_pos: 1.0\nalgo:\n  importance_sampling_clip_max: 3\n")
    assert parse_args(["--config", str(cfg)]).lora_r == 16
    cfg.write_text("lora_r: 8\n")
    with pytest.raises(UserError, match=r"^--lora-r does nothing without --use-peft \(the run trains every weight\)$"):
        parse_args(["--config", str(cfg)])


@pytest.mark.parametrize("value", ["1", "1.5"])
def test_epsilon_of_one_or_more(value):
    with pytest.raises(UserError, match=rf"^--epsilon must be < 1, got {float(value)}$"):
        parse_args(["--epsilon", value])


@pytest.mark.parametrize("flags,expected", [
    (["--num_generations", "4"], {"num_generations": 4}),  # HfArgumentParser's spelling
    (["--learning_rate=1e-6"], {"learning_rate": 1e-6}),
    (["--use_peft", "true", "--lora_r", "8"], {"use_peft": True, "lora_r": 8}),
    (["--rpo", "false", "--steps", "3"], {"rpo": False, "steps": 3}),
    (["--rpo=no"], {"rpo": False}), (["--no_rpo"], {"rpo": False}),
    (["--mask-truncated-completions", "True"], {"mask_truncated_completions": True}),
    (["--rpo", "--num_generations", "4"], {"rpo": True, "num_generations": 4}),
])
def test_trl_command_line_spelling(flags, expected):
    """A TRL command line (underscores; a boolean given true or false) means what it says there, where argparse
    stopped at 'unrecognized arguments: --num_generations 4' or '... false'."""
    config = parse_args(flags)
    flat = {**vars(config), **vars(config.rpo), **vars(config.algo)}
    assert {k: flat[k] for k in expected} == expected


@pytest.mark.parametrize("flags,message", [
    (["--rpo=maybe"], "--rpo takes true or false (or no value), got 'maybe'"),
    (["--max_steps", "3"], "unknown option 'max_steps' (TRL's max_steps is --steps here)"),
    (["--per-device-train-batch-size", "8"], "unknown option 'per-device-train-batch-size' (TRL's "
                                              "per_device_train_batch_size is --prompts-per-step here"),
    (["--generation_kwargs", '{"stop": ["</answer>"]}'], "unknown option 'generation_kwargs' (TRL's generation_kwargs "
                                                       "is not here: the sampling options are flags (--temperature, "
                                                       "--top-p, --top-k, --min-p, --repetition-penalty, --stop))"),
    (["--vllm_importance_sampling_clip_min", "0.5"], "unknown option 'vllm_importance_sampling_clip_min' (TRL's "
                                                     "vllm_importance_sampling_clip_min is "
                                                     "--importance-sampling-clip-min here)"),
])
def test_trl_command_line_mistakes(flags, message):
    with pytest.raises(UserError) as e:
        parse_args(flags)
    assert str(e.value).startswith(message), str(e.value)


def test_trl_yaml_key_that_is_not_ours_names_ours(tmp_path):
    message = _config_error(tmp_path, "max_steps: 100\nlearning_rate: 1e-6\n")
    assert message.endswith("unknown option 'max_steps' (TRL's max_steps is --steps here)"), message
    assert _config_error(tmp_path, "stepz: 1\n").endswith("unknown option 'stepz'; did you mean steps?")
    assert _config_error(tmp_path, "zzz: 1\n").endswith("unknown option 'zzz'")  # nothing alike: no hint


@pytest.mark.parametrize("flags,message", [
    # argparse took any unambiguous beginning: --lr was --lr-scheduler-type, --learning --learning-rate
    (["--lr", "1e-5"], "unknown option '--lr'; did you mean --learning-rate or --lora-r or --lr-scheduler-type?"),
    (["--learning", "1e-5"], "unknown option '--learning'; did you mean --learning-rate?"),
    (["--num-generation=4"], "unknown option '--num-generation'; did you mean --num-generations or --num-generations-eval?"),
    (["--temprature", "0.7"], "unknown option '--temprature'; did you mean --temperature or --eval-temperature?"),
    (["--zzz", "1"], "unknown option '--zzz' (python -m rpo_engine.train --help lists every option)"),
])
def test_option_read_only_by_its_whole_name(flags, message):
    with pytest.raises(UserError) as e:
        parse_args(flags)
    assert str(e.value).startswith(message), str(e.value)


# (--warmup-steps, --steps, warmup steps) as transformers 5.25's TrainingArguments.get_warmup_steps gives them
@pytest.mark.parametrize("warmup_steps,steps,expected", [
    (0, 40, 0), (0.05, 40, 2), (0.1, 40, 4), (0.5, 40, 20), (0.999, 40, 40), (1, 40, 1), (3, 40, 3), (60, 40, 60),
    (0.05, 7, 1), (0.3, 7, 3), (1, 7, 1)])
def test_warmup_steps_as_transformers_reads_them(warmup_steps, steps, expected):
    """--warmup-steps, transformers 5's only warmup option (it dropped warmup_ratio): N >= 1 steps, below 1 a
    fraction of the steps, rounded up."""
    from rpo_engine.config import warmup_length

    assert warmup_length(parse_args(["--warmup-steps", str(warmup_steps), "--steps", str(steps)])) == expected
    assert warmup_length(parse_args(["--steps", str(steps)])) == -(-steps * 5 // 100)  # without it, 5% rounded up


@pytest.mark.parametrize("flags,message", [
    # the buffer past the budget penalized every answer, one of a single token too
    (["--overlong-buffer", "400", "--max-completion-length", "320"],
     r"^--overlong-buffer \(400\) must be <= --max-completion-length \(320\)"),
    (["--overlong-buffer", "8", "--overlong-penalty", "-1"], r"^--overlong-penalty must be >= 0, got -1.0$"),  # a bonus
])
def test_overlong_shaping_bad_values(flags, message):
    with pytest.raises(UserError, match=message):
        parse_args(flags)
    parse_args(["--overlong-buffer", "320", "--max-completion-length", "320"])  # a length penalty over the whole budget


def test_warmup_steps_bad_value():
    for value in ("-1", "2.5"):
        with pytest.raises(UserError, match="--warmup-steps must be a whole number of steps or a fraction in"):
            parse_args(["--warmup-steps", value])


@pytest.mark.parametrize("run,then", [
    ([], ["--algo", "dapo"]), ([], ["--epsilon", "0.1"]), ([], ["--loss-type", "dapo"]), (["--algo", "dapo"], ["--algo", "grpo"]),
    (["--epsilon-high", "0.3"], ["--algo", "dapo"]), (["--loss-type", "cispo", "--epsilon-high", "5"], ["--algo", "dapo"])])
def test_run_record_fed_back_resolves_again(tmp_path, run, then):
    """A run's config.json records what --algo, --epsilon and --loss-type resolved (epsilon_high, loss_agg,
    dynamic_sampling); fed back with a flag that changes them, it is the run that flag gives, where the record
    pinned the old resolution (`--algo dapo`: GRPO's clip and aggregation, no dynamic sampling) or refused it."""
    import dataclasses
    import json

    from rpo_engine.config import config_to_dict

    record = tmp_path / "config.json"
    run = [*run, "--output", str(tmp_path.resolve() / "run")]  # as recorded: resolved
    record.write_text(json.dumps(config_to_dict(parse_args(run))))
    assert dataclasses.replace(parse_args(["--config", str(record)]), config=None) == parse_args(run)  # as it is
    assert parse_args(["--config", str(record), *then]).algo == parse_args([*run, *then]).algo


def test_config_file_section_left_empty(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: 3\nalgo:\n  # epsilon: 0.1\nrpo:\n")  # every key of a section commented out
    assert parse_args(["--config", str(cfg)]).steps == 3


@pytest.mark.parametrize("device", ["cuda:abc", "cuda:-1", "cuda:", "gpu"])
def test_device_that_is_not_one(device):
    # torch.device raised on the first two (a traceback); the last two are no device at all
    with pytest.raises(UserError, match=rf"^--device must be cpu, cuda, cuda:N or auto, got '{device}'$"):
        parse_args(["--device", device])


def test_device_index_past_the_gpus(monkeypatch):
    """cuda:7 on a one-GPU machine: a one-line error, where moving the model raised 'invalid device ordinal'."""
    import torch

    from rpo_engine.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    with pytest.raises(UserError, match=r"^--device cuda:1: there are 1 CUDA devices \(0 to 0\)$"):
        resolve_device(parse_args(["--device", "cuda:1"]))
    assert resolve_device(parse_args(["--device", "cuda:0"]))[0] == torch.device("cuda:0")
    # made the current device: Triton launches and CUDA graph captures run on the current one, not the tensors'
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device(parse_args(["--device", "cuda:1"]))[0] == torch.device("cuda:1")
    assert current == [torch.device("cuda:0"), torch.device("cuda:1")]
    resolve_device(parse_args(["--device", "cuda"]))  # no index: the current one stays
    assert len(current) == 2


def test_device_index_under_torchrun_leaves_each_ranks_device_current(monkeypatch):
    """Under torchrun each rank trains on its LOCAL_RANK's GPU (Dist.from_env makes it current; build_trainer puts
    the model there, whatever --device's index): resolve_device, which build_trainer calls after, making --device
    cuda:0 current again put every rank's Triton launches and CUDA graphs (and NCCL's barrier) on GPU 0."""
    import torch

    from rpo_engine.train import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    current = []
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device(parse_args(["--device", "cuda:0"]))[0] == torch.device("cuda:0")
    assert current == []


def test_seed_past_64_bits():
    with pytest.raises(UserError, match=r"^--seed must fit in 64 bits, got 18446744073709551616$"):
        parse_args(["--seed", str(2**64)])
    parse_args(["--seed", str(2**64 - 1)]), parse_args(["--seed", "-1"])


@pytest.mark.parametrize("option", ["--model", "--dataset", "--eval-dataset", "--dataset-config"])
def test_an_empty_name_is_refused(option, tmp_path):
    """--eval-dataset "" was read as no eval dataset (the built-in split, or silently no eval with --dataset), --model
    "" as the working directory, --dataset-config "" as no configuration: each is one line naming the option."""
    extra = ["--dataset", "org/gsm"] if option == "--dataset-config" else []
    with pytest.raises(UserError, match=f"^{option} is empty; "):
        parse_args([*extra, option, ""])


def test_eval_cli_refuses_an_empty_dataset(tiny_model_dir):
    from rpo_engine.eval import main

    with pytest.raises(UserError, match="^--dataset is empty; "):  # not the built-in split, evaluated silently
        main(["--model", str(tiny_model_dir), "--dataset", "", "--no-progress"])


def test_kl_loss_type_takes_verls_names_and_needs_a_kl_term():
    from rpo_engine.config import parse_args

    for name, canonical in (("k1", "k1"), ("kl", "k1"), ("mse", "k2"), ("k2", "k2"), ("abs", "abs"),
                            ("low_var_kl", "k3"), ("k3", "k3")):
        assert parse_args(["--beta", "0.01", "--kl-loss-type", name]).algo.kl_loss_type == canonical
    assert parse_args(["--kl-loss-type", "low_var_kl"]).algo.kl_loss_type == "k3"  # the default by another name
    for flags, message in ((["--kl-loss-type", "k2"], "--kl-loss-type does nothing without --beta > 0"),
                           (["--beta", "0.01", "--kl-loss-type", "full"], "--kl-loss-type must be one of k3"),
                           (["--beta", "0.01", "--kl-loss-type", "k1", "--use-bias-correction-kl"],
                            "--use-bias-correction-kl corrects k3's gradient: --kl-loss-type k3, got k1")):
        with pytest.raises(UserError, match=re.escape(message)):
            parse_args(flags)


@pytest.mark.parametrize("flags, message", [
    (["--repetition-penalty", "0"], "^--repetition-penalty must be >= 1e-05 \\(1: off\\), got 0.0$"),
    (["--repetition-penalty", "-1.2"], "^--repetition-penalty must be >= 1e-05 \\(1: off\\), got -1.2$"),
    (["--repetition-penalty", "1e-40"], "^--repetition-penalty must be >= 1e-05 \\(1: off\\), got 1e-40$"),
    (["--eval-temperature", "0.6", "--eval-top-k", "-2"], "^--eval-top-k must be >= 0, got -2$"),
])
def test_penalty_and_eval_top_k_out_of_range_are_refused_before_loading(flags, message):
    # past the check, SamplingParams refused them at the first rollout or eval: a ValueError traceback after the loading
    with pytest.raises(UserError, match=message):
        parse_args(flags)


def test_stop_strings_option_reads_a_string_or_a_json_list():
    from rpo_engine.config import stop_strings

    assert stop_strings(None) is None
    assert stop_strings("</answer>") == ["</answer>"] and stop_strings("42") == ["42"]  # not JSON's number
    assert stop_strings('["</answer>", "\\n\\n"]') == ["</answer>", "\n\n"] and stop_strings('"\\n"') == ["\n"]
    assert stop_strings("[END]") == ["[END]"] and stop_strings('"') == ['"']  # start like JSON, are not: themselves
    for bad in ("", "[]", '[""]', "[1]"):
        with pytest.raises(UserError, match="--stop must be a string or a JSON list of non-empty strings"):
            stop_strings(bad)
    # what would otherwise match nothing, silently: a Python-style or unclosed list, a shell's backslash-n
    for bad in ("['</answer>']", '["</answer>", "\\n"'):
        with pytest.raises(UserError, match="is not a JSON list of strings"):
            stop_strings(bad)
    for bad in ("\\n\\n", "</answer>\\t"):
        with pytest.raises(UserError, match="holds a backslash escape, which a plain value keeps as two characters"):
            stop_strings(bad)


def test_a_runs_config_json_names_its_local_files_from_any_working_directory(tmp_path, monkeypatch):
    """config.json records a relative --output, --dataset, --eval-dataset and --reward file as the paths they name: fed back
    as --config from another working directory (README's `--config runs/x/config.json`), the same files. A Hub id,
    an importable module and a built-in reward stay as written."""
    import json

    from rpo_engine.config import config_to_dict

    here = tmp_path.resolve() / "here"
    (here / "data").mkdir(parents=True)
    for name in ("train.jsonl", "test.jsonl", "score.py"):
        (here / "data" / name).write_text("")
    monkeypatch.chdir(here)
    recorded = config_to_dict(parse_args([
        "--dataset", "data/train.jsonl", "--eval-dataset", "openai/gsm8k",
        "--reward", "data/score.py:score, my_rewards:score,format", "--output", "runs/x"]))
    assert recorded["output"] == str(here / "runs" / "x")  # where `--config runs/x/config.json --resume` goes on
    assert recorded["dataset"] == str(here / "data" / "train.jsonl")
    assert recorded["eval_dataset"] == "openai/gsm8k"
    assert recorded["reward"] == f"{here / 'data' / 'score.py'}:score,my_rewards:score,format"
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    monkeypatch.chdir(tmp_path)
    again = parse_args(["--config", "config.json", "--eval-dataset", "here/data/test.jsonl"])
    assert again.dataset == recorded["dataset"]
    assert config_to_dict(again)["eval_dataset"] == str(here / "data" / "test.jsonl")
    assert config_to_dict(again)["reward"] == recorded["reward"]


def test_a_sigterm_to_the_reward_workers_while_scoring_leaves_the_step_scored(capsys):
    """A SIGTERM sent to every process of a run (SLURM ending a job, `kill -- -PGID`) reaches the workers too: the
    trainer stops after its step with a checkpoint, but its scoring failed on 'a --reward-workers process died',
    exit 2, no checkpoint. The step is scored in the trainer's process instead; a crash is still that error."""
    from rpo_engine.rewards.pool import RewardPool

    texts = [f"text {i}" for i in range(20)]
    with RewardPool({0: "tests.reward_fns:hash_reward"}, workers=2) as pool:
        assert pool.score(0, ["a"], ["1"]) == [hash_reward("a", "1")]  # the workers are up
        first, second = pool.processes
        os.kill(first.pid, signal.SIGTERM)  # one of them: its work goes to the other
        assert pool.score(0, texts, ["1"] * 20) == [hash_reward(t, "1") for t in texts]
        assert pool.processes == [second] and capsys.readouterr().err == ""
        os.kill(second.pid, signal.SIGTERM)
        assert pool.score(0, texts, ["1"] * 20) == [hash_reward(t, "1") for t in texts]
        assert pool.score(0, texts, ["1"] * 20) == [hash_reward(t, "1") for t in texts]  # and on, said once
        assert capsys.readouterr().err.count("ended by SIGTERM; scoring in this process") == 1
    with RewardPool({0: "tests.reward_fns:exiting_reward"}, workers=2) as pool:
        with pytest.raises(UserError, match=r"a --reward-workers process died while scoring \(exit code 3"):
            pool.score(0, ["a", "b"], ["1", "1"])
        assert pool.processes == []  # the other worker stopped too


@pytest.mark.parametrize("flags,name", [
    (["--delta", "1e300"], "--delta"), (["--epsilon-high", "1e300"], "--epsilon-high"),
    (["--loss-type", "cispo", "--epsilon-high", "1e300"], "--epsilon-high"),
    (["--loss-type", "sapo", "--sapo-temperature-neg", "1e300"], "--sapo-temperature-neg"),
    (["--loss-type", "vespo", "--vespo-k-pos", "1e300"], "--vespo-k-pos"), (["--beta", "1e300"], "--beta"),
    (["--overlong-buffer", "8", "--overlong-penalty", "1e300"], "--overlong-penalty"),
    (["--reward-weights", "1e300"], "--reward-weights"), (["--format-reward-weight", "1e300"], "--format-reward-weight"),
    (["--learning-rate", "1e300"], "--learning-rate"),
])
def test_a_value_past_float32_is_refused_not_a_traceback_or_nan_in_the_first_step(flags, name):
    """The loss's options reach its float32 kernels, and the rewards are float32 tensors: past 3.4e38 the first
    update raised "value cannot be converted to type float without overflow" (--delta, --epsilon-high, sapo's
    and vespo's), or a reward of inf made reward_std NaN in metrics.jsonl and skipped every update."""
    with pytest.raises(UserError, match=f"^{name} must be at most (3.4e\\+38|1e\\+30) in size"):
        parse_args(flags)
    parse_args([flag if flag != flags[-1] else "1e30" for flag in flags])  # large, but float32 holds it


@pytest.mark.parametrize("extra", [["--reward-weights", "3e38"], ["--overlong-buffer", "8", "--overlong-penalty", "3e38"]])
def test_a_reward_scale_that_overflows_a_groups_sum_is_refused(extra):
    with pytest.raises(UserError, match=r"must be at most 1e\+30 in size"):
        parse_args(extra)


@pytest.mark.parametrize("flags,message", [
    (["--top-k", "1"], r"^--top-k 1 samples greedily: a group's 8 completions are all alike"),
    (["--min-p", "1"], r"^--min-p 1.0 samples greedily: a group's 8 completions are all alike"),
    (["--eval-temperature", "0.7", "--eval-top-k", "1", "--num-generations-eval", "4"],
     r"^--eval-top-k 1 samples greedily: a prompt's 4 eval answers are all alike"),
])
def test_sampling_that_is_greedy_is_refused_where_it_samples_several(flags, message):
    """--top-k 1 or --min-p 1 keep only the most likely token: every group's G completions came out the same, so
    no group ever had an advantage and the run trained nothing (frac_reward_zero_std 1.0), without a word."""
    with pytest.raises(UserError, match=message):
        parse_args(flags)
    parse_args(["--top-k", "2", "--min-p", "0.99"])
    parse_args(["--eval-temperature", "0.7", "--eval-top-k", "1"])  # one answer a prompt: greedy, as asked


def test_eval_cli_refuses_several_samples_that_are_greedy(tmp_path):
    for flags, name in ((["--top-k", "1"], "--top-k 1"), (["--min-p", "1"], "--min-p 1.0")):
        proc = subprocess.run([sys.executable, "-m", "rpo_engine.eval", "--num-samples", "4", "--temperature", "0.7",
                               *flags], capture_output=True, text=True, cwd=REPO)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(
            f"error: --num-samples 4 with {name} samples greedily: a row's 4 completions are all alike"), proc.stderr


def test_reward_weights_all_zero_are_refused_where_nothing_else_rewards():
    """--reward-weights 0 (or 0,0) made every reward 0: every group without signal, a run that trained nothing."""
    for flags in (["--reward-weights", "0"], ["--reward", "math,tests.reward_fns:hash_reward", "--reward-weights", "0,0"]):
        with pytest.raises(UserError, match=r"^--reward-weights are all 0: every completion's reward is 0"):
            parse_args(flags)
    parse_args(["--reward-weights", "0", "--format-reward-weight", "1"])  # the format reward still ranks them
    parse_args(["--reward-weights", "0", "--algo", "dapo"])  # so does DAPO's overlong penalty
    parse_args(["--reward", "math,tests.reward_fns:hash_reward", "--reward-weights", "0,1"])
