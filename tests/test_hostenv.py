"""The command lines in the environments users run them in: a terminal that cannot show every character, output
piped into `head`, a log file for stderr, an odd umask, cache variables set to odd values."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_train import assert_user_error

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def eval_command(model, data, *flags):
    return [sys.executable, "-m", "rpo_engine.eval", "--model", str(model), "--dataset", str(data),
            "--max-completion-length", "4", *map(str, flags)]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def test_text_the_terminal_cannot_encode_is_escaped_not_a_traceback(tmp_path, tiny_model_dir):
    """stdout in ASCII (PYTHONIOENCODING=ascii; LC_ALL=C with PYTHONUTF8=0; a Windows code page in a redirected
    log) and a dataset path with non-ASCII letters: the result line printed with the letter escaped, as Python
    prints it to stderr, not a UnicodeEncodeError once the work is done (train's, before its --push-to-hub)."""
    data = write_rows(tmp_path / "dätä sét.jsonl", [{"prompt": "2+2 ünï 数", "answer": "4"}])
    proc = subprocess.run(eval_command(tiny_model_dir, data, "--no-progress"), capture_output=True, cwd=REPO,
                          env={**ENV, "PYTHONIOENCODING": "ascii"})
    assert proc.returncode == 0, proc.stderr.decode()
    assert rb"(" + str(tmp_path).encode() + rb"/d\xe4t\xe4 s\xe9t.jsonl)" in proc.stdout


def test_a_reader_that_went_away_ends_the_command_quietly(tmp_path, tiny_model_dir):
    """stdout piped into a reader that has exited (`| head -1` after its line): the command ends as a program
    SIGPIPE ends, 128 + 13, without a BrokenPipeError traceback; another command's output is not at stake."""
    data = write_rows(tmp_path / "d.jsonl", [{"prompt": "2+2", "answer": "4"}])
    proc = subprocess.Popen(eval_command(tiny_model_dir, data, "--no-progress"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=REPO, env=ENV)
    proc.stdout.close()  # the reader is gone before the result line is printed
    stderr = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 128 + signal.SIGPIPE, stderr
    assert stderr == ""


def test_the_progress_bars_write_lines_to_a_log_file(tmp_path, tiny_model_dir):
    """stderr redirected to a log file (a SLURM job, nohup, `2> log`): each bar writes whole lines (its first state,
    at most one a LOG_INTERVAL_S, its last), not redraws joined by carriage returns into one endless line."""
    data = write_rows(tmp_path / "d.jsonl", [{"prompt": f"{i}+{i}", "answer": str(2 * i)} for i in range(4)])
    train = subprocess.run([sys.executable, "-m", "rpo_engine.train", "--model", str(tiny_model_dir), "--dataset",
                            str(data), "--eval-dataset", str(data), "--steps", "3", "--prompts-per-step", "1",
                            "--num-generations", "2",
                            "--max-completion-length", "4", "--eval-steps", "3", "--eval-size", "2", "--output",
                            str(tmp_path / "run")], capture_output=True, text=True, cwd=REPO, env=ENV)
    evaluated = subprocess.run(eval_command(tiny_model_dir, data), capture_output=True, text=True, cwd=REPO, env=ENV)
    for proc, bar, last in ((train, "RPO-GRPO", "3/3"), (evaluated, "eval:", "4/4")):
        assert proc.returncode == 0, proc.stderr
        assert "\r" not in proc.stderr and "\x1b[" not in proc.stderr
        lines = [line for line in proc.stderr.splitlines() if line.startswith(bar)]
        assert 2 <= len(lines) <= 3 and "0/" in lines[0] and f"| {last} [" in lines[-1], proc.stderr


def test_a_cuda_device_hidden_by_cuda_visible_devices_names_the_variable(tmp_path, tiny_model_dir):
    """CUDA_VISIBLE_DEVICES="" (a scheduler's, or a leftover export) hides every GPU: --device cuda says so, not
    only that there is none, which reads as a driver or install problem."""
    data = write_rows(tmp_path / "d.jsonl", [{"prompt": "2+2", "answer": "4"}])
    for device in ("cuda", "cuda:0"):
        proc = subprocess.run(eval_command(tiny_model_dir, data, "--device", device), capture_output=True, text=True,
                              cwd=REPO, env={**ENV, "CUDA_VISIBLE_DEVICES": ""})
        assert_user_error(proc, f"--device {device}: no CUDA device is available", "CUDA_VISIBLE_DEVICES is ''")


def test_an_eval_output_that_cannot_be_written_is_refused_before_decoding(tmp_path, tiny_model_dir, monkeypatch):
    """--output in a directory the user may not write to (read-only, another user's) was found out at the end, once
    every row was decoded; and a parent that is a file was reported as missing."""
    import rpo_engine.eval as eval_cli
    from rpo_engine.errors import UserError

    data = write_rows(tmp_path / "d.jsonl", [{"prompt": "2+2", "answer": "4"}])
    (tmp_path / "file").write_text("x")
    proc = subprocess.run(eval_command(tiny_model_dir, data, "--output", tmp_path / "file" / "preds.jsonl"),
                          capture_output=True, text=True, cwd=REPO, env=ENV)
    assert_user_error(proc, f"{tmp_path / 'file'}: is a file, not a directory (--output {tmp_path / 'file'}/")

    locked, access = tmp_path / "locked", os.access
    locked.mkdir()
    # root writes anywhere, so the refusal a read-only filesystem or another user's directory gives is stood in for
    monkeypatch.setattr(os, "access", lambda path, mode, **kw: Path(path) != locked and access(path, mode, **kw))

    def decoded(*args, **kwargs):
        raise AssertionError("decoded before --output was checked")

    monkeypatch.setattr(eval_cli, "released_engine", decoded)
    with pytest.raises(UserError, match=f"^{locked}: not writable \\(--output {locked / 'preds.jsonl'}\\)$"):
        eval_cli.main(["--model", str(tiny_model_dir), "--dataset", str(data), "--no-progress",
                       "--output", str(locked / "preds.jsonl")])
