"""The command lines in the environments users run them in: a terminal that cannot show every character, output
piped into `head`, a log file for stderr, an odd umask, cache variables set to odd values."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

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
