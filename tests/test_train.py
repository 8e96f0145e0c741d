"""The training loop end to end on a tiny random model, resume equivalence, and the CLI's bad-input handling."""
import contextlib
import gc
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

from pathlib import Path

import pytest
import torch

from rpo_engine.rpo.cache import saved_paths
from tests.helpers import DEVICE, ON_CUDA, legacy_cache_state

REPO = Path(__file__).resolve().parents[1]


def run_train(*args, check=True, progress=False, env=None):
    # one torch thread: on a busy 2-core box (pytest -n 2) a second thread's wake-ups cost seconds a step
    proc = subprocess.run([sys.executable, "-m", "rpo_engine.train", *([] if progress else ["--no-progress"]),
                           *map(str, args)], capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def placeholder_state(checkpoint):
    """A trainer_state.pt that passes what is checked before the model loads (its step, the directory's), for tests
    whose trainer is a stand-in or whose run is refused later."""
    torch.save({"step": int(checkpoint.name.split("-")[1]), "rows_drawn": 0}, checkpoint / "trainer_state.pt")


SMALL = ["--prompts-per-step", 3, "--num-generations", 4, "--max-completion-length", 48, "--eval-size", 4,
         "--learning-rate", 1e-3]


def stopped_after(run, step, copy):
    """`copy`: the output directory of `run` as if it had been killed after its step-`step` checkpoint, one step
    later, while writing a line of its logs (a run started with --steps `step` would not do: its learning-rate
    schedule spans fewer steps, so its weights at `step` differ). Resuming drops the records past `step`."""
    shutil.copytree(run / "checkpoints" / f"step-{step}", copy / "checkpoints" / f"step-{step}")
    for name in ("metrics.jsonl", "completions.jsonl"):
        if (run / name).exists():
            lines = (run / name).read_text().splitlines()
            ran = [line for line in lines if json.loads(line)["step"] <= step + 1]
            torn = [line[:len(line) // 2] for line in lines if json.loads(line)["step"] > step + 1][:1]
            (copy / name).write_text("".join(line + "\n" for line in ran) + "".join(torn))


def test_train_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    full, part = tmp_path / "full", tmp_path / "part"
    # hash_reward: the random model's answers are all wrong, and all-equal rewards would leave nothing to train;
    # three prompts, three a step: each comes back every step, so the restored cache and RNG steer the next
    common = ["--model", tiny_model_dir, "--save-steps", 2, "--eval-steps", 2, "--reward", "tests.reward_fns:hash_reward",
              "--train-size", 3, *SMALL]
    run_train(*common, "--steps", 4, "--output", full, "--log-completions")
    stopped_after(full, 2, part)
    shutil.copy(full / "config.json", part / "config.json")
    resumed = run_train(*common, "--steps", 4, "--output", part, "--resume", "--save-total-limit", 1,
                        "--log-completions")
    assert "changed options" not in resumed.stderr  # the same training options
    # the resumed run samples the uninterrupted run's very completions, and its log holds each step once
    assert (full / "completions.jsonl").read_text() == (part / "completions.jsonl").read_text()
    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in a] == [0, 1, 2, 3, 4] == [m["step"] for m in b]
    for x, y in zip(a[3:], b[3:]):  # the steps after the resume point
        for key in ("reward_mean", "rollout_generated_tokens", "rollout_prefill_tokens", "loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), key
    from rpo_engine.optim import lr_multiplier

    # each step logs the rate it trained at (4 steps, one of warmup: 5% of 4, rounded up as Hugging Face does)
    assert [m["lr"] for m in a[1:]] == pytest.approx([1e-3 * lr_multiplier(s, 4, 1) for s in range(4)])
    for m in a[1:]:
        assert m["rollout_generated_tokens"] > 0 and m["step_time_s"] > 0
        assert m["grad_norm"] > 0 and m["logprob_mismatch"] < 1e-4  # rollout log-probs equal the training forward's
    assert (full / "final" / "model.safetensors").is_file() and (full / "final" / "tokenizer.json").is_file()
    assert (full / "curves.png").stat().st_size > 1000
    assert (full / "checkpoints" / "step-4" / "trainer_state.pt").is_file()
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["step-2", "step-4"]  # no limit: all kept
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-4"]  # --save-total-limit 1 dropped step-2
    # resumed with another learning rate: it goes on, and says what changed
    changed = tmp_path / "changed"
    stopped_after(full, 2, changed)
    shutil.copy(full / "config.json", changed / "config.json")
    proc = run_train(*common, "--steps", 3, "--output", changed, "--resume", "--learning-rate", 2e-3)
    assert "warning: resuming with changed options: learning_rate 0.001 -> 0.002" in proc.stderr
    # and the change governs from the first resumed step: the new peak, on the schedule of the new length
    assert read_metrics(changed)[-1]["lr"] == pytest.approx(2e-3 * lr_multiplier(2, 3, 1))


def test_a_checkpoint_of_list_paths_resumes_as_the_uninterrupted_run(tmp_path, tiny_model_dir):
    """A checkpoint from before packed paths (its cache's `paths` as lists, float log-probs) resumes to the very
    steps the uninterrupted run took: the same paths, cuts at the least likely token and completions."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--model", tiny_model_dir, "--save-steps", 2, "--eval-steps", 0, "--reward", "tests.reward_fns:hash_reward",
              "--train-size", 3, "--rpo-unverified-cut", "least-likely", *SMALL]
    run_train(*common, "--steps", 4, "--output", full, "--log-completions")
    stopped_after(full, 2, part)
    shutil.copy(full / "config.json", part / "config.json")
    state_file = part / "checkpoints" / "step-2" / "trainer_state.pt"
    state = torch.load(state_file, weights_only=True)
    state["cache"] = legacy_cache_state(state["cache"])
    assert all(p[4] is not None for p in state["cache"]["paths"].values())  # least-likely cuts read them
    torch.save(state, state_file)
    run_train(*common, "--steps", 4, "--output", part, "--resume", "--log-completions")
    assert (full / "completions.jsonl").read_text() == (part / "completions.jsonl").read_text()
    final = torch.load(full / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=True)["cache"]
    resumed = torch.load(part / "checkpoints" / "step-4" / "trainer_state.pt", weights_only=True)["cache"]
    assert repr(saved_paths(final)) == repr(saved_paths(resumed))


def test_changed_options_are_those_the_checkpoint_was_trained_with(tmp_path, tiny_model_dir):
    """The changed-options warning compares with the options the checkpoint resumed from was made with (its own
    config.json), not with the last command's (OUTPUT/config.json): going back to a checkpoint from before a
    resume that lowered the learning rate, with that lower rate, is a change, and was said nowhere."""
    out = tmp_path / "run"
    common = ["--model", tiny_model_dir, "--save-steps", 1, "--eval-steps", 0, "--reward", "tests.reward_fns:hash_reward",
              "--train-size", 3, *SMALL, "--output", out]  # SMALL: --learning-rate 1e-3
    run_train(*common, "--steps", 1)
    proc = run_train(*common, "--steps", 2, "--resume", "--learning-rate", 5e-4)
    assert "learning_rate 0.001 -> 0.0005" in proc.stderr
    proc = run_train(*common, "--steps", 2, "--learning-rate", 5e-4,
                     "--resume-from-checkpoint", out / "checkpoints" / "step-1")
    assert "warning: resuming with changed options: learning_rate 0.001 -> 0.0005" in proc.stderr
    proc = run_train(*common, "--steps", 2, "--resume-from-checkpoint", out / "checkpoints" / "step-1")
    assert "changed options" not in proc.stderr  # step-1's own options: no change


def test_resume_redoes_an_incomplete_checkpoint_and_ignores_names_not_ours(tmp_path, tiny_model_dir):
    """A step-N directory without its trainer state (a save cut short, a file removed) is passed over, and the
    resumed run writes step-N again over it; a step-3.bak beside them is a user's, not a checkpoint."""
    out = tmp_path / "run"
    common = ["--model", tiny_model_dir, "--save-steps", 2, "--eval-steps", 0, "--reward", "tests.reward_fns:hash_reward",
              "--train-size", 3, *SMALL]
    run_train(*common, "--steps", 4, "--output", out)
    before = read_metrics(out)
    (out / "checkpoints" / "step-4" / "trainer_state.pt").unlink()
    (out / "checkpoints" / "step-3.bak").mkdir()
    proc = run_train(*common, "--steps", 4, "--output", out, "--resume")
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in proc.stdout
    assert (out / "checkpoints" / "step-4" / "trainer_state.pt").is_file()
    for x, y in zip(before, read_metrics(out), strict=True):
        for key in ("reward_mean", "rollout_generated_tokens", "loss"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)


def test_a_resumed_run_removes_what_a_save_or_prune_killed_midway_left(tmp_path, tiny_model_dir):
    """A run killed while it wrote checkpoints/step-N (its .step-N.tmp, a checkpoint's size) or deleted one for
    --save-total-limit (.step-N.pruned): the next run removes them, also where it never saves step N again (other
    --save-steps, or a stop signal's step off them); a user's names are left alone."""
    out = tmp_path / "run"
    common = ["--model", tiny_model_dir, "--eval-steps", 0, "--train-size", 3, *SMALL]
    run_train(*common, "--steps", 2, "--save-steps", 2, "--output", out)
    ckpts = out / "checkpoints"
    for name in (".step-3.tmp", ".step-1.pruned"):
        (ckpts / name / "model").mkdir(parents=True)
        (ckpts / name / "model" / "model.safetensors").write_bytes(b"partial")
    (ckpts / ".step-3.tmp.bak").mkdir()
    run_train(*common, "--steps", 4, "--save-steps", 4, "--output", out, "--resume")
    assert sorted(p.name for p in ckpts.iterdir()) == [".step-3.tmp.bak", "step-2", "step-4"]


def test_prune_killed_midway_leaves_no_checkpoint_missing_files(tmp_path, monkeypatch):
    """--save-total-limit deletes a checkpoint with rmtree: killed midway (here after its trainer_state.pt went),
    a step-N without its trainer state was never counted, nor pruned, again (its weights kept for good); one
    without its weights, still counted as complete. It is renamed out of checkpoints/step-N first."""
    import shutil

    from rpo_engine import train

    for n in (1, 2, 3):
        (tmp_path / "checkpoints" / f"step-{n}" / "model").mkdir(parents=True)
        (tmp_path / "checkpoints" / f"step-{n}" / "trainer_state.pt").touch()

    def killed(path, *args, **kwargs):
        (Path(path) / "trainer_state.pt").unlink()
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        train.prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [".step-1.pruned", "step-2", "step-3"]


def test_resume_from_an_earlier_checkpoint_redoes_the_later_steps_and_keeps_what_they_wrote(tmp_path, tiny_model_dir):
    """--resume-from-checkpoint OUTPUT/checkpoints/step-2 of a finished 4-step run (TRL's resume_from_checkpoint
    with a path): --output is its run's; the later steps come again as the run first took them, each step once in
    the log; the step-4 checkpoint and final/ the run first wrote are kept aside as *.superseded, never deleted nor
    taken for the new run's; TRL's boolean spelling resumes from the newest."""
    out = tmp_path / "run"
    common = ["--model", tiny_model_dir, "--save-steps", 2, "--eval-steps", 2, "--reward", "tests.reward_fns:hash_reward",
              "--train-size", 3, "--steps", 4, *SMALL]
    run_train(*common, "--output", out)
    first = read_metrics(out)
    first_final = (out / "final" / "model.safetensors").read_bytes()
    proc = run_train(*common, "--resume-from-checkpoint", out / "checkpoints" / "step-2")  # no --output: the run's
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in proc.stdout
    assert "kept aside what the run wrote after step 2: checkpoints/step-4.superseded, final.superseded" in proc.stdout
    again = read_metrics(out)
    assert [m["step"] for m in again] == [0, 1, 2, 3, 4]
    for x, y in zip(first, again, strict=True):
        for key in ("reward_mean", "rollout_generated_tokens", "loss", "eval_accuracy"):
            assert x.get(key) == pytest.approx(y.get(key), rel=1e-4, abs=1e-6), (x["step"], key)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-4", "step-4.superseded"]
    assert (out / "final.superseded" / "model.safetensors").read_bytes() == first_final
    assert (out / "final" / "model.safetensors").is_file()
    # a second rewind keeps the first one's leftovers too; the boolean spelling is --resume (from the newest: step-4)
    run_train(*common, "--output", out, "--resume_from_checkpoint", out / "checkpoints" / "step-2")
    assert (out / "final.superseded-2").is_dir() and (out / "checkpoints" / "step-4.superseded-2").is_dir()
    proc = run_train(*common, "--output", out, "--resume_from_checkpoint", "true")
    assert f"resumed from {out / 'checkpoints' / 'step-4'} at step 4" in proc.stdout


def test_resume_from_checkpoint_refuses_what_is_not_a_checkpoint_of_the_run(tmp_path, monkeypatch):
    """A missing path, a directory that is no step-N checkpoint, another run's checkpoint, one whose save was cut
    short: one line each, before anything loads or is written; a run's config.json fed back as --config does not
    repeat its resume_from_checkpoint."""
    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist
    from rpo_engine.errors import UserError

    monkeypatch.setattr(train, "build_trainer", lambda *a, **k: pytest.fail("built a trainer"))
    out, other = tmp_path / "run", tmp_path / "other"
    for run in (out, other):
        (run / "checkpoints" / "step-2").mkdir(parents=True)
        (run / "checkpoints" / "step-2" / "trainer_state.pt").touch()
        (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (out / "checkpoints" / "step-3").mkdir()  # its save cut short
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def resume(path, *flags):
        return train.train(parse_args(["--resume-from-checkpoint", str(path), *flags]), Dist())

    for path, said in [(out / "checkpoints" / "step-9", "no such directory"),
                       (out / "checkpoints", "not a checkpoint (a run's OUTPUT/checkpoints/step-N directory)"),
                       (out / "metrics.jsonl", "not a checkpoint"),
                       (out / "checkpoints" / "step-3", "an incomplete checkpoint (no trainer_state.pt")]:
        with pytest.raises(UserError, match=re.escape(f"--resume-from-checkpoint {path}: {said}")):
            resume(path)
    with pytest.raises(UserError, match=re.escape(f"a checkpoint of the run in {other}, not of --output {out}; to "
                                                  f"branch a run off, copy its directory and resume the copy")):
        resume(other / "checkpoints" / "step-2", "--output", str(out))
    with pytest.raises(UserError, match="--resume-from-checkpoint is empty"):
        parse_args(["--resume-from-checkpoint", ""])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
    assert parse_args(["--resume-from-checkpoint", str(out / "checkpoints" / "step-2")]).output == str(out)
    assert parse_args(["--resume_from_checkpoint", "false"]).resume is False
    record = tmp_path / "config.json"
    record.write_text(json.dumps({"config": None, "output": str(out), "resume_from_checkpoint": str(other)}))
    assert parse_args(["--config", str(record)]).resume_from_checkpoint is None


def test_sigterm_stops_after_the_step_with_a_checkpoint_that_resumes_as_if_never_stopped(tmp_path, tiny_model_dir):
    """SIGTERM in the middle of step 2 (here while its rewards are scored) of a 3-step run: step 2 finishes, a
    checkpoint is written though --save-steps asks for none there, no final/, exit code 143 (128 + SIGTERM), as
    a process the signal ended; --resume then gives the uninterrupted run's steps. A second signal stops the run
    at once."""
    import signal

    base = ["--model", tiny_model_dir, "--save-steps", 0, "--eval-steps", 0, "--train-size", 3, *SMALL]
    common = [*base, "--steps", 3]
    run_train(*common, "--reward", "tests.reward_fns:hash_reward", "--output", tmp_path / "whole")
    out = tmp_path / "stopped"
    signalled = ["--reward", "tests.reward_fns:signalling_reward", "--output", out]
    env = {"RPO_ENGINE_TEST_SIGNAL": "TERM", "RPO_ENGINE_TEST_SIGNAL_AT_CALL": "13"}  # 3 x 4 completions a step
    proc = run_train(*common, *signalled, check=False, env=env)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "SIGTERM: stopping after this step, with a checkpoint (send it again to stop at once)" in proc.stderr
    assert (f"stopped by SIGTERM after step 2 of 3: {out / 'checkpoints' / 'step-2'} written; the same command with "
            f"--resume goes on from it") in proc.stdout
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"] and not (out / "final").exists()
    run_train(*common, *signalled, "--resume", env=dict(env, RPO_ENGINE_TEST_SIGNAL_AT_CALL="0"))
    for x, y in zip(read_metrics(tmp_path / "whole"), read_metrics(out), strict=True):
        for key in ("reward_mean", "rollout_generated_tokens", "loss", "grad_norm"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    # stopped in a run that went back to a checkpoint: its command would go back again, so --resume is what goes on
    proc = run_train(*base, "--steps", 4, *signalled[:2], "--resume-from-checkpoint", out / "checkpoints" / "step-2", check=False,
                     env=dict(env, RPO_ENGINE_TEST_SIGNAL_AT_CALL="1"))
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "step-3 written; --resume in place of --resume-from-checkpoint goes on from it" in proc.stdout
    # a second SIGUSR1 (SLURM's --signal) ends it at once, as without the handler: no checkpoint
    proc = run_train(*common, *signalled[:2], "--output", tmp_path / "now", check=False,
                     env=dict(env, RPO_ENGINE_TEST_SIGNAL="USR1", RPO_ENGINE_TEST_SIGNAL_TWICE="1"))
    assert proc.returncode == -signal.SIGUSR1 and "SIGUSR1: stopping after this step" in proc.stderr
    assert not (tmp_path / "now" / "checkpoints").exists()


@pytest.mark.parametrize("ignored", [False, True])
def test_ctrl_c_stops_after_the_step_with_a_checkpoint(tmp_path, tiny_model_dir, ignored):
    """Ctrl-C (SIGINT) in the middle of step 2 stops the run as SIGTERM does: step 2 finishes, its checkpoint is
    written, exit code 130, and the line says how to go on (it ended at once with 'interrupted', the steps since
    the last --save-steps lost, no word of resuming). A process started with SIGINT ignored (a script's `cmd &`)
    keeps ignoring it."""
    import signal

    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--save-steps", 0, "--eval-steps", 0, "--train-size", 3, *SMALL, "--steps", 3,
            "--reward", "tests.reward_fns:signalling_reward", "--output", out]
    handler = signal.SIG_IGN if ignored else signal.SIG_DFL  # not the suite's own (`cmd &` ignores it)
    proc = subprocess.run([sys.executable, "-m", "rpo_engine.train", "--no-progress", *map(str, args)],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, handler),
                          env={**os.environ, "OMP_NUM_THREADS": "1", "RPO_ENGINE_TEST_SIGNAL": "INT",
                               "RPO_ENGINE_TEST_SIGNAL_AT_CALL": "13"})
    if ignored:
        assert proc.returncode == 0 and (out / "final").is_dir(), proc.stderr[-2000:]
        return
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr[-2000:]
    assert "SIGINT: stopping after this step, with a checkpoint (send it again to stop at once)" in proc.stderr
    assert (f"stopped by SIGINT after step 2 of 3: {out / 'checkpoints' / 'step-2'} written; the same command with "
            f"--resume goes on from it") in proc.stdout
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-2"] and not (out / "final").exists()


def test_generation_config_outlives_the_checkpoint_a_run_resumed_from(tmp_path, tiny_model_dir):
    """A resumed run's model comes from checkpoints/step-N/model, which --save-total-limit prunes after the next
    save: the later checkpoints and final/ keep the stop tokens and sampling defaults of generation_config.json
    (a second resume from one of them would otherwise stop completions at other tokens)."""
    import rpo_engine

    step = tmp_path / "checkpoints" / "step-2" / "model"
    shutil.copytree(tiny_model_dir, step)
    (step / "generation_config.json").write_text('{"eos_token_id": [0, 5], "temperature": 0.7}\n')
    model, tokenizer = rpo_engine.load_model(step), rpo_engine.load_tokenizer(step)
    shutil.rmtree(step.parent)  # pruned
    model.save_pretrained(tmp_path / "final", tokenizer=tokenizer)
    assert (tmp_path / "final" / "generation_config.json").read_text() == '{"eos_token_id": [0, 5], "temperature": 0.7}\n'
    assert rpo_engine.load_model(tmp_path / "final").config.generation_eos_token_ids == (0, 5)


def cache_test_trainer(model_dir, *flags):
    """A Trainer on `model_dir` with one eval row and no progress bar: the experience-cache resume tests' own."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    return build_trainer(parse_args(["--model", str(model_dir), "--eval-size", "1", "--no-progress", *flags]))


def cache_every_row(trainer):
    """`trainer`, a cached path [5, 6, 7] put for each of its training rows."""
    for row in trainer.train_rows:
        trainer.cache.put(row["id"], [5, 6, 7], 1.0, 1)
    return trainer


def test_resume_drops_cached_paths_of_prompts_that_changed_under_their_id(tiny_model_dir, capsys):
    """The experience cache is keyed by prompt id: resumed on other rows under the same ids (the built-in task
    under another --seed, another or an edited dataset), a path answers another question, and a verified one
    would be kept and continued. Those are dropped, said once; the same rows keep every path."""
    def trainer(*flags):
        return cache_test_trainer(tiny_model_dir, "--train-size", "3", *flags)

    first = cache_every_row(trainer())
    state = first.state_dict()
    first.load_state_dict(state)
    assert len(first.cache) == 3 and "dropped" not in capsys.readouterr().err
    other = trainer("--seed", "7")
    assert [r["id"] for r in other.train_rows] == [r["id"] for r in first.train_rows]  # the same ids, other problems
    other.load_state_dict(state)
    assert len(other.cache) == 0
    assert "warning: resuming: dropped 3 cached RPO path(s) saved for another prompt under the same id (first " \
           "'train-000000'" in capsys.readouterr().err
    del state["cache"]["prompt_keys"]  # a checkpoint from before the digests: nothing to compare, all kept
    other.load_state_dict(state)
    assert len(other.cache) == 3


def test_resume_drops_cached_paths_whose_prompt_encodes_to_other_tokens(tmp_path, tiny_model_dir, capsys):
    """The same rows read through another encoding (--chat-template-kwargs such as Qwen3's enable_thinking,
    --no-chat-template; a tokenizer whose template changed): the prompt's token ids differ, so a cached path
    continues an answer to a prompt the model no longer reads. Dropped, said once; the same encoding keeps them."""
    from tests.helpers import with_chat_template

    model_dir = with_chat_template(tiny_model_dir, tmp_path / "chat_model",
                                   "{% for m in messages %}Q: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt "
                                   "%}A: {% if enable_thinking is defined and not enable_thinking %}<think></think>"
                                   "{% endif %}{% endif %}")

    def trainer(*flags):
        return cache_test_trainer(model_dir, "--train-size", "3", *flags)

    first = cache_every_row(trainer())
    state = first.state_dict()
    trainer().load_state_dict(state)
    assert "dropped" not in capsys.readouterr().err
    for flags in (["--chat-template-kwargs", '{"enable_thinking": false}'], ["--no-chat-template"]):
        other = trainer(*flags)
        assert [r["prompt"] for r in other.train_rows] == [r["prompt"] for r in first.train_rows]
        assert other.prompt_ids != first.prompt_ids
        other.load_state_dict(state)
        assert len(other.cache) == 0, flags
        assert "warning: resuming: dropped 3 cached RPO path(s)" in capsys.readouterr().err
    # a checkpoint from before the token ids were digested (its digests: of the rows' prompts and answers) keeps
    # the same rows' paths, and drops those of other rows under the same ids
    state["cache"]["prompt_keys"] = {row["id"]: hashlib.sha1(json.dumps([row["prompt"], row.get("answer")],
                                     sort_keys=True, default=str).encode()).hexdigest()[:16] for row in first.train_rows}
    again = trainer()
    again.load_state_dict(state)
    assert len(again.cache) == 3 and "dropped" not in capsys.readouterr().err
    other = trainer("--seed", "7")
    other.load_state_dict(state)
    assert len(other.cache) == 0 and "dropped 3 cached RPO path(s)" in capsys.readouterr().err


def test_a_path_outside_a_resumed_runs_rows_keeps_its_prompts_digest(tiny_model_dir, capsys):
    """A run resumed on fewer rows (--train-size 2) keeps the paths of the rows it left out, and its checkpoints
    must keep their digests: they lost them, so a later resume on other rows under those ids (--train-size 3
    --seed 7) kept such a path and continued an answer to another question."""
    def trainer(*flags):
        return cache_test_trainer(tiny_model_dir, *flags)

    first = cache_every_row(trainer("--train-size", "3"))
    fewer = trainer("--train-size", "2", "--prompts-per-step", "2")
    fewer.load_state_dict(first.state_dict())
    assert len(fewer.cache) == 3  # the left-out row's path is kept, for a run that takes that row again
    other = trainer("--train-size", "3", "--seed", "7")
    other.load_state_dict(fewer.state_dict())
    assert len(other.cache) == 0
    assert "dropped 3 cached RPO path(s)" in capsys.readouterr().err
    again = trainer("--train-size", "3")  # the first run's rows: every path is still theirs
    again.load_state_dict(fewer.state_dict())
    assert len(again.cache) == 3


def test_a_hub_model_id_trains_and_resumes_from_the_local_cache(tmp_path, tiny_model_dir):
    """--model org/name: the Hugging Face cache's copy (HF_HUB_OFFLINE here), recorded as the id; the snapshot's
    directory names the same model on resume (no error, no changed-option warning); an id in no cache is one
    line, exit 2, nothing written."""
    import os

    from tests.helpers import hub_snapshot

    cache = tmp_path / "hub"
    snapshot = hub_snapshot(cache, "org/tiny", tiny_model_dir)
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1")

    def train(*args):
        return subprocess.run([sys.executable, "-m", "rpo_engine.train", "--no-progress", *map(str, args), *map(str, SMALL),
                               "--eval-steps", "0"], capture_output=True, text=True, timeout=600, cwd=REPO, env=env)

    out = tmp_path / "run"
    proc = train("--model", "org/tiny", "--steps", 1, "--save-steps", 1, "--output", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["model"] == "org/tiny"
    import rpo_engine

    assert rpo_engine.load_tokenizer(out / "final").get_vocab() == rpo_engine.load_tokenizer(snapshot).get_vocab()
    proc = train("--model", snapshot, "--steps", 2, "--resume", "--output", out)
    assert proc.returncode == 0 and "warning" not in proc.stderr, proc.stderr[-3000:]
    assert [m["step"] for m in read_metrics(out)] == [1, 2]
    proc = train("--model", "org/missing", "--steps", 1, "--output", tmp_path / "other")
    assert_user_error(proc, "org/missing: no such directory, and no Hugging Face Hub model", str(cache),
                      "HF_HUB_OFFLINE is set")
    assert not (tmp_path / "other").exists()


def test_where_model_is_resolves_a_directory_and_keeps_an_id_in_no_cache(tmp_path, monkeypatch):
    """The resume check compares --model by where it is: a directory as its resolved path (a relative and an
    absolute spelling are one model), and a Hub id in no cache as written, resolved, not an error (a full
    fine-tune resumes from its checkpoint without its --model)."""
    import huggingface_hub.constants

    from rpo_engine.train import where_model_is

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert where_model_is("models/m") == where_model_is(str(tmp_path / "models" / "m")) == (tmp_path / "models/m").resolve()
    assert where_model_is("org/missing") == (tmp_path / "org" / "missing").resolve()


def test_resuming_with_other_memory_settings_is_no_changed_run(tmp_path, capsys):
    """A run out of GPU memory is told to lower --micro-batch-tokens or add --gradient-checkpointing: resumed with
    them (or with --no-prefix-sharing, the layout's reference) it trains what it did, so no warning names them;
    a training option still is."""
    from rpo_engine.config import config_to_dict, parse_args
    from rpo_engine.train import warn_changed_options

    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(config_to_dict(parse_args(["--learning-rate", "1e-3"]))))
    warn_changed_options(saved, parse_args(["--learning-rate", "1e-3", "--micro-batch-tokens", "1024",
                                            "--gradient-checkpointing", "--no-prefix-sharing"]))
    assert capsys.readouterr().err == ""
    warn_changed_options(saved, parse_args(["--learning-rate", "2e-3", "--micro-batch-tokens", "1024"]))
    assert capsys.readouterr().err == "warning: resuming with changed options: learning_rate 0.001 -> 0.002\n"


def test_an_older_runs_boolean_scale_rewards_is_no_changed_option(tmp_path, capsys):
    """Runs written before --scale-rewards took TRL's names recorded it as a boolean (true: "group", false: "none",
    as config_from_dict reads it): resumed with the same meaning, no warning names it; another meaning still is."""
    from rpo_engine.config import config_to_dict, parse_args
    from rpo_engine.train import warn_changed_options

    saved = tmp_path / "config.json"
    for recorded, same, other in ((True, "group", "none"), (False, "none", "batch")):
        options = config_to_dict(parse_args([]))
        options["algo"]["scale_rewards"] = recorded
        saved.write_text(json.dumps(options))
        warn_changed_options(saved, parse_args(["--scale-rewards", same]))
        assert capsys.readouterr().err == ""
        warn_changed_options(saved, parse_args(["--scale-rewards", other]))
        assert capsys.readouterr().err == (f"warning: resuming with changed options: scale_rewards {same!r} -> "
                                           f"{other!r}\n")


def test_resume_matches_uninterrupted_with_dapo_mini_batches_and_a_moving_reference(tmp_path, tiny_model_dir):
    """What the end-to-end resume tests leave out, together, through a checkpoint on disk as train.py resumes:
    DAPO resampling in a resumed step, two mini-batches and two passes per step, a KL reference that
    --sync-ref-model moves (restored from the checkpoint's reference/), warmup into a cosine schedule, and
    the data crossing an epoch boundary of a 4-row set. Every later step, the cache, the weights: the same."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    config = parse_args(["--model", str(tiny_model_dir), "--no-progress", "--steps", "3", "--train-size", "4",
                         "--prompts-per-step", "3", "--num-generations", "4", "--max-completion-length", "12",
                         "--eval-size", "1", "--learning-rate", "1e-3", "--reward", "tests.reward_fns:hash_reward",
                         "--algo", "dapo", "--max-resample-rounds", "2", "--ppo-mini-batch-size", "2",
                         "--num-iterations", "2", "--beta", "0.05", "--sync-ref-model", "--ref-model-sync-steps", "1",
                         "--warmup-ratio", "0.5", "--lr-scheduler-type", "cosine"])
    full = build_trainer(config)
    first = full.step()
    full.save_checkpoint(tmp_path / "step-1")
    later = [full.step() for _ in range(2)]
    resumed = build_trainer(config, tmp_path / "step-1")
    resumed.load_state_dict(torch.load(tmp_path / "step-1" / "trainer_state.pt", map_location="cpu", weights_only=True))
    assert first["lr"] < later[0]["lr"]  # in the warmup at the checkpoint
    for x in later:
        y = resumed.step()
        assert {k: v for k, v in x.items() if not k.endswith("_time_s")} == \
               {k: v for k, v in y.items() if not k.endswith("_time_s")}
    assert later[0]["num_prompts_sampled"] > 3  # DAPO resampled in the first resumed step
    assert resumed.rows_drawn == full.rows_drawn > 4
    assert str(resumed.cache.state_dict()) == str(full.cache.state_dict())  # str: a cold start's reward is NaN
    for a, b in ((full.model, resumed.model), (full.reference, resumed.reference)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_truncate_log(tmp_path):
    from rpo_engine.errors import UserError
    from rpo_engine.train import truncate_log

    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "a": 1}\n\n{"step": 2}\n{"step": 3}\n{"step": 4, "a"')  # killed mid-line
    assert truncate_log(log, 2, keep=True) == [{"step": 1, "a": 1}, {"step": 2}]
    assert log.read_text() == '{"step": 1, "a": 1}\n{"step": 2}\n'
    log.write_text('{"step": 1}\n{"step": 2, "a"\n{"step": 3}\n')  # a bad line that is not the last
    with pytest.raises(UserError, match=r"metrics\.jsonl:2: not a JSON record with a step"):
        truncate_log(log, 5)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "a"\n{"step": 3}\n'  # untouched
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left
    log.write_text('{"step": 1}\n{"step": 2}\n')
    assert truncate_log(log, 1, keep=True, check_only=True) == [{"step": 1}]
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'  # only read
    # a log we cannot read is a one-line error too, not a traceback
    log.write_bytes(b'{"step": 1}\n{"step": 2, "note": "\xff"}\n')
    with pytest.raises(UserError, match=r"metrics\.jsonl: not UTF-8 text \(a line holds the byte 0xff\)"):
        truncate_log(log, 1)
    log.unlink()
    log.mkdir()
    with pytest.raises(UserError, match=r"metrics\.jsonl: Is a directory"):
        truncate_log(log, 1)


def test_truncate_log_cuts_a_log_in_step_order_in_place(tmp_path):
    """A long run's --log-completions log holds gigabytes: each resume copied it whole into a temporary file (as
    much free disk again, or the resume failed) even where nothing was dropped. Its end is cut in place; a log
    whose dropped lines are not its end is still rewritten."""
    from rpo_engine.train import truncate_log

    log = tmp_path / "completions.jsonl"
    log.write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 2, 3)) + '{"step": 4, "a"')  # killed mid-line
    inode = log.stat().st_ino
    assert truncate_log(log, 3, keep=True) == [{"step": 1}, {"step": 2}, {"step": 2}, {"step": 3}]
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 2}\n{"step": 3}\n'
    assert truncate_log(log, 3) == [] and truncate_log(log, 1) == []
    assert log.read_text() == '{"step": 1}\n' and log.stat().st_ino == inode
    assert [p.name for p in tmp_path.iterdir()] == ["completions.jsonl"]
    log.write_text('{"step": 1}\n{"step": 3}\n{"step": 2}\n')  # not in step order
    assert truncate_log(log, 2, keep=True) == [{"step": 1}, {"step": 2}]
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'


def test_tensorboard_logs_what_metrics_jsonl_holds(tmp_path, tiny_model_dir, monkeypatch):
    """TensorBoard (--report-to auto, where it is installed) gets every metrics.jsonl record at its step, the step-0
    eval too, and a resumed run hides what the run before logged past its checkpoint (purge_step), as
    metrics.jsonl is cut back there."""
    from rpo_engine import reporting, train

    class Writer:
        def __init__(self, purge_step):
            self.purge_step, self.scalars = purge_step, []

        def add_scalar(self, key, value, step):
            self.scalars.append((key, value, step))

        def close(self):
            pass

    writers = []
    monkeypatch.setattr(reporting, "installed", lambda package: package == "tensorboard")
    monkeypatch.setattr(reporting, "open_tensorboard",
                        lambda output, purge_step: writers.append(Writer(purge_step)) or writers[-1])
    monkeypatch.setattr(train, "write_plot", lambda *args: None)  # its own test; here it would double the time
    args = ["--model", tiny_model_dir, "--output", tmp_path, "--no-progress", "--prompts-per-step", 1,
            "--num-generations", 2, "--max-completion-length", 4, "--train-size", 1, "--eval-size", 1]
    assert train.main(list(map(str, [*args, "--steps", 1]))) == 0
    assert train.main(list(map(str, [*args, "--steps", 2, "--resume"]))) == 0
    assert [w.purge_step for w in writers] == [0, 2]
    logged = [(key, value, step) for w in writers for key, value, step in w.scalars]
    expected = [(key, value, m["step"]) for m in read_metrics(tmp_path) for key, value in m.items()
                if key != "step" and value is not None]
    assert logged == expected and ("eval_accuracy", expected[0][1], 0) == expected[0]


def test_report_to_wandb_logs_each_record_and_a_resume_continues_its_run(tmp_path, tiny_model_dir, monkeypatch):
    """--report-to wandb: one W&B run for the run's options (project $WANDB_PROJECT), every metrics.jsonl record
    logged with its step as the x axis, finished at the end; a resume continues the same W&B run (its id kept in
    OUTPUT/wandb_run_id) and logs the redone steps again. W&B itself is a stand-in here (not installed in CI):
    what is checked is the calls, as W&B's API documents them."""
    import types

    from rpo_engine import reporting, train

    runs = []

    class Run:
        def __init__(self, **kwargs):
            self.init, self.metrics, self.logged, self.finished = kwargs, [], [], False

        def define_metric(self, name, step_metric=None):
            self.metrics.append((name, step_metric))

        def log(self, data):
            self.logged.append(dict(data))

        def finish(self):
            self.finished = True

    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: runs.append(Run(**kwargs)) or runs[-1]
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setattr(reporting, "installed", lambda package: package == "wandb")
    monkeypatch.setattr(train, "write_plot", lambda *args: None)
    monkeypatch.setenv("WANDB_PROJECT", "grpo-tests")
    out = tmp_path / "run-7"
    args = ["--model", tiny_model_dir, "--output", out, "--no-progress", "--prompts-per-step", 1, "--num-generations", 2,
            "--max-completion-length", 4, "--train-size", 1, "--eval-size", 1, "--eval-steps", 2, "--report-to", "wandb"]
    assert train.main(list(map(str, [*args, "--steps", 2, "--save-steps", 1]))) == 0
    first = runs[0]
    assert first.init["project"] == "grpo-tests" and first.init["name"] == "run-7" and first.init["resume"] == "allow"
    assert first.init["config"] == json.loads((out / "config.json").read_text()) and first.init["dir"] == str(out)
    assert (out / "wandb_run_id").read_text().strip() == first.init["id"] and first.finished
    assert first.metrics == [("step", None), ("*", "step")]
    records = read_metrics(out)
    assert first.logged == [{k: v for k, v in m.items() if isinstance(v, (int, float))} for m in records]
    assert [m["step"] for m in first.logged] == [0, 1, 2] and "eval_accuracy" in first.logged[0]
    # resumed from step 1's checkpoint: the same W&B run, step 2 logged again
    shutil.rmtree(out / "checkpoints" / "step-2")
    assert train.main(list(map(str, [*args, "--steps", 3, "--resume"]))) == 0
    assert runs[1].init["id"] == first.init["id"] and [m["step"] for m in runs[1].logged] == [2, 3]
    assert runs[1].logged == [{k: v for k, v in m.items() if isinstance(v, (int, float))} for m in read_metrics(out)[2:]]


def fake_wandb(monkeypatch, logged: list | None = None) -> list[dict]:
    """A stand-in `wandb` module: -> the keyword arguments of each wandb.init; `logged` gets what the runs log."""
    import types

    inits = []

    class Run:
        define_metric = finish = lambda self, *args, **kwargs: None

        def log(self, data):
            if logged is not None:
                logged.append(data)

    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: inits.append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    return inits


def test_a_resume_whose_wandb_run_id_is_empty_starts_a_new_wandb_run(tmp_path, monkeypatch):
    """OUTPUT/wandb_run_id emptied (or gone): a new W&B run with a new id, kept in the file; never id ''."""
    from rpo_engine.reporting import Reporter

    inits = fake_wandb(monkeypatch)
    for text in ("", "\n", None):
        (tmp_path / "wandb_run_id").unlink(missing_ok=True)
        if text is not None:
            (tmp_path / "wandb_run_id").write_text(text)
        Reporter(["wandb"], tmp_path, {}, resumed_at=3)
        assert inits[-1]["id"] and (tmp_path / "wandb_run_id").read_text() == inits[-1]["id"] + "\n"


def test_a_new_run_starts_its_own_wandb_run_and_logs_only_numbers(tmp_path, monkeypatch):
    """A new run (not a resume) where an earlier run left OUTPUT/wandb_run_id starts a W&B run of its own, in
    project rpo_engine where $WANDB_PROJECT is unset; a record's booleans, strings and nulls are not logged."""
    from rpo_engine.reporting import Reporter

    logged = []
    inits = fake_wandb(monkeypatch, logged)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    (tmp_path / "wandb_run_id").write_text("earlier\n")
    reporter = Reporter(["wandb"], tmp_path, {}, resumed_at=None)
    assert inits[0]["id"] != "earlier" and (tmp_path / "wandb_run_id").read_text() == inits[0]["id"] + "\n"
    assert inits[0]["project"] == "rpo_engine"
    reporter.log({"step": 3, "loss": 0.5, "tokens": 7, "truncated": True, "note": "x", "eval_accuracy": None})
    assert logged == [{"step": 3, "loss": 0.5, "tokens": 7}]


def test_a_wandb_run_is_named_by_the_output_directory_however_written(tmp_path, monkeypatch):
    """--output . (or ..) has no name of its own: W&B got name "" and made one up, where --push-to-hub's repository
    takes the directory's real name; both name the run alike now."""
    from rpo_engine.reporting import Reporter

    inits = fake_wandb(monkeypatch)
    (tmp_path / "run-3" / "sub").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "run-3" / "sub")
    for output in (Path("."), Path("..")):
        Reporter(["wandb"], output, {}, resumed_at=None)
    assert [kwargs["name"] for kwargs in inits] == ["sub", "run-3"]


def test_report_to_none_reports_nowhere_where_tensorboard_is_installed(monkeypatch):
    """--report-to none is no sink at all, TensorBoard installed or not (auto would pick it)."""
    from rpo_engine import reporting

    monkeypatch.setattr(reporting, "installed", lambda package: True)
    assert reporting.report_targets("none") == [] and reporting.report_targets(" none ") == []


def test_a_lora_run_on_a_hub_model_names_its_base_by_the_id(tmp_path, tiny_model_dir, monkeypatch):
    """--model org/name --use-peft: final-adapter/'s adapter_config.json names the base as PEFT does, by the id
    (loadable on another machine), not by this machine's cache snapshot."""
    import types

    import huggingface_hub

    import rpo_engine
    from rpo_engine.config import parse_args
    from rpo_engine.model.lora import apply_lora
    from rpo_engine.trainer import Trainer
    from tests.helpers import hub_snapshot

    hub_snapshot(tmp_path / "hub", "org/tiny", tiny_model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    trainer = types.SimpleNamespace(  # what save_model reads of a Trainer
        model=apply_lora(rpo_engine.load_model("org/tiny"), r=2), lora=True, tokenizer=None,
        config=parse_args(["--model", "org/tiny", "--use-peft"]), dist=types.SimpleNamespace(is_main=True),
        sync_rollout_weights=lambda: None)
    Trainer.save_model(trainer, tmp_path / "final")
    assert json.loads((tmp_path / "final-adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] \
        == "org/tiny"


def test_a_directory_named_like_a_sink_is_not_the_sink(tmp_path, monkeypatch):
    """A run started where its --output's tensorboard/ (or a wandb/ of W&B's runs) lies: that directory, found on
    sys.path as a namespace package, is not TensorBoard or W&B installed (auto: no TensorBoard, as before)."""
    from rpo_engine import reporting

    for name in ("tensorboard", "wandb"):
        (tmp_path / name).mkdir()
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reporting.installed("json") and not reporting.installed("tensorboard") and not reporting.installed("wandb")


def test_report_to_names_what_it_cannot_do(monkeypatch, tmp_path):
    from rpo_engine import reporting
    from rpo_engine.config import parse_args
    from rpo_engine.errors import UserError

    monkeypatch.setattr(reporting, "installed", lambda package: False)
    with pytest.raises(UserError, match=r"^--report-to wandb: wandb is not installed \(pip install wandb\)$"):
        parse_args(["--report-to", "wandb"])
    with pytest.raises(UserError, match=r"^--report-to tensorboard: tensorboard is not installed"):
        parse_args(["--report-to", "tensorboard"])
    for value in ("mlflow", "none,wandb", "", "auto,wandb"):
        with pytest.raises(UserError, match=f"^--report-to {value}: expected auto, none, or a comma-separated list of "
                                            f"tensorboard, wandb$"):
            parse_args(["--report-to", value])
    assert reporting.report_targets("none") == [] and reporting.report_targets("auto") == []  # nothing installed
    for value in ("none,", "tensorboard,,wandb", ",auto"):  # as --reward and --lora-target-modules refuse them
        with pytest.raises(UserError, match=f"^--report-to {value}: an empty name in the list$"):
            reporting.report_targets(value)
    monkeypatch.setattr(reporting, "installed", lambda package: True)
    assert reporting.report_targets("wandb, tensorboard,wandb") == ["wandb", "tensorboard"]
    assert reporting.report_targets("auto") == ["tensorboard"]  # as before the option: TensorBoard where installed
    yaml = tmp_path / "run.yaml"
    yaml.write_text("report_to: [wandb, tensorboard]\n")  # TRL's YAML writes a list
    assert parse_args(["--config", str(yaml)]).report_to == "wandb,tensorboard"


@pytest.mark.parametrize("num_steps", [1, 3])
def test_plot_draws_every_panel(tmp_path, num_steps):
    """curves.png shows each series, a one-step run's too (a line through one point draws nothing)."""
    import matplotlib.image
    import numpy as np

    from rpo_engine.train import write_plot

    records = [{"step": 0, "eval_accuracy": 0.5}] + [
        {"step": s, "reward_mean": 0.2 * s, "rollout_generated_tokens": 100 + s} for s in range(1, num_steps + 1)]
    write_plot(records, tmp_path / "curves.png", "test")
    image = matplotlib.image.imread(tmp_path / "curves.png")[..., :3]
    blue = (np.abs(image - np.array([0x1f, 0x77, 0xb4]) / 255).max(-1) < 0.05)  # matplotlib's first line colour
    thirds = np.array_split(blue, 3, axis=1)
    assert all(panel.sum() > 20 for panel in thirds), [int(panel.sum()) for panel in thirds]
    orange = lambda image: (np.abs(image - np.array([0xff, 0x7f, 0x0e]) / 255).max(-1) < 0.05).sum()  # the second
    assert orange(image) == 0
    records[0]["eval_pass_at_k"] = 0.75  # a sampled eval: pass@K drawn beside avg@K
    write_plot(records, tmp_path / "sampled.png", "test", "eval accuracy, avg@4 at T=1")
    assert orange(matplotlib.image.imread(tmp_path / "sampled.png")[..., :3]) > 20


def test_the_plot_leaves_the_callers_matplotlib_as_it_was(tmp_path):
    """A run from a notebook or a script draws curves.png without pyplot: matplotlib.use("Agg") switched the
    caller's backend (a notebook's inline plots stopped showing after train()), and pyplot's figures are its
    global state (and its GUI backends refuse a worker thread)."""
    script = f"""
import matplotlib
matplotlib.use("svg")  # the caller's backend (a notebook's inline one)
import matplotlib.pyplot as plt
from pathlib import Path
from rpo_engine.train import write_plot
plt.figure()
write_plot([{{"step": 1, "reward_mean": 0.5, "rollout_generated_tokens": 3}}], Path({str(tmp_path / "c.png")!r}), "t")
print(matplotlib.get_backend(), plt.get_fignums())
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0] == "svg [1]"
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_log_completions(tmp_path, tiny_model_dir):
    common = ["--model", tiny_model_dir, "--steps", 2, "--eval-steps", 0, "--train-size", 3, "--log-completions",
              "--reward", "tests.reward_fns:hash_reward", *SMALL]
    for name, flags in (("rpo", []), ("full", ["--no-rpo"])):
        run_train(*common, "--output", tmp_path / name, *flags)
        records = [json.loads(line) for line in (tmp_path / name / "completions.jsonl").read_text().splitlines()]
        metrics = read_metrics(tmp_path / name)
        assert len(records) == 2 * 3 * 4  # steps x prompts x G
        for m in metrics:
            step = [r for r in records if r["step"] == m["step"]]
            assert sum(r["reward"] for r in step) / len(step) == pytest.approx(m["reward_mean"])
            assert sum(r["finish_reason"] == "length" for r in step) / len(step) == pytest.approx(m["frac_truncated"])
            for prompt_id in {r["prompt_id"] for r in step}:  # group-normalised: the advantages sum to 0
                assert sum(r["advantage"] for r in step if r["prompt_id"] == prompt_id) == pytest.approx(0, abs=1e-5)
            if name == "full":  # no cold starts: the completions are every generated token
                assert sum(r["completion_tokens"] for r in step) == m["rollout_generated_tokens"]
        assert all(isinstance(r["completion"], str) and r["finish_reason"] in ("stop", "length") for r in records)
        kept = [r["kept_tokens"] for r in records]
        assert (max(kept) > 0) if name == "rpo" else (max(kept) == 0 and {r["kept"] for r in records} == {""})


def test_advantages_keep_the_rewards_double_precision(tiny_model_dir):
    """Rewards are Python floats: 1e8 + 0 and 1e8 + 1 differ, but are one float32 (spacing 8 there), which made every
    group look uninformative (advantages 0, nothing learned), and past float32's range (1e39) inf, then NaN
    advantages and a skipped update. The advantages are the fp64 formula of the rewards the function returned."""
    from rpo_engine.algos.grpo import group_advantages
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--no-progress", "--no-rpo", "--eval-steps", "0",
                                        "--reward", "tests.reward_fns:offset_hash_reward", "--no-length-shaping",
                                        "--log-completions", *map(str, SMALL)]))
    trainer.step()
    records = trainer.completions
    groups = {}
    for r in records:
        groups.setdefault(r["prompt_id"], []).append(r)
    assert any(len({r["reward"] for r in group}) > 1 for group in groups.values())  # else nothing to tell apart
    for group in groups.values():
        want = group_advantages(torch.tensor([[r["reward"] for r in group]], dtype=torch.float64))[0]
        assert [r["advantage"] for r in group] == pytest.approx(want.tolist(), abs=1e-6)


def test_stop_strings_end_rpo_and_full_path_completions(tmp_path, tiny_model_dir):
    """--stop (vLLM's name): every sample ends at the first of its tokens that completes a stop string in the
    answer's text, an RPO suffix's kept path included, the prompt's not (the brute-force rule of test_rollout),
    or runs to its budget or eos without one; a YAML list is the flag's JSON list; a bad value is one line."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer
    from tests.test_rollout import first_stop

    strings = ["1", "2", "3", " ", "a"]
    base = ["--model", str(tiny_model_dir), "--no-progress", "--eval-steps", "0", "--train-size", "3",
            "--stop", json.dumps(strings), *map(str, SMALL)]
    stopped, samples, kept = 0, 0, 0
    for flags in ([], ["--no-rpo"]):
        trainer = build_trainer(parse_args([*base, *flags]))
        groups, score = [], trainer.score_groups
        trainer.score_groups = lambda gs: (score(gs), groups.extend(gs))
        for _ in range(3):
            trainer.step()
        for g in groups:
            before = g.prompt_ids + g.kept_ids
            kept += len(g.kept_ids) > 0
            for suffix, reason in zip(g.suffix_ids, g.finish_reasons):
                at = first_stop(trainer.tokenizer, before + suffix, len(before), strings, len(g.prompt_ids))
                ends_at_eos = suffix and suffix[-1] in trainer.eos_ids
                assert at == (len(suffix) - 1 if reason == "stop" and not ends_at_eos else None), (suffix, reason)
                stopped, samples = stopped + (at is not None), samples + 1
    assert stopped > samples // 2 and kept > 0  # most samples met one; RPO continued kept paths
    (tmp_path / "stop.yaml").write_text("stop: " + json.dumps(strings) + "\n")
    assert parse_args(["--config", str(tmp_path / "stop.yaml")]).stop == json.dumps(strings)
    for value in ('[""]', "[1]", '["a", 2]', '""'):
        proc = run_train("--output", tmp_path / "bad", "--stop", value, check=False)
        assert_user_error(proc, f"--stop must be a string or a JSON list of non-empty strings, e.g. '[\"</answer>\"]', got {value!r}")


def test_completion_records_split_the_text_the_reward_read(tiny_model_dir):
    """A cut inside a character's bytes: `kept` + `completion` is still the answer's text, not two halves
    decoded apart (U+FFFD each)."""
    from rpo_engine import load_tokenizer
    from rpo_engine.trainer import Group, Trainer

    trainer = object.__new__(Trainer)  # completion_records reads the tokenizer and the step alone
    trainer.tokenizer, trainer.extra_rewards, trainer.step_num = load_tokenizer(tiny_model_dir), [], 1
    ids = trainer.tokenizer.encode("12 é€ 3", add_special_tokens=False)
    cut = len(trainer.tokenizer.encode("12 ", add_special_tokens=False)) + 1  # inside é's two bytes
    assert trainer.tokenizer.decode(ids[:cut]).endswith("\ufffd")
    group = Group({"id": "0"}, [5], ids[:cut], [ids[cut:]], [[0.0] * (len(ids) - cut)], ["stop"],
                  rewards=[0.0], correct=[False])
    record, = trainer.completion_records([group])
    assert record["kept"] + record["completion"] == "12 é€ 3" and record["kept"] == "12 "
    assert record["kept_tokens"] == cut and record["completion_tokens"] == len(ids) - cut


def test_what_rewards_log_under_a_name_the_trainer_uses_is_an_error_not_an_overwrite():
    """log_metric's name or log_extra's column, when the trainer's metrics or completions record already use it."""
    from rpo_engine.distributed import Dist
    from rpo_engine.errors import UserError
    from rpo_engine.rewards import TRLStyleReward
    from rpo_engine.trainer import Trainer, add_columns

    record = {"step": 1, "completion": "2"}
    add_columns(record, {"why": ["a", "b"]}, 1)
    assert record == {"step": 1, "completion": "2", "why": "b"}
    with pytest.raises(UserError, match="logged the column 'completion' \\(log_extra\\), a name the completions log uses"):
        add_columns(record, {"completion": ["x", "y"]}, 0)
    trainer = object.__new__(Trainer)
    trainer.dist, trainer.extra_rewards = Dist(), []
    trainer.reward_fn = TRLStyleReward(lambda completions, log_metric: [0.0] * len(completions), "judge")
    assert trainer.logged_reward_metrics({"judge/x": [1.0, 2.0]}, {"loss": 0.5}) == {"loss": 0.5, "judge/x": 1.5}
    with pytest.raises(UserError, match="logged the metric 'eval_accuracy' \\(log_metric\\), a name the trainer logs"):
        trainer.logged_reward_metrics({"accuracy": [1.0]}, {"eval_accuracy": 0.5}, prefix="eval_")
    with pytest.raises(UserError, match="logged the metric 'eval_judge' .* \\(or an eval's, eval_\\*\\)"):
        trainer.logged_reward_metrics({"eval_judge": [1.0]}, {"loss": 0.5})  # an eval step's would overwrite it


def test_conversational_dataset_through_the_chat_template(tmp_path, tiny_model_dir):
    """TRL-style rows (a system message, then the user's) train through the model's chat template."""
    from tests.helpers import with_chat_template

    # each turn ends in a special token, as Qwen's <|im_end|>: the logged prompt keeps it (what the model read)
    model_dir = with_chat_template(tiny_model_dir, tmp_path / "chat_model",
                                   "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|endoftext|>\n"
                                   "{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}")
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "system", "content": "Add."},
                                                   {"role": "user", "content": f"{i}+{i}="}], "answer": str(2 * i)})
                            + "\n" for i in range(3)))
    run_train("--model", model_dir, "--dataset", data, "--steps", 1, "--eval-steps", 0, "--log-completions",
              "--output", tmp_path / "out", *SMALL)
    records = [json.loads(line) for line in (tmp_path / "out" / "completions.jsonl").read_text().splitlines()]
    assert {r["prompt"] for r in records} == {f"[system] Add.<|endoftext|>\n[user] {i}+{i}=<|endoftext|>\n[assistant] "
                                              for i in range(3)}


def test_trl_style_reward_trains_like_ours(tmp_path, tiny_model_dir):
    """The same reward written TRL's way (a list of completions in, a list of rewards out) trains the same run;
    so does an async one, which logs, as TRL lets it, a metric (the trainer_state.global_step it was shown:
    the steps done before) and a column of the completions log."""
    common = ["--model", tiny_model_dir, "--steps", 2, "--eval-steps", 2, "--train-size", 3, *SMALL]
    run_train(*common, "--reward", "tests.reward_fns:hash_reward", "--output", tmp_path / "ours")
    run_train(*common, "--reward", "tests.reward_fns:trl_hash_reward", "--output", tmp_path / "trl")
    run_train(*common, "--reward", "tests.reward_fns:async_judge", "--log-completions", "--output", tmp_path / "judge")
    ours, trl, judge = read_metrics(tmp_path / "ours"), read_metrics(tmp_path / "trl"), read_metrics(tmp_path / "judge")
    assert len(ours) == len(trl) == 3 and 0 < ours[1]["reward_mean"] < 1
    assert [(m.get("judge/global_step"), m.get("eval_judge/global_step")) for m in judge] == \
        [(None, 0), (0, None), (1, 2)]  # evals at steps 0 and 2; step k's rewards are scored after k - 1 steps
    records = [json.loads(line) for line in (tmp_path / "judge" / "completions.jsonl").read_text().splitlines()]
    assert len(records) == 2 * 3 * 4 and all(r["judge_verdict"] == ("right" if r["correct"] else "wrong") for r in records)
    for a, b in [*zip(ours, trl), *zip(ours, judge)]:
        for key in ("eval_accuracy", "reward_mean", "rollout_generated_tokens", "cache_verified_rate"):
            assert a.get(key) == b.get(key), key
        for key in ("loss", "grad_norm"):  # the same computation; approx only against thread-count rounding
            assert (key in a) == (key in b), key  # step 0's record is an eval alone (pytest 9.2's approx refuses None)
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-8), key


def test_sampling_options_reach_the_engine(tiny_model_dir):
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--temperature", "0.9", "--top-p", "0.95",
                                        "--top-k", "40", "--min-p", "0.05", "--repetition-penalty", "1.2"]))
    p = trainer.sampling_params(4, 16, seed=1)
    assert ((p.n, p.max_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p, p.repetition_penalty)
            == (4, 16, 0.9, 0.95, 40, 0.05, 1.2))
    rows = trainer.train_rows[:2]
    groups, _ = trainer.rollout(rows, 0)  # and the engine samples with them
    assert all(len(g.suffix_ids) == 8 for g in groups)


def test_the_rollout_prefills_what_the_run_can_hold_not_the_whole_context(tmp_path, tiny_model_dir, monkeypatch):
    """The engine's tokens per prefill step size its CUDA warm-up forward, whose activations it holds back from the
    K/V cache: a model of Llama 3.1's 131072-token context (here a tiny one that says so) gets 8192, or the longest
    prompt + --max-completion-length + 1 where longer, in training and in the eval command, not 131072."""
    import rpo_engine.rollout
    from rpo_engine.config import parse_args
    from rpo_engine.eval import main
    from rpo_engine.train import build_trainer

    model = tmp_path / "long"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(config, max_position_embeddings=131072)))
    for completion in (40, 9000):
        trainer = build_trainer(parse_args(["--model", str(model), "--train-size", "3", "--eval-size", "2",
                                            "--max-completion-length", str(completion), "--no-progress"]))
        longest = max(map(len, [*trainer.prompt_ids.values(), *trainer.eval_prompt_ids]))
        assert trainer.engine.scheduler.max_num_batched_tokens == max(8192, longest + completion + 1)

    def recorded(self, model, **kwargs):  # the eval's engine, not its 9000-token greedy decoding
        raise RuntimeError(f"max_num_batched_tokens={kwargs['max_num_batched_tokens']}")

    monkeypatch.setattr(rpo_engine.rollout.RolloutEngine, "__init__", recorded)
    longest = max(map(len, trainer.eval_prompt_ids))
    with pytest.raises(RuntimeError, match=f"^max_num_batched_tokens={longest + 9001}$"):
        main(["--model", str(model), "--eval-size", "2", "--max-completion-length", "9000", "--no-progress"])


@pytest.mark.parametrize("warmup", [["--warmup-ratio", "0.2"], ["--warmup-steps", "2"]])  # the latter transformers 5's
def test_optimizer_options_reach_the_optimizer(tiny_model_dir, warmup):
    from rpo_engine.config import parse_args
    from rpo_engine.optim import lr_multiplier
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--adam-beta1", "0.8", "--adam-beta2", "0.9",
                                        "--adam-epsilon", "1e-6", "--lr-scheduler-type", "linear", "--steps", "10",
                                        *warmup, "--learning-rate", "1e-3"]))
    assert all(g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 for g in trainer.optimizer.param_groups)
    lrs = []
    for _ in range(10):
        lrs.append(trainer.scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
    assert lrs == pytest.approx([1e-3 * lr_multiplier(s, 10, 2, "linear") for s in range(10)])
    assert lrs[2] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1.25e-4)  # down by 1/8 a step after the warmup


def test_resume_applies_this_runs_optimizer_options(tiny_model_dir):
    """A checkpoint carries the moments and the schedule's position; the learning rate, its schedule's length
    and AdamW's hyperparameters are the resuming run's options, from its first step (torch's load_state_dict
    would bring back the checkpoint's)."""
    from rpo_engine.config import parse_args
    from rpo_engine.optim import lr_multiplier
    from rpo_engine.train import build_trainer

    first = build_trainer(parse_args(["--model", str(tiny_model_dir), "--steps", "4", "--lr-scheduler-type", "linear"]))
    for _ in range(4):  # the schedule run to its end: a rate of 0
        first.optimizer.step()
        first.scheduler.step()
    first.step_num = 4
    state = first.state_dict()
    resumed = build_trainer(parse_args(["--model", str(tiny_model_dir), "--steps", "6", "--lr-scheduler-type", "linear",
                                        "--learning-rate", "3e-4", "--weight-decay", "0.1", "--adam-beta2", "0.95",
                                        "--adam-epsilon", "1e-6"]))
    resumed.load_state_dict(state)
    decay, no_decay = resumed.optimizer.param_groups
    assert decay["lr"] == no_decay["lr"] == pytest.approx(3e-4 * lr_multiplier(4, 6, 1, "linear")) and decay["lr"] > 0
    assert resumed.scheduler.get_last_lr() == [decay["lr"], no_decay["lr"]]
    assert (decay["weight_decay"], no_decay["weight_decay"]) == (0.1, 0.0)
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-6 for g in (decay, no_decay))
    assert resumed.optimizer.state_dict()["state"].keys() == first.optimizer.state_dict()["state"].keys()  # the moments came
    resumed.optimizer.step()
    resumed.scheduler.step()
    assert decay["lr"] == pytest.approx(3e-4 * lr_multiplier(5, 6, 1, "linear"))


@pytest.mark.parametrize("flags", [["--top-entropy-quantile", "0.5"], ["--mask-truncated-completions"],
                                   ["--loss-type", "vespo", "--importance-sampling-correction"]])
@pytest.mark.parametrize("sharing", [True, False])
def test_a_group_of_empty_suffixes_updates_with_token_selection(tiny_model_dir, monkeypatch, flags, sharing):
    """A micro-batch whose samples generated nothing (a group of empty suffixes, in a batch of its own under a
    small budget) has a [S, 0] mask: a bool one, so the token selections of these options apply to it, and
    VESPO's folded sequence-level importance ratio reads no column of it (an IndexError before)."""
    import rpo_engine.model.shared_prefix as shared_prefix
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer
    from rpo_engine.trainer import Group

    monkeypatch.setattr(shared_prefix, "sharing_pays", lambda group, config: sharing)
    groups = [Group({"id": "0"}, [5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [[], [], []], [[], [], []], ["stop"] * 3,
                    advantages=[1.0, -1.0, 0.5]),
              Group({"id": "1"}, [5, 6, 7], [20, 21, 22, 23, 24], [[30, 31, 32], [33, 34]], [[-1.0] * 3, [-1.0] * 2],
                    ["stop", "length"], advantages=[1.0, -1.0])]
    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--micro-batch-tokens", "12", *flags]))
    stats = trainer.update(groups)
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0


@pytest.mark.parametrize("algo", ["grpo", "dapo"])
def test_step_statistics_do_not_depend_on_the_packing(tiny_model_dir, algo):
    """kl and the clip fractions are token means over the step: the same whatever the micro-batch budget and
    prefix sharing pack together (GRPO's loss averages rows, and weighing each micro-batch's token mean by its
    rows made them depend on the packing)."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    stats = []
    for flags in (["--micro-batch-tokens", "16384"], ["--micro-batch-tokens", "30"], ["--no-prefix-sharing"]):
        trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--algo", algo, "--beta", "0.04",
                                            "--num-iterations", "2", "--learning-rate", "1e-2", "--epsilon", "0.01",
                                            *flags]))
        stats.append(trainer.update(random_groups(5, min_len=1)))
    assert stats[0]["kl"] > 0 and stats[0]["clip_frac"] > 0
    for other in stats[1:]:
        for key in ("kl", "clip_frac", "clip_low_frac", "clip_high_frac", "loss"):
            assert other[key] == pytest.approx(stats[0][key], rel=1e-4, abs=1e-7), key


def test_logprob_mismatch_is_read_on_the_rollouts_weights_with_mini_batches(tiny_model_dir):
    """With several optimizer steps a batch, a later mini-batch is trained on weights already stepped; the
    rollout-vs-training mismatch compares the rollout with the weights it sampled from (fp32: ~0), and the
    entropy is the policy's before the update, as with one step."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--ppo-mini-batch-size", "1",
                                        "--learning-rate", "1e-1", "--max-completion-length", "16"]))
    groups, _ = trainer.rollout(trainer.train_rows[:3], 0)
    for k, g in enumerate(groups):
        g.advantages = [(-1.0) ** (i + k) for i in range(len(g.suffix_ids))]
    with torch.no_grad():
        _, mask, entropy = trainer.sequence_logprobs(trainer.model, trainer.training_batch(groups), False, True)
    stats = trainer.update(groups, positions=[0, 1, 2])
    assert stats["grad_norm"] > 0 and stats["logprob_mismatch"] < 1e-5
    assert stats["entropy"] == pytest.approx(float((entropy * mask).sum() / mask.sum()), rel=1e-5)


def test_a_skipped_mini_batch_step_leaves_the_loss_a_mean_over_the_steps_taken(tiny_model_dir):
    """--ppo-mini-batch-size 2 over 4 groups: mini-batches {0, 2} and {1, 3}. A NaN in the second skips its
    step (weights and moments untouched); the logged loss and grad_norm are the first step's, the one taken (the
    loss was divided by both steps, halving it)."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    flags = ["--model", str(tiny_model_dir), "--ppo-mini-batch-size", "2"]
    trainers = [build_trainer(parse_args(flags)) for _ in range(2)]
    groups = random_groups(0, num_groups=4)
    groups[3].advantages[0] = math.nan
    # a fresh trainer's update is its step 1, as metrics.jsonl and the progress bar number it (it said step 0)
    with pytest.warns(UserWarning, match="^step 1: non-finite loss or gradient; update skipped$"):
        skipped = trainers[0].update(groups)
    first = trainers[1].update(groups[0::2], positions=[0, 2])  # the first mini-batch alone: one step
    assert skipped["skipped_updates"] == 1 and first["skipped_updates"] == 0 and first["loss"] != 0
    for key in ("loss", "grad_norm"):
        assert skipped[key] == pytest.approx(first[key], rel=1e-6), key
    for a, b in zip(trainers[0].model.parameters(), trainers[1].model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    groups[0].advantages[0] = math.nan  # every step skipped: no loss or gradient was measured (None), not 0.0
    with pytest.warns(UserWarning, match="update skipped"):
        none_taken = trainers[0].update(groups)
    assert none_taken["skipped_updates"] == 2 and none_taken["loss"] is None and none_taken["grad_norm"] is None


def test_resuming_a_lora_run_with_other_adapter_options_names_the_options_before_the_model_loads(tiny_model_dir, tmp_path):
    """The checkpoint's adapter has its run's rank, alpha, targets and rsLoRA: other options were refused only by
    load_adapter, after the model loaded, naming no option; now before, with the options that resume it."""
    import rpo_engine
    from rpo_engine.config import parse_args
    from rpo_engine.errors import UserError
    from rpo_engine.model.lora import apply_lora, save_adapter
    from rpo_engine.train import check_resume

    out = tmp_path / "run"
    checkpoint = out / "checkpoints" / "step-1"
    save_adapter(apply_lora(rpo_engine.load_model(tiny_model_dir), r=4, alpha=8, target_modules="q_proj,v_proj"),
                 checkpoint / "adapter")
    same = ["--model", str(tiny_model_dir), "--output", str(out), "--resume", "--use-peft", "--lora-r", "4",
            "--lora-alpha", "8", "--lora-target-modules", "v_proj,q_proj"]
    check_resume(out, checkpoint, parse_args(same))
    for other, unless in ((["--lora-r", "8"], ""), (["--use-rslora"], " and without --use-rslora")):
        with pytest.raises(UserError) as e:
            check_resume(out, checkpoint, parse_args([*same, *other]))
        assert str(e.value) == (f"{checkpoint / 'adapter'}: the run's adapter has r=4, alpha=8, targets q_proj,v_proj, "
                                f"these options {'r=8' if unless == '' else 'r=4'}, alpha=8, targets q_proj,v_proj"
                                f"{'' if unless == '' else ', rsLoRA'}; a resumed run keeps its adapter: resume with "
                                f"--lora-r 4 --lora-alpha 8 --lora-target-modules q_proj,v_proj{unless}")


def test_max_grad_norm_zero_turns_clipping_off(tiny_model_dir):
    """--max-grad-norm 0 is Hugging Face's "no clipping": the step a bound that never binds gives (clipping to 0
    would zero the gradient, and AdamW's first step with it would not move the weights at all)."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainers = [build_trainer(parse_args(["--model", str(tiny_model_dir), "--max-grad-norm", bound]))
                for bound in ("0", "1e9")]
    before = [p.detach().clone() for p in trainers[0].model.parameters()]
    stats = [t.update(random_groups(0)) for t in trainers]
    assert stats[0]["grad_norm"] == pytest.approx(stats[1]["grad_norm"], rel=1e-6) and stats[0]["grad_norm"] > 0
    for a, b in zip(trainers[0].model.parameters(), trainers[1].model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not all(torch.equal(a, b) for a, b in zip(trainers[0].model.parameters(), before))


def test_partial_scores_under_length_shaping_are_named_once(tiny_model_dir):
    """Length shaping reads the first reward as right (1) or wrong: a graded one's partial scores all become 0,
    so the run says so, once, and names the way out; without shaping, or with 0/1 scores, it says nothing."""
    import warnings

    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    said = {}
    for reward, flags, warned in (("length_reward", [], 1), ("length_reward", ["--no-length-shaping"], 0),
                                  ("hash_reward", [], 0)):
        trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--reward", f"tests.reward_fns:{reward}",
                                            "--max-completion-length", "16", *flags]))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                groups, _ = trainer.rollout(trainer.train_rows[:2], 0)
                trainer.score_groups(groups)
        messages = [str(w.message) for w in caught if "length shaping" in str(w.message)]
        assert len(messages) == warned, (reward, flags, messages)
        said[reward, *flags] = messages
    message, = said["length_reward",]
    assert "the first reward (length_reward) gave a score other than 0 or 1" in message
    assert "pass --no-length-shaping" in message


def test_reward_workers_give_the_same_run(tmp_path, tiny_model_dir):
    """--reward-workers 2 scores the per-completion functions in worker processes (a TRL-style one stays here):
    the same rewards, so the same samples, updates, cache and eval accuracies, step for step."""
    common = ["--model", tiny_model_dir, "--steps", 2, "--eval-steps", 1, "--train-size", 3, "--log-completions",
              "--reward", "tests.reward_fns:hash_reward,exact,tests.reward_fns:trl_hash_reward", *SMALL]
    run_train(*common, "--output", tmp_path / "here")
    run_train(*common, "--output", tmp_path / "pooled", "--reward-workers", 2)
    assert (tmp_path / "here" / "completions.jsonl").read_text() == (tmp_path / "pooled" / "completions.jsonl").read_text()
    timing = ("rollout_time_s", "update_time_s", "step_time_s")
    for a, b in zip(read_metrics(tmp_path / "here"), read_metrics(tmp_path / "pooled"), strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {k: v for k, v in b.items() if k not in timing}


def test_several_rewards_add_their_weighted_scores(tiny_model_dir):
    """--reward a,b --reward-weights wa,wb: the reward is wa * a + wb * b; only a decides right answers."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer
    from rpo_engine.trainer import Group
    from tests.reward_fns import hash_reward, length_reward

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--no-length-shaping", "--reward",
                                        "tests.reward_fns:hash_reward, tests.reward_fns:length_reward",
                                        "--reward-weights", "2,0.25", "--prompts-per-step", "3",
                                        "--num-generations", "4", "--max-completion-length", "24",
                                        "--train-size", "3", "--eval-size", "2"]))
    suffixes = [[10 + i, 20 + i, 30 + 2 * i] for i in range(8)]
    group = Group({"id": "0", "answer": "3"}, [5, 6], [7, 8, 9], suffixes, [[0.0] * 3] * 8, ["stop"] * 8)
    trainer.score(group)
    texts = [trainer.tokenizer.decode(group.answer_ids(i), skip_special_tokens=True) for i in range(8)]
    assert group.rewards == [2 * hash_reward(t, "3") + 0.25 * length_reward(t, "3") for t in texts]
    assert group.correct == [hash_reward(t, "3") == 1.0 for t in texts]
    assert 0 < sum(group.correct) < 8
    for record in trainer.completion_records([group]):  # --log-completions: each function's score
        scores = record["scores"]
        assert list(scores) == ["hash_reward", "length_reward"]
        assert record["reward"] == 2 * scores["hash_reward"] + 0.25 * scores["length_reward"]
    m = trainer.step()  # each function's mean score is logged, TRL's way
    means = m["rewards/hash_reward/mean"], m["rewards/length_reward/mean"]
    assert m["reward_mean"] == pytest.approx(2 * means[0] + 0.25 * means[1]) and means[1] > 0


def test_a_reward_that_does_not_apply_is_left_out_of_its_mean(tiny_model_dir):
    """A TRL-style extra reward's None ("does not apply") adds 0 to the reward, and its rewards/<name>/mean is
    over the completions it applies to (TRL's nanmean), not diluted by zeros; completions.jsonl shows null."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--no-length-shaping", "--no-rpo",
                                        "--reward", "tests.reward_fns:hash_reward,tests.reward_fns:trl_partly_applies",
                                        "--log-completions", "--prompts-per-step", "2", "--num-generations", "4",
                                        "--max-completion-length", "6", "--train-size", "2", "--eval-size", "1"]))
    m = trainer.step()
    applied = [r["scores"]["trl_partly_applies"] for r in trainer.completions]
    assert None in applied and 0.5 in applied and set(applied) <= {None, 0.5}
    assert m["rewards/trl_partly_applies/mean"] == 0.5  # TRL's nanmean; the zeros it was diluted by gave less
    for r in trainer.completions:
        assert r["reward"] == r["scores"]["hash_reward"] + (r["scores"]["trl_partly_applies"] or 0.0)
    assert m["reward_mean"] == pytest.approx(sum(r["reward"] for r in trainer.completions) / 8)
    assert m["kl"] is None  # --beta 0: no reference, no KL measured (not a KL of 0)


def test_gdpo_normalizes_each_reward_term_before_the_sum(tiny_model_dir):
    """--multi-objective-aggregation normalize_then_sum: a step's advantages are each group's terms (the
    length-shaped accuracy, a second function, the format bonus, the overlong penalty) normalized within the
    group, summed with their weights, over the kept groups' std; the reward itself is still the weighted sum."""
    from rpo_engine.config import parse_args
    from rpo_engine.rewards import format_reward
    from rpo_engine.train import build_trainer
    from tests.test_algos import _gdpo_as_trl_writes_it

    trainer = build_trainer(parse_args([
        "--model", str(tiny_model_dir), "--reward", "tests.reward_fns:hash_reward,tests.reward_fns:length_reward",
        "--reward-weights", "1,0.25", "--format-reward-weight", "0.5", "--overlong-buffer", "8",
        "--multi-objective-aggregation", "normalize_then_sum", "--prompts-per-step", "3", "--num-generations", "4",
        "--max-completion-length", "24", "--train-size", "3", "--eval-size", "2", "--no-rpo"]))
    assert trainer.reward_terms() == [1.0, 0.25, 0.5, 1.0]
    seen, update = [], trainer.update

    def spy(groups, *args, **kwargs):
        seen.extend(groups)
        return update(groups, *args, **kwargs)

    trainer.update = spy
    trainer.step()
    assert len(seen) == 3
    for g in seen:
        texts = [trainer.tokenizer.decode(g.answer_ids(i), skip_special_tokens=True) for i in range(4)]
        assert g.terms[2] == [format_reward(t) for t in texts] and len(g.terms) == 4
        assert g.rewards == pytest.approx([sum(w * t[i] for w, t in zip(trainer.reward_terms(), g.terms))
                                           for i in range(4)])
    per_func = torch.tensor([[t[i] for t in g.terms] for g in seen for i in range(4)], dtype=torch.float64)
    expected = _gdpo_as_trl_writes_it(per_func, torch.tensor(trainer.reward_terms(), dtype=torch.float64), 4)
    torch.testing.assert_close(torch.tensor([g.advantages for g in seen], dtype=torch.float64), expected,
                               rtol=1e-5, atol=1e-5)
    assert any(any(g.advantages) for g in seen)


def test_gdpo_zero_std_groups_are_those_whose_every_term_is_equal(tiny_model_dir):
    """frac_reward_zero_std under normalize_then_sum counts the groups without signal: every total here is 1
    (hash_reward + 2 * half_wrong_hash), yet a group whose terms differ gets advantages and is trained on."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args([
        "--model", str(tiny_model_dir), "--reward", "tests.reward_fns:hash_reward,tests.reward_fns:half_wrong_hash",
        "--reward-weights", "1,2", "--multi-objective-aggregation", "normalize_then_sum", "--prompts-per-step", "4",
        "--num-generations", "4", "--max-completion-length", "24", "--train-size", "4", "--eval-size", "2", "--no-rpo",
        "--no-length-shaping"]))
    seen, update = [], trainer.update

    def spy(groups, *args, **kwargs):
        seen.extend(groups)
        return update(groups, *args, **kwargs)

    trainer.update = spy
    m = trainer.step()
    assert m["reward_mean"] == pytest.approx(1.0) and m["reward_std"] == pytest.approx(0.0)
    flat = [len(set(g.terms[0])) == 1 for g in seen]
    assert not all(flat)  # some group's terms differ (hash_reward is a coin flip per text)
    assert m["frac_reward_zero_std"] == pytest.approx(sum(flat) / 4)
    assert all(any(g.advantages) != is_flat for g, is_flat in zip(seen, flat))


def test_rpo_generates_fewer_tokens_than_full_path(tmp_path, tiny_model_dir):
    rpo, full = tmp_path / "rpo", tmp_path / "full"
    # three training prompts, three per step: every prompt recurs each step
    common = ["--model", tiny_model_dir, "--steps", 3, "--eval-steps", 0, "--rpo-max-cut", 8, "--train-size", 3,
              *SMALL]
    # a random model answers nothing right, so every path stays unverified: cut by at most a quarter of it
    run_train(*common, "--output", rpo, "--rpo-unverified-cut-fraction", 0.25)
    run_train(*common, "--output", full, "--no-rpo")
    r, f = read_metrics(rpo), read_metrics(full)
    assert r[0]["cold_starts"] == 3 and r[1]["cache_hit_rate"] == 1.0
    assert all(m["suffix_len_mean"] <= 48 // 4 + 16 for m in r)
    assert f[0]["cold_starts"] == 0 and f[0]["cache_hit_rate"] == 0.0
    # after the cold start, RPO generates only suffixes
    assert sum(m["rollout_generated_tokens"] for m in r[1:]) < sum(m["rollout_generated_tokens"] for m in f[1:])


def test_unverified_paths_are_kept_and_cut_anywhere(tmp_path, tiny_model_dir):
    out = tmp_path / "correct-only"
    run_train("--model", tiny_model_dir, "--steps", 2, "--eval-steps", 0, "--train-size", 3, "--output", out,
              "--rpo-cache-policy", "correct-only", "--rpo-max-cut", 2, "--rpo-extra-budget", 0, *SMALL)
    first, second = read_metrics(out)
    # a random model answers nothing right: its wrong answers replace the cold paths, no second cold start
    assert first["reward_mean"] == 0.0 and first["cold_starts"] == 3
    assert second["cold_starts"] == 0 and second["cache_hit_rate"] == 1.0
    assert first["cache_verified_rate"] == second["cache_verified_rate"] == 0.0
    # --rpo-max-cut bounds verified paths only: these are cut anywhere (a verified one: <= 2 new tokens)
    assert first["suffix_len_mean"] > 2 and second["suffix_len_mean"] > 2


def test_cache_verifies_right_answers_whatever_their_shaped_reward(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    from tests.reward_fns import hash_reward

    out = tmp_path / "overlong"
    # an overlong buffer as long as the budget: every answer's reward is pushed down by its length
    run_train("--model", tiny_model_dir, "--steps", 2, "--eval-steps", 0, "--train-size", 3, "--output", out,
              "--reward", "tests.reward_fns:hash_reward", "--overlong-buffer", 48, "--save-steps", 1, *SMALL)
    paths = saved_paths(torch.load(out / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=True)["cache"])
    first = saved_paths(torch.load(out / "checkpoints" / "step-1" / "trainer_state.pt", weights_only=True)["cache"])
    # step 2 cut the paths step 1 left: its metric counts those verified
    assert read_metrics(out)[1]["cache_verified_rate"] == sum(p[3] for p in first.values()) / 3
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    verified = 0
    for ids, reward, _, right_path, logprobs in paths.values():
        assert len(logprobs) == len(ids)
        right = hash_reward(tokenizer.decode(ids, skip_special_tokens=True), "") == 1.0
        assert right_path == (right and reward == reward)  # a cold start's path (reward NaN) is not verified
        # a kept answer's reward is its length-shaped accuracy (a right one's in [0.5, 1]), not the total the
        # overlong penalty pushed down
        assert not right_path or 0.5 <= reward <= 1.0
        verified += right_path
    assert verified > 0


def test_cache_keeps_the_most_accurate_answer_whatever_else_scores_it(tmp_path, tiny_model_dir):
    """The cache keeps a group's best answer by its (length-shaped) accuracy, as the paper's code does: a second
    reward that pays wrong answers well (or a format bonus, or the overlong penalty) never makes a wrong answer
    the one kept when the group had a right one."""
    out = tmp_path / "o"
    run_train("--model", tiny_model_dir, "--steps", 1, "--eval-steps", 0, "--train-size", 6, "--output", out,
              "--reward", "tests.reward_fns:hash_reward,tests.reward_fns:wrong_bonus", "--rpo-cache-policy",
              "epsilon-greedy", "--rpo-epsilon", 1, "--log-completions", "--save-steps", 1, *SMALL)
    paths = saved_paths(torch.load(out / "checkpoints" / "step-1" / "trainer_state.pt", weights_only=True)["cache"])
    right_in_group = {}
    for r in map(json.loads, (out / "completions.jsonl").read_text().splitlines()):
        right_in_group[r["prompt_id"]] = right_in_group.get(r["prompt_id"], False) or r["correct"]
    assert len(right_in_group) == 3 and any(right_in_group.values())
    assert {p: paths[p][3] for p in right_in_group} == right_in_group  # kept right whenever one was right


def test_cached_paths_carry_their_sampling_logprobs(tmp_path, tiny_model_dir):
    """Each cached path's log-probs (kept part's from earlier steps + the suffix's) are its tokens' log-probs
    under the policy: with the weights all but frozen, a teacher-forced pass over prompt + path gives them."""
    import rpo_engine
    from rpo_engine.data.arithmetic import make_split

    out = tmp_path / "least-likely"
    run_train("--model", tiny_model_dir, "--steps", 3, "--eval-steps", 0, "--train-size", 3, "--output", out,
              "--rpo-unverified-cut", "least-likely", "--seed", 0, "--save-steps", 3, "--temperature", 0.7,
              *SMALL, "--learning-rate", 1e-12)
    metrics = read_metrics(out)
    assert [m["cold_starts"] for m in metrics] == [3, 0, 0]  # paths were cut and regrown twice
    paths = saved_paths(torch.load(out / "checkpoints" / "step-3" / "trainer_state.pt", weights_only=True)["cache"])
    model, tokenizer = rpo_engine.load_model(out / "final"), rpo_engine.load_tokenizer(out / "final")
    rows = {r["id"]: r for r in make_split("train", 3, 0)}
    assert set(paths) == set(rows)
    for row_id, (ids, _, step, _, logprobs) in paths.items():
        assert step >= 1  # replaced by a whole answer (kept path + suffix), not the cold start's
        prompt = tokenizer.encode(rows[row_id]["prompt"], add_special_tokens=False)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ids]))[0, len(prompt) - 1:-1].float()
        expected = torch.log_softmax(logits / 0.7, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(logprobs), expected, atol=1e-4, rtol=0)


def test_full_unverified_cut_keeps_only_right_paths(tmp_path, tiny_model_dir):
    """--rpo-unverified-cut full: no cold starts; a prompt without a right path gets a full-path group (its
    first visit is the --no-rpo run's, sample for sample); only a path once answered right is cut and kept."""
    common = ["--model", tiny_model_dir, "--steps", 3, "--eval-steps", 0, "--train-size", 3, "--seed", 1,
              "--reward", "tests.reward_fns:hash_reward", "--log-completions", *SMALL]
    run_train(*common, "--output", tmp_path / "full-cut", "--rpo-unverified-cut", "full")
    run_train(*common, "--output", tmp_path / "no-rpo", "--no-rpo")
    metrics = read_metrics(tmp_path / "full-cut")
    assert [m["cold_starts"] for m in metrics] == [0, 0, 0]
    records = [json.loads(line) for line in (tmp_path / "full-cut" / "completions.jsonl").read_text().splitlines()]
    # a hit: a prompt whose group grew from its cached path; a wrong one regrown whole is none
    assert [m["cache_hit_rate"] for m in metrics] == \
           [len({r["prompt_id"] for r in records if r["step"] == step and r["kept_tokens"] > 0}) / 3 for step in (1, 2, 3)]
    assert metrics[0]["cache_hit_rate"] == 0.0 and metrics[1]["cache_hit_rate"] < 1.0
    first = [r for r in records if r["step"] == 1]
    plain = [json.loads(line) for line in (tmp_path / "no-rpo" / "completions.jsonl").read_text().splitlines()]
    assert [(r["completion"], r["reward"]) for r in first] == [(r["completion"], r["reward"]) for r in plain
                                                                 if r["step"] == 1]
    assert metrics[0]["rollout_generated_tokens"] == read_metrics(tmp_path / "no-rpo")[0]["rollout_generated_tokens"]
    for m in read_metrics(tmp_path / "no-rpo"):  # one decode loop a step: the prefill draws each first token
        assert m["rollout_decode_steps"] == max(r["completion_tokens"] for r in plain if r["step"] == m["step"]) - 1
    right_answers, kept = {}, []
    for step in (1, 2, 3):
        now = [r for r in records if r["step"] == step]
        for r in now:  # a kept prefix is the start of an earlier right answer (a wrong one would be regrown whole)
            kept.append(r["kept_tokens"] > 0)
            assert r["kept_tokens"] == 0 or any(a.startswith(r["kept"]) for a in right_answers[r["prompt_id"]])
        for r in now:
            if r["correct"]:
                right_answers.setdefault(r["prompt_id"], []).append(r["kept"] + r["completion"])
    assert sum(kept) >= 4 and not all(kept)  # both kinds of group occurred


def test_dapo_dynamic_sampling_is_bounded(tmp_path, tiny_model_dir):
    out = tmp_path / "dapo"
    run_train("--model", tiny_model_dir, "--steps", 1, "--output", out, "--algo", "dapo", "--eval-steps", 0,
              "--overlong-buffer", 0, "--beta", 0.05, *SMALL)
    m = read_metrics(out)[0]
    # a random model earns no reward, so no group is informative: 1 + 3 resampling rounds, then no update
    assert m["reward_mean"] == 0.0 and m["reward_std"] == 0.0
    assert m["num_prompts_sampled"] == 3 * (1 + 3) and m["num_groups_trained"] == 0 and m["skipped_updates"] == 1
    assert m["frac_reward_zero_std"] == 1.0
    # no token was trained, so none of what an update measures was (a KL reference too: not a KL of 0)
    for key in ("entropy", "logprob_mismatch", "loss", "grad_norm", "kl", "clip_frac", "clip_low_frac", "clip_high_frac"):
        assert m[key] is None, key
    assert type(m["num_micro_batches"]) is int and m["num_micro_batches"] == 0  # a count, as an update's
    # all wrong but told apart by a second reward (a length score): DAPO's rule (acc, the default) drops those
    # groups as it would all-wrong ones; --dynamic-sampling-metric reward keeps them
    dapo = ["--model", tiny_model_dir, "--steps", 1, "--algo", "dapo", "--eval-steps", 0, "--overlong-buffer", 0, *SMALL]
    common = [*dapo, "--reward", "exact,tests.reward_fns:length_reward"]
    run_train(*common, "--output", tmp_path / "acc")
    run_train(*common, "--output", tmp_path / "reward", "--dynamic-sampling-metric", "reward")
    by_acc, by_reward = read_metrics(tmp_path / "acc")[0], read_metrics(tmp_path / "reward")[0]
    assert by_acc["reward_std"] > 0 and by_acc["accuracy_mean"] == 0.0
    assert by_acc["num_groups_trained"] == 0 and by_acc["num_prompts_sampled"] == 3 * (1 + 3)
    assert by_reward["num_groups_trained"] == 3 and by_reward["num_prompts_sampled"] == 3
    # a graded accuracy (never full marks, so never "right"): its scores differ, so the groups carry signal
    run_train(*dapo, "--reward", "tests.reward_fns:length_reward", "--output", tmp_path / "graded")
    m = read_metrics(tmp_path / "graded")[0]
    assert m["accuracy_mean"] == 0.0 and m["num_groups_trained"] == 3 and m["num_prompts_sampled"] == 3
    # every answer right: no group is kept, and the rollout's statistics still cover what was sampled
    run_train(*dapo, "--reward", "tests.reward_fns:always_right", "--output", tmp_path / "right")
    m = read_metrics(tmp_path / "right")[0]
    assert m["num_groups_trained"] == 0 and m["accuracy_mean"] == 1.0 and m["suffix_len_mean"] > 0


def test_kl_to_reference(tmp_path, tiny_model_dir):
    out = tmp_path / "kl"
    run_train("--model", tiny_model_dir, "--steps", 2, "--output", out, "--beta", 0.05, "--eval-steps", 0,
              "--reward", "tests.reward_fns:hash_reward", *SMALL)
    first, second = read_metrics(out)
    assert first["reward_std"] > 0 and first["grad_norm"] > 0 and first["frac_reward_zero_std"] < 1.0
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)  # the policy is the reference before its first update
    assert second["kl"] > 0


def test_sync_ref_model_moves_the_reference(tiny_model_dir):
    """--sync-ref-model (TRL's names): every --ref-model-sync-steps steps the KL reference becomes
    alpha * policy + (1 - alpha) * reference; in between it stays."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--no-progress", "--no-rpo", "--eval-steps", "0",
                                        "--reward", "tests.reward_fns:hash_reward", *map(str, SMALL), "--beta", "0.05",
                                        "--sync-ref-model", "--ref-model-sync-steps", "2",
                                        "--ref-model-mixup-alpha", "0.6"]))
    start = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.step()
    assert all(torch.equal(r, s) for r, s in zip(trainer.reference.parameters(), start))  # step 1: not yet
    assert not all(torch.equal(p, s) for p, s in zip(trainer.model.parameters(), start))
    trainer.step()
    for r, p, s in zip(trainer.reference.parameters(), trainer.model.parameters(), start):
        torch.testing.assert_close(r, 0.6 * p + 0.4 * s, rtol=1e-6, atol=1e-7)


def test_bf16_weights_train_through_fp32_masters(tmp_path, tiny_model_dir):
    # The GPU default (bf16 weights read live by the rollout engine), run on the CPU: updates land, resume is exact.
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--model", tiny_model_dir, "--dtype", "bfloat16", "--eval-steps", 0, "--save-steps", 1,
              "--reward", "tests.reward_fns:hash_reward", *SMALL]
    run_train(*common, "--steps", 2, "--output", full)
    stopped_after(full, 1, part)
    run_train(*common, "--steps", 2, "--output", part, "--resume")
    a, b = read_metrics(full), read_metrics(part)
    assert a[0]["grad_norm"] > 0 and a[1]["grad_norm"] > 0
    for key in ("reward_mean", "rollout_generated_tokens", "grad_norm"):
        assert a[1][key] == pytest.approx(b[1][key], rel=1e-5), key
    from safetensors.torch import load_file
    start, end = load_file(tiny_model_dir / "model.safetensors"), load_file(full / "final" / "model.safetensors")
    resumed = load_file(part / "final" / "model.safetensors")
    assert all(torch.equal(end[name], resumed[name]) for name in end)  # the fp32 masters came back too
    assert end["model.layers.0.mlp.up_proj.weight"].dtype == torch.bfloat16
    assert not torch.equal(start["model.layers.0.mlp.up_proj.weight"].bfloat16(), end["model.layers.0.mlp.up_proj.weight"])
    state = torch.load(full / "checkpoints" / "step-2" / "trainer_state.pt", weights_only=True)
    assert len(state["optimizer"]["master_weights"]) == len(start)


def test_lora_run_resumes_exactly_and_saves_merged_and_peft(tmp_path, tiny_model_dir):
    # --use-peft: adapters on a frozen base; the KL reference is the base (adapters off), checkpoints hold the adapter
    import rpo_engine
    from rpo_engine.model.lora import load_adapter, merged_state_dict
    from safetensors.torch import load_file

    full, part = tmp_path / "full", tmp_path / "part"
    not_lora = ["--model", tiny_model_dir, "--beta", 0.05, "--save-steps", 2, "--eval-steps", 2,
                "--reward", "tests.reward_fns:hash_reward", "--train-size", 3, *SMALL]
    common = ["--use-peft", "--lora-r", 4, "--lora-alpha", 8, "--lora-target-modules", "q_proj,v_proj,down_proj",
              *not_lora]
    run_train(*common, "--steps", 4, "--output", full)
    assert sorted(p.name for p in (full / "checkpoints" / "step-2").iterdir()) == ["adapter", "config.json", "trainer_state.pt"]
    stopped_after(full, 2, part)
    shutil.copy(full / "config.json", part / "config.json")
    run_train(*common, "--steps", 4, "--output", part, "--resume")
    a, b = read_metrics(full), read_metrics(part)
    assert a[1]["kl"] == pytest.approx(0.0, abs=1e-7) and a[2]["kl"] > 0  # B = 0: the policy starts as the base
    for x, y in zip(a[3:], b[3:]):
        for key in ("reward_mean", "rollout_generated_tokens", "loss", "grad_norm", "kl"):
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-7), key
    assert all(m["grad_norm"] > 0 and m["logprob_mismatch"] < 1e-4 for m in a[1:] if "grad_norm" in m)
    ends = [load_file(run / "final-adapter" / "adapter_model.safetensors") for run in (full, part)]
    assert ends[0].keys() == ends[1].keys() and len(ends[0]) == 2 * 3 * 2
    assert all(torch.allclose(ends[0][k], ends[1][k], rtol=1e-5, atol=1e-7) for k in ends[0])
    # final/ is the base with the adapter merged into the three targets, every other tensor the base's own
    base, final = load_file(tiny_model_dir / "model.safetensors"), load_file(full / "final" / "model.safetensors")
    changed = sorted(k for k in base if not torch.equal(base[k], final[k]))
    assert changed == sorted(f"model.layers.{i}.{m}.weight" for i in range(2)
                             for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"))
    adapted = load_adapter(rpo_engine.load_model(tiny_model_dir), full / "final-adapter")
    assert all(torch.equal(v, final[k]) for k, v in merged_state_dict(adapted).items() if k in final)
    # resuming it as another kind of run, or with other adapter settings, is a one-line error
    for flags, message in ((not_lora, "holds a LoRA adapter; resume with --use-peft"),
                           ([*common, "--lora-r", 8], "adapter has r=4, alpha=8, targets q_proj,v_proj,down_proj, these "
                                                      "options r=8, alpha=8, targets q_proj,v_proj,down_proj; a resumed "
                                                      "run keeps its adapter: resume with --lora-r 4 --lora-alpha 8 "
                                                      "--lora-target-modules q_proj,v_proj,down_proj")):
        assert_user_error(run_train(*flags, "--steps", 5, "--output", full, "--resume", check=False), message)
    # eval: the base with the adapter applied (--adapter) answers as the merged final/ does
    evals = []
    for model_flags in (["--model", full / "final"], ["--model", tiny_model_dir, "--adapter", full / "final-adapter"]):
        out = tmp_path / f"eval{len(evals)}.jsonl"
        proc = subprocess.run([sys.executable, "-m", "rpo_engine.eval", *map(str, model_flags), "--eval-size", "4",
                               "--max-completion-length", "8", "--no-progress", "--output", str(out)],
                              capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-2000:]
        evals.append([json.loads(line)["completion"] for line in out.read_text().splitlines()])
    assert evals[0] == evals[1] and len(evals[0]) == 4
    from rpo_engine.errors import UserError
    from rpo_engine.eval import main as eval_main

    with pytest.raises(UserError, match=re.escape(f"--adapter {full / 'final-adapter'}: already merged into --model")):
        eval_main(["--model", str(full / "final"), "--adapter", str(full / "final-adapter")])  # not applied twice
    proc = subprocess.run([sys.executable, "-m", "rpo_engine.eval", "--model", str(tiny_model_dir), "--adapter",
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO)
    assert_user_error(proc, "not a LoRA adapter directory")
    fake = tmp_path / "fake" / "checkpoints" / "step-1"  # a full fine-tuning run's checkpoint
    (fake / "model").mkdir(parents=True)
    placeholder_state(fake)
    assert_user_error(run_train(*common, "--steps", 5, "--output", tmp_path / "fake", "--resume", check=False),
                      "step-1: holds full weights, not a LoRA adapter; resume without --use-peft")


def test_lora_merged_rollout_samples_what_the_live_adapters_do(tmp_path, tiny_model_dir):
    # the merged rollout copies differ from the live adapters by fp32 rounding only: the same completions
    common = ["--model", tiny_model_dir, "--use-peft", "--lora-r", 4, "--steps", 3, "--eval-steps", 3,
              "--reward", "tests.reward_fns:hash_reward", "--train-size", 3, "--log-completions", *SMALL]
    run_train(*common, "--output", tmp_path / "live")
    run_train(*common, "--output", tmp_path / "merged", "--lora-merged-rollout")
    assert (tmp_path / "live" / "completions.jsonl").read_text() == (tmp_path / "merged" / "completions.jsonl").read_text()
    live, merged = read_metrics(tmp_path / "live"), read_metrics(tmp_path / "merged")
    assert live[-1]["eval_accuracy"] == merged[-1]["eval_accuracy"]
    for a, b in zip(live[1:], merged[1:]):
        assert a["grad_norm"] > 0 and a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)
        assert b["logprob_mismatch"] < 1e-4  # the training forward (live adapters) scores what the rollout drew


@pytest.mark.parametrize("clip_min", [None, 0.7])
@pytest.mark.parametrize("mode", ["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"])
def test_importance_weights_by_hand(mode, clip_min):
    # two samples: rollout log-probs 0.5 above / 1.0 below the training forward's on their suffix tokens; a
    # kept-prefix token (loss on prefix) has no rollout log-prob: ratio 1; the cap is 2, the floor (if any) 0.7,
    # above the first sample's ratios e^-0.5 (per token) and e^-1 (its sequence's)
    from types import SimpleNamespace

    from rpo_engine.model.shared_prefix import PrefixGroup
    from rpo_engine.trainer import Trainer

    group = PrefixGroup([5, 6, 7], [[8, 9], [10, 11, 12]], 2, advantages=[1.0, -1.0],
                        rollout_logp=[[-1.5, -0.5], [-3.0, -2.0, -4.0]])
    old = torch.tensor([[-2.0, -2.0, -1.0, 0.0], [-2.0, -2.0, -1.0, -3.0]])  # [b, span]: prefix token, then suffix
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    algo = SimpleNamespace(importance_sampling_mode=mode, importance_sampling_clip_max=2.0,
                           importance_sampling_clip_min=clip_min)
    got = Trainer.importance_weights(SimpleNamespace(algo=algo, rollout_logp_layout=Trainer.rollout_logp_layout),
                                     [group], old, mask)
    e = torch.exp
    token = torch.tensor([[1.0, e(torch.tensor(-0.5)), e(torch.tensor(-0.5)), 1.0],
                          [1.0, e(torch.tensor(1.0)), e(torch.tensor(1.0)), e(torch.tensor(1.0))]])
    sequence = torch.tensor([[e(torch.tensor(-1.0))] * 4, [e(torch.tensor(3.0))] * 4])
    low = 0.0 if clip_min is None else clip_min
    want = {"token_truncate": token.clamp(min=low, max=2.0),
            "token_mask": token.masked_fill((token > 2.0) | (token < low), 0.0),
            "sequence_truncate": sequence.clamp(min=low, max=2.0),
            "sequence_mask": sequence.masked_fill((sequence > 2.0) | (sequence < low), 0.0)}
    torch.testing.assert_close(got, want[mode] * torch.ones_like(old), rtol=1e-6, atol=1e-7)


def test_rollout_mismatch_by_hand():
    """logprob_mismatch's parts: the sum of |rollout - training| log-prob over the generated tokens and their count
    (a mean over tokens, not over samples), a kept-prefix token (loss on prefix) and padding left out; deviations of
    both signs add, they do not cancel, and a sample with no generated token adds nothing."""
    from rpo_engine.model.shared_prefix import PrefixGroup
    from rpo_engine.trainer import Trainer

    group = PrefixGroup([5, 6, 7], [[8, 9], [10, 11, 12], []], 2, advantages=[1.0, -1.0, 0.0],
                        rollout_logp=[[-1.5, -0.5], [-3.0, -2.0, -4.0], []])
    logp = torch.tensor([[-9.0, -1.0, -1.0, 0.0], [-9.0, -2.5, -1.5, -6.0], [-9.0, 0.0, 0.0, 0.0]])  # [b, span]
    got = Trainer.rollout_mismatch(SimpleNamespace(rollout_logp_layout=Trainer.rollout_logp_layout), [group], logp)
    assert got == (pytest.approx(4.0), 5)  # |0.5| and |-0.5|; |0.5|, |0.5| and |-2.0|: 4 over 5 tokens (per-sample: 0.75)


def test_importance_sampling_correction_scales_the_step_by_the_weights(tiny_model_dir):
    # rollout log-probs shifted by +0.5 (a rollout that is off by a constant): token_truncate weights every
    # surrogate by exp(-0.5); at the first step (ratio 1, nothing clipped) the gradient scales by exactly that
    import dataclasses

    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    def first_step(*flags):
        trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--no-progress", "--no-rpo", "--eval-steps",
                                            "0", "--reward", "tests.reward_fns:hash_reward", *map(str, SMALL), *flags]))
        generate = trainer.engine.generate

        def shifted(*args, **kwargs):
            return [[dataclasses.replace(c, logprobs=[x + 0.5 for x in c.logprobs]) for c in group]
                    for group in generate(*args, **kwargs)]

        trainer.engine.generate = shifted
        return trainer.step()

    plain = first_step()
    weighted = first_step("--importance-sampling-correction", "--importance-sampling-mode", "token_truncate")
    assert plain["rollout_generated_tokens"] == weighted["rollout_generated_tokens"]  # the same samples
    assert weighted["grad_norm"] == pytest.approx(plain["grad_norm"] * math.exp(-0.5), rel=1e-4)
    for key in ("mean", "min", "max"):
        assert weighted[f"sampling/importance_sampling_ratio/{key}"] == pytest.approx(math.exp(-0.5), rel=1e-4)
    assert "sampling/importance_sampling_ratio/mean" not in plain


def test_out_of_gpu_memory_is_a_one_line_error_naming_the_settings(tmp_path, tiny_model_dir, monkeypatch):
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist
    from rpo_engine.errors import UserError
    from rpo_engine.train import train
    from rpo_engine.trainer import Trainer

    def out_of_memory(self):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.50 GiB. GPU 0 has a total capacity"
                                          " of 79.1 GiB\nof which ...")

    monkeypatch.setattr(Trainer, "step", out_of_memory)
    config = parse_args(["--model", str(tiny_model_dir), "--output", str(tmp_path / "o"), "--no-progress",
                         "--eval-steps", "0", "--micro-batch-tokens", "4096", "--gpu-memory-utilization", "0.4"])
    with pytest.raises(UserError) as e:
        train(config, Dist())
    message = str(e.value)
    assert "\n" not in message and message.startswith("out of GPU memory in step 1 (CUDA out of memory. Tried to allocate 9.50 GiB.")
    assert "K/V cache holds" in message and "--gpu-memory-utilization (now 0.4) or --micro-batch-tokens (now 4096)" in message
    assert message.endswith("add --gradient-checkpointing or --use-peft")
    # weights that fill the --gpu-memory-utilization share alone leave the K/V cache nothing: said at start
    import rpo_engine.rollout
    from rpo_engine.train import build_trainer

    from rpo_engine.rollout.model_runner import NO_BLOCK_ADVICE

    def no_budget(self, model, **kwargs):
        assert kwargs["gpu_memory_utilization"] == 0.4
        raise ValueError(f"KV cache budget too small: not one block of 4096 bytes; 40% of the GPU is already in use: "
                         f"{NO_BLOCK_ADVICE}")

    monkeypatch.setattr(rpo_engine.rollout.RolloutEngine, "__init__", no_budget)
    # the engine's advice (its kv_cache_bytes / num_blocks arguments, which no option sets) said as the option
    with pytest.raises(UserError, match=r"^rollout engine: KV cache budget too small: .* already in use: raise "
                                        r"--gpu-memory-utilization \(--gpu-memory-utilization 0.4\)$"):
        build_trainer(config)


def test_a_kv_cache_too_small_for_the_longest_prompt_is_said_at_start(tmp_path, tiny_model_dir, monkeypatch):
    """A K/V cache (--gpu-memory-utilization's share) that cannot hold the longest prompt with its whole budget: the
    engine refused that prompt when it came up, mid-run or mid-eval, with a ValueError traceback naming its own
    num_blocks/kv_cache_bytes arguments. Said at start by train and eval, in one line naming the options."""
    import rpo_engine.rollout
    from rpo_engine.config import parse_args
    from rpo_engine.errors import UserError
    from rpo_engine.eval import main as eval_main
    from rpo_engine.train import build_trainer

    built = rpo_engine.rollout.RolloutEngine.__init__

    def small_cache(self, model, **kwargs):  # as a GPU's small share would size it: 2 blocks of 16 tokens
        built(self, model, **{**kwargs, "num_blocks": 2, "block_size": 16})

    monkeypatch.setattr(rpo_engine.rollout.RolloutEngine, "__init__", small_cache)
    said = (r"^rollout engine: the longest prompt \(\d+ tokens\) with --max-completion-length 48 needs K/V for \d+ "
            r"tokens, more than the cache's 32: raise --gpu-memory-utilization \(now [\d.]+\), or lower "
            r"--max-completion-length or --max-prompt-length$")
    with pytest.raises(UserError, match=said):
        build_trainer(parse_args(["--model", str(tiny_model_dir), "--output", str(tmp_path / "o"),
                                  "--max-completion-length", "48", "--train-size", "4", "--eval-size", "4"]))
    with pytest.raises(UserError, match=said):
        eval_main(["--model", str(tiny_model_dir), "--eval-size", "4", "--max-completion-length", "48", "--no-progress"])
    # a budget the cache holds is no error
    monkeypatch.setattr(rpo_engine.rollout.RolloutEngine, "__init__",
                        lambda self, model, **kwargs: built(self, model, **{**kwargs, "num_blocks": 64, "block_size": 16}))
    assert build_trainer(parse_args(["--model", str(tiny_model_dir), "--output", str(tmp_path / "o"),
                                     "--max-completion-length", "48", "--train-size", "4", "--eval-size", "4"])).engine


def test_our_warnings_print_as_one_line_on_the_command_line(tmp_path, tiny_model_dir):
    """A warning of ours (here a config.json's attention_dropout, which the decoder ignores) prints as the
    command line's other warnings do, `warning: ...`, not as Python's "FILE:LINE: UserWarning: ..." with the
    source line after it; a caller of run_cli in its own process gets Python's format back."""
    import shutil
    import warnings

    from rpo_engine.errors import run_cli

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    proc = subprocess.run([sys.executable, "-m", "rpo_engine.eval", "--model", str(model), "--eval-size", "2",
                           "--max-completion-length", "4", "--no-progress"], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    said = [line for line in proc.stderr.splitlines() if "attention_dropout" in line]
    assert said and all(line.startswith("warning: attention_dropout 0.1 is ignored") for line in said), proc.stderr
    assert "UserWarning" not in proc.stderr
    before = warnings.formatwarning
    assert run_cli(lambda argv: 0) == 0 and warnings.formatwarning is before


def test_lora_options_and_their_mistakes(tmp_path, tiny_model_dir):
    from rpo_engine.config import parse_args
    from rpo_engine.model.lora import lora_settings
    from rpo_engine.train import build_trainer

    yaml = tmp_path / "peft.yaml"
    yaml.write_text(f"model: {tiny_model_dir}\nuse_peft: true\nlora_r: 4\nlora_alpha: 8\nuse_rslora: true\n"
                    "lora_target_modules: [v_proj, q_proj]\n")  # TRL's YAML list form
    config = parse_args(["--config", str(yaml)])
    assert (config.use_peft, config.lora_r, config.lora_target_modules) == (True, 4, "v_proj,q_proj")
    settings = lora_settings(build_trainer(config).model)
    assert settings.target_modules == ("q_proj", "v_proj") and settings.scaling == 8 / 4 ** 0.5  # rsLoRA
    for flags, message in ((["--lora-target-modules", "q_proj,lm_head"], "--lora-target-modules must be all-linear or"),
                           (["--lora-r", 0], "--lora-r must be >= 1, got 0"),
                           (["--use-peft", "--parallel", "fsdp"], "--use-peft trains with --parallel ddp"),
                           (["--gpu-memory-utilization", 1.5], "--gpu-memory-utilization must be in (0, 1], got 1.5")):
        assert_user_error(run_train(*flags, "--output", tmp_path / "o", check=False), message)


@pytest.mark.gpu
@pytest.mark.parametrize("peft", [[], ["--use-peft", "--lora-r", 4],
                                  ["--entropy-coef", 0.01, "--beta", 0.05, "--use-bias-correction-kl",
                                   "--off-policy-mask-threshold", 0.5, "--num-iterations", 2],
                                  ["--enable-sleep-mode"]],
                         ids=["full", "lora", "loss_options", "sleep_mode"])
def test_trains_on_the_test_device(tmp_path, tiny_model_dir, peft):
    """On CUDA the job's defaults differ from the CPU's: bf16 weights with fp32 masters, the Triton
    log-prob, loss and decode kernels, CUDA-graph rollouts of the live weights (with LoRA: of the live
    adapters, on a frozen base). They train, evaluate and save, and the rollout's log-probs stay close to
    the training forward's; also with the kernels' optional paths (the entropy's gradient, the
    ratio-weighted KL) and the off-policy mask; and with the K/V cache freed through each update (its decode
    graphs captured again wherever it is made)."""
    import rpo_engine

    out = tmp_path / "run"
    run_train("--model", tiny_model_dir, "--device", DEVICE.type, "--steps", 3, "--eval-steps", 3, "--output", out,
              "--reward", "tests.reward_fns:hash_reward", *SMALL, *peft)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [0, 1, 2, 3] and "eval_accuracy" in metrics[-1]
    for m in metrics[1:]:
        assert m["rollout_generated_tokens"] > 0 and torch.isfinite(torch.tensor(m["loss"]))
        # bf16 on CUDA: decode and training forward round differently; fp32 on the CPU: equal (None: every
        # group's rewards were equal, 1 in 512 a step, so no group ran)
        assert m["logprob_mismatch"] is None or m["logprob_mismatch"] < (0.05 if ON_CUDA else 1e-4)
    assert any(m["grad_norm"] > 0 for m in metrics[1:])
    final = rpo_engine.load_model(out / "final")
    assert final.dtype == (torch.bfloat16 if ON_CUDA else torch.float32)


@pytest.mark.gpu
def test_async_scheduling_trains_on_the_same_samples(tmp_path, tiny_model_dir):
    """--async-scheduling changes when the rollout's host work happens, not what it draws: the same
    rewards, tokens and losses step for step (on CUDA: the same up to bf16 batch-shape rounding)."""
    runs = []
    for name, flags in (("sync", []), ("async", ["--async-scheduling"])):
        run_train("--model", tiny_model_dir, "--device", DEVICE.type, "--steps", 3, "--eval-steps", 3,
                  "--output", tmp_path / name, "--reward", "tests.reward_fns:hash_reward", *SMALL, *flags)
        runs.append(read_metrics(tmp_path / name))
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    config = parse_args(["--model", str(tiny_model_dir), "--device", DEVICE.type, "--async-scheduling"])
    assert build_trainer(config).engine.async_scheduling  # the flag reaches the engine
    for x, y in zip(*runs):
        keys = ("eval_accuracy",) if x["step"] == 0 else (
            "reward_mean", "rollout_generated_tokens", "rollout_prefill_tokens", "loss", "eval_accuracy")
        for key in keys:
            if key in x:
                assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key)


def test_loss_options_reach_the_loss(tiny_model_dir, monkeypatch):
    """--importance-sampling-level (GSPO), --delta, --scale-rewards batch and --kl-loss-type: what the step hands the loss and
    the advantages (each is tested against TRL's formulas in test_kernels.py / test_algos.py)."""
    import rpo_engine.trainer as trainer_module
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    calls = {"loss": [], "advantages": []}
    real_loss, real_advantages = trainer_module.policy_loss, trainer_module.group_advantages

    def loss_spy(*args, **kwargs):
        calls["loss"].append(kwargs)
        return real_loss(*args, **kwargs)

    def advantages_spy(rewards, scale, batch_rewards):
        calls["advantages"].append((rewards, scale, batch_rewards))
        return real_advantages(rewards, scale, batch_rewards)

    monkeypatch.setattr(trainer_module, "policy_loss", loss_spy)
    monkeypatch.setattr(trainer_module, "group_advantages", advantages_spy)
    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--no-progress", "--no-rpo", "--eval-steps", "0",
                                        "--reward", "tests.reward_fns:hash_reward", *map(str, SMALL),
                                        "--importance-sampling-level", "sequence", "--delta", "4",
                                        "--scale-rewards", "batch", "--num-iterations", "2",
                                        "--beta", "0.05", "--kl-loss-type", "mse"]))  # verl's name of k2
    metrics = trainer.step()
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0 and metrics["kl"] > 0
    assert calls["loss"] and all(k["ratio_level"] == "sequence" and k["delta"] == 4.0 and k["kl_type"] == "k2"
                                 for k in calls["loss"])
    (rewards, scale, batch_rewards), = calls["advantages"]
    assert scale == "batch" and sorted(batch_rewards.tolist()) == sorted(rewards.flatten().tolist())


@pytest.mark.parametrize("flags,want", [
    (["--loss-type", "cispo", "--epsilon-high", "5"], ("cispo", 4.0, "token-mean", (1.0, 1.05), False)),
    (["--loss-type", "sapo", "--sapo-temperature-pos", "2", "--importance-sampling-level", "sequence"],
     ("sapo", 0.2, "seq-mean-token-mean", (2.0, 1.05), False)),
    (["--beta", "0.1", "--use-bias-correction-kl"], ("clip", 0.2, "seq-mean-token-mean", (1.0, 1.05), True)),
    (["--loss-type", "luspo", "--importance-sampling-level", "sequence"],
     ("clip", 0.2, "seq-mean-token-sum", (1.0, 1.05), False)),
    (["--loss-type", "vespo", "--vespo-k-pos", "1.5"], ("vespo", 0.2, "token-mean", (1.0, 1.05), False))])
def test_loss_types_and_kl_correction_reach_the_loss(tiny_model_dir, monkeypatch, flags, want):
    """--loss-type cispo --epsilon-high 5 (TRL's convention: the cap itself), sapo, luspo and vespo: the loss gets
    their surrogate, CISPO's cap as 1 + eps_high = 5, SAPO's temperatures, VESPO's parameters, and TRL's
    aggregation for each; --use-bias-correction-kl its ratio-weighted KL (each tested against TRL's formulas
    in test_kernels.py)."""
    import rpo_engine.trainer as trainer_module
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    calls, real_loss = [], trainer_module.policy_loss

    def loss_spy(*args, **kwargs):
        calls.append(kwargs)
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "policy_loss", loss_spy)
    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--no-progress", "--no-rpo", "--eval-steps", "0",
                                        "--reward", "tests.reward_fns:hash_reward", *map(str, SMALL),
                                        *flags, "--num-iterations", "2"]))
    metrics = trainer.step()
    assert math.isfinite(metrics["loss"]) and metrics["grad_norm"] > 0
    assert calls and all((k["surrogate"], k["eps_high"], k["loss_agg"], k["sapo_temperatures"], k["kl_ratio_weighted"])
                         == want for k in calls)
    vespo = (1.5 if "vespo" in flags else 2.0, 3.0, 3.0, 2.0)  # (k_pos, lambda_pos, k_neg, lambda_neg)
    assert all(k["vespo_params"] == vespo for k in calls)


def random_groups(seed, zero=(), num_groups=6, min_len=0):
    """Groups of 4 samples: random prefixes and ragged suffixes; the groups in `zero` have zero advantages."""
    from rpo_engine.trainer import Group

    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(num_groups):
        G, prefix = 4, torch.randint(3, 40, (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen)
        suffixes = [torch.randint(3, 40, (int(n),), generator=gen).tolist()
                    for n in torch.randint(min_len, 9, (G,), generator=gen)]
        suffixes[0] = suffixes[0] or [5]  # at least one generated token per group
        adv = [0.0] * G if k in zero else torch.randn(G, generator=gen).tolist()
        out.append(Group({"id": str(k)}, prefix[:3].tolist(), prefix[3:].tolist(), suffixes,
                         [[-1.0] * len(x) for x in suffixes], ["stop"] * G, advantages=adv))
    return out


@pytest.mark.parametrize("on_prefix", [False, True])
def test_the_loss_covers_the_suffixes_only_unless_rpo_loss_on_prefix(tiny_model_dir, on_prefix):
    """RPO's kept path is a cached answer the samples share, not theirs: the step's gradient is that of the loss
    over the generated suffix tokens (a reference whose loss starts at the end of prompt + kept path), and with
    --rpo-loss-on-prefix that of the loss over the kept path too (the kept tokens: advantage, ratio 1)."""
    from rpo_engine.config import parse_args
    from rpo_engine.kernels import policy_loss
    from rpo_engine.model.shared_prefix import PrefixGroup, group_logprobs
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--micro-batch-tokens", "60",
                                        *(["--rpo-loss-on-prefix"] if on_prefix else [])]))
    groups = random_groups(0, min_len=1)
    assert all(g.kept_ids for g in groups)
    batch = [PrefixGroup(g.prompt_ids + g.kept_ids, g.suffix_ids,
                         len(g.prompt_ids) + (0 if on_prefix else len(g.kept_ids)), advantages=g.advantages)
             for g in groups]
    logp, mask = group_logprobs(trainer.model, batch, trainer.config.temperature, shared=False)
    adv = torch.tensor([a for g in groups for a in g.advantages])
    algo = trainer.algo
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, eps_low=algo.epsilon, eps_high=algo.epsilon_high,
                          loss_agg=algo.loss_agg, backend="torch")
    grads = torch.autograd.grad(loss, [p for p in trainer.model.parameters() if p.requires_grad])
    want = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
    stats = trainer.update(groups)
    assert stats["num_micro_batches"] > 1
    assert stats["grad_norm"] == pytest.approx(want, rel=1e-5)


def test_dr_grpo_divides_each_sum_by_max_completion_length(tiny_model_dir):
    """--loss-type dr_grpo: each sample's token sum over --max-completion-length (not the batch's or a
    micro-batch's width); at the first step (ratio 1) the loss is -sum_i adv_i * n_i / (L * samples)."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--micro-batch-tokens", "60",
                                        "--loss-type", "dr_grpo", "--max-completion-length", "37"]))
    groups = random_groups(1, min_len=1)  # (a sample with no token to train counts in no normaliser)
    pairs = [(a, len(s)) for g in groups for a, s in zip(g.advantages, g.suffix_ids)]
    stats = trainer.update(groups)
    assert stats["num_micro_batches"] > 1
    assert stats["loss"] == pytest.approx(-sum(a * n for a, n in pairs) / (37 * len(pairs)), rel=1e-5)


def test_bf16_micro_batches_sum_their_gradients_in_fp32(tiny_model_dir):
    """A bf16 run's micro-batches: the step's gradient norm is that of the fp32 sum of every backward's bf16
    gradient (recorded as autograd hands it over), not of a sum rounded to bf16 at each micro-batch."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--dtype", "bfloat16",
                                        "--micro-batch-tokens", "60"]))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.bfloat16 for p in params)
    sums = [torch.zeros(p.shape) for p in params]

    def add_to(total):
        def hook(grad):
            total.add_(grad)  # returns nothing: the gradient goes on unchanged
        return hook

    for p, total in zip(params, sums):
        p.register_hook(add_to(total))
    stats = trainer.update(random_groups(0))
    assert stats["num_micro_batches"] > 3
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(total) for total in sums]))
    assert stats["grad_norm"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("quantile", [0.3, 0.0])
def test_top_entropy_quantile_keeps_the_high_entropy_tokens(tiny_model_dir, monkeypatch, quantile):
    """The surrogate keeps the tokens at or above the (1 - q) quantile of the step's entropies, whatever the
    micro-batches: the threshold and the count of kept tokens against one forward over the whole batch."""
    import rpo_engine.trainer as trainer_module
    from rpo_engine.config import parse_args
    from rpo_engine.model.shared_prefix import group_logprobs
    from rpo_engine.train import build_trainer

    kept, thresholds = [], []
    real_loss, real_threshold = trainer_module.policy_loss, trainer_module.Trainer.entropy_threshold

    def loss_spy(logp, old_logp, adv, mask, **kwargs):
        kept.append(float((kwargs["is_weights"] * mask).sum()))
        return real_loss(logp, old_logp, adv, mask, **kwargs)

    def threshold_spy(self, *args):
        thresholds.append(real_threshold(self, *args))
        return thresholds[-1]

    monkeypatch.setattr(trainer_module, "policy_loss", loss_spy)
    monkeypatch.setattr(trainer_module.Trainer, "entropy_threshold", threshold_spy)
    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--micro-batch-tokens", "60",
                                        "--top-entropy-quantile", str(quantile)]))
    groups = random_groups(0, min_len=1)
    with torch.no_grad():  # the whole batch at once, before the update
        _, mask, entropy = group_logprobs(trainer.model, trainer.training_batch(groups), shared=False,
                                          with_entropy=True)
    population = entropy[mask].double()
    want = float(torch.quantile(population, 1 - quantile))
    stats = trainer.update(groups)
    assert thresholds == [pytest.approx(want, rel=1e-6)] and stats["entropy_threshold"] == thresholds[0]
    assert len(kept) > 1  # several micro-batches
    assert sum(kept) == int((population >= thresholds[0]).sum())
    if quantile == 0:  # the one token of highest entropy
        assert sum(kept) == 1
    else:
        assert population.numel() * (quantile - 0.05) < sum(kept) < population.numel() * (quantile + 0.05)


@pytest.mark.parametrize("flags", [["--algo", "dapo"], ["--num-iterations", "2", "--beta", "0.1"]])
def test_mini_batches_step_as_a_plain_loop(tiny_model_dir, flags):
    """--ppo-mini-batch-size 2 over 6 groups: mini-batches {0, 3}, {1, 4}, {2, 5} (position mod 3), one
    optimizer step each, the ratio against the rollout's log-probs; equal to a plain loop over one padded
    batch per mini-batch (no micro-batches, no skipped groups, no shared prefixes)."""
    from rpo_engine.config import parse_args
    from rpo_engine.kernels import policy_loss
    from rpo_engine.model.shared_prefix import group_logprobs
    from rpo_engine.train import build_trainer

    common = ["--model", str(tiny_model_dir), "--micro-batch-tokens", "60", "--learning-rate", "1e-2",
              "--ppo-mini-batch-size", "2", *flags]
    engine, plain = (build_trainer(parse_args(common)) for _ in range(2))
    groups = random_groups(3, zero={4})
    stats = engine.update(groups)

    algo, model = plain.algo, plain.model
    batch = plain.training_batch(groups)
    minis = [[batch[i] for i in (j, j + 3)] for j in range(3)]
    with torch.no_grad():
        old = [group_logprobs(model, mini, shared=False)[0] for mini in minis]
        ref = [group_logprobs(plain.reference, mini, shared=False)[0] if algo.beta else None for mini in minis]
    ratios = []
    for _ in range(algo.num_iterations):
        for mini, old_logp, ref_logp in zip(minis, old, ref):
            plain.optimizer.zero_grad()
            logp, mask = group_logprobs(model, mini, shared=False)
            adv = torch.tensor([a for g in mini for a in g.advantages])
            loss, st = policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, eps_low=algo.epsilon,
                                   eps_high=algo.epsilon_high, kl_coef=algo.beta, loss_agg=algo.loss_agg,
                                   backend="torch")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), plain.config.max_grad_norm)
            plain.optimizer.step()
            ratios.append(st["ratio_mean"].item())
    assert ratios[0] == 1.0 and all(abs(r - 1) > 1e-4 for r in ratios[1:])  # the later steps ran off-policy
    assert stats["num_micro_batches"] >= 3
    for a, b in zip(engine.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("flags", [[], ["--num-iterations", "2", "--algo", "dapo"], ["--no-prefix-sharing"],
                                   ["--num-iterations", "2", "--importance-sampling-level", "sequence", "--delta", "1.5"],
                                   ["--top-entropy-quantile", "0.3"],
                                   ["--loss-type", "cispo", "--epsilon-high", "3", "--num-iterations", "2"],
                                   ["--loss-type", "sapo", "--num-iterations", "2"]])
def test_update_skipping_zero_advantage_groups_takes_the_same_step(tiny_model_dir, flags):
    """Without a KL term, a group whose advantages are all zero adds nothing to the gradient: leaving it out
    of the forward and backward (the default) must give the weights the full batch gives, also when every
    group is left out (AdamW still moves the weights by its moments)."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainers = [build_trainer(parse_args(["--model", str(tiny_model_dir), "--micro-batch-tokens", "60",
                                          "--learning-rate", "1e-2", *flags])) for _ in range(2)]
    for zero in ({1, 3, 4}, set(range(6))):  # some groups with zero advantages, then all of them
        batch, before = random_groups(len(zero), zero), [t.detach().clone() for t in trainers[0].model.parameters()]
        skipped, full = trainers[0].update(batch), trainers[1].update(batch, skip_zero_advantage=False)
        assert skipped["num_micro_batches"] < full["num_micro_batches"]
        for key in ("loss", "grad_norm", "clip_frac"):
            assert skipped[key] == pytest.approx(full[key], rel=1e-5, abs=1e-7), key
        for a, b in zip(trainers[0].model.parameters(), trainers[1].model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
        assert not all(torch.equal(a, b) for a, b in zip(trainers[0].model.parameters(), before))  # it stepped
    assert skipped["entropy"] is None and full["grad_norm"] == 0.0  # nothing to learn, and nothing was run


@pytest.mark.parametrize("flags", [[], ["--top-entropy-quantile", "0.3"],
                                   ["--ppo-mini-batch-size", "2", "--num-iterations", "2", "--algo", "dapo"]])
def test_entropy_bonus_steps_as_a_plain_loop(tiny_model_dir, flags):
    """--entropy-coef c: each optimizer step minimises the surrogate minus c times the mean entropy of its
    mini-batch's trained tokens (those --top-entropy-quantile keeps, from the entropies before the update);
    equal to a plain loop over one padded batch per mini-batch. Groups with zero advantages are not
    skipped: the bonus moves them too."""
    from rpo_engine.config import parse_args
    from rpo_engine.kernels import policy_loss
    from rpo_engine.model.shared_prefix import group_logprobs
    from rpo_engine.train import build_trainer

    coef = 0.05
    common = ["--model", str(tiny_model_dir), "--micro-batch-tokens", "60", "--learning-rate", "1e-2",
              "--entropy-coef", str(coef), *flags]
    engine, plain, without = (build_trainer(parse_args(args)) for args in (common, common,
                                                                           [*common, "--entropy-coef", "0"]))
    groups = random_groups(5, zero={1, 4})
    stats = engine.update(groups)
    without.update(groups)

    algo, model = plain.algo, plain.model
    batch = plain.training_batch(groups)
    M = 3 if algo.ppo_mini_batch_size else 1
    minis = [batch[j::M] for j in range(M)]
    with torch.no_grad():
        old = [group_logprobs(model, mini, shared=False, with_entropy=True) for mini in minis]
    keep = [mask for _, mask, _ in old]
    if algo.top_entropy_quantile < 1:  # the threshold over every token of a sample with a nonzero advantage
        moving = [torch.tensor([a != 0 for g in mini for a in g.advantages])[:, None] & mask
                  for mini, (_, mask, _) in zip(minis, old)]
        values = torch.cat([e[m] for (_, _, e), m in zip(old, moving)]).double()
        threshold = float(torch.quantile(values, 1 - algo.top_entropy_quantile))
        keep = [mask & (e >= threshold) for _, mask, e in old]
    for _ in range(algo.num_iterations):
        for mini, (old_logp, _, _), kept in zip(minis, old, keep):
            plain.optimizer.zero_grad()
            logp, mask, entropy = group_logprobs(model, mini, shared=False, with_entropy=True)
            adv = torch.tensor([a for g in mini for a in g.advantages])
            loss, _ = policy_loss(logp, old_logp, adv, mask, eps_low=algo.epsilon, eps_high=algo.epsilon_high,
                                  loss_agg=algo.loss_agg, is_weights=kept.float(), backend="torch")
            (loss - coef * (entropy * kept).sum() / kept.sum()).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), plain.config.max_grad_norm)
            plain.optimizer.step()
    assert stats["num_micro_batches"] >= 3 and stats["entropy_coef"] == coef
    assert stats["loss"] < stats["policy_loss"]  # the bonus was subtracted
    for a, b in zip(engine.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-5)
    # the bonus took a step of its own: the weights differ from the run without it
    assert max((a - b).abs().max() for a, b in zip(engine.model.parameters(), without.model.parameters())) > 1e-3


def test_off_policy_mask_steps_as_a_plain_loop(tiny_model_dir):
    """--off-policy-mask-threshold d (DeepSeek-V3.2, TRL's rule): in each pass, a sample with a negative
    advantage whose mean log p_rollout - log p_current over its tokens is above d leaves the surrogate
    (not the KL); equal to a plain loop. The groups' rollout log-probs (-1 a token) sit above the tiny
    model's, so the threshold is put among the samples' drifts: some are masked, some not."""
    from rpo_engine.config import parse_args
    from rpo_engine.kernels import policy_loss
    from rpo_engine.model.shared_prefix import group_logprobs
    from rpo_engine.train import build_trainer

    groups = random_groups(7, zero={2}, min_len=1)
    probe = build_trainer(parse_args(["--model", str(tiny_model_dir)]))
    batch = probe.training_batch(groups)
    with torch.no_grad():
        logp, mask = group_logprobs(probe.model, batch, shared=False)
    drift = ((-1.0 - logp) * mask).sum(-1) / mask.sum(-1)  # [b]
    adv = torch.tensor([a for g in batch for a in g.advantages])
    threshold = float(drift[adv < 0].median())
    common = ["--model", str(tiny_model_dir), "--micro-batch-tokens", "60", "--learning-rate", "1e-2",
              "--num-iterations", "2", "--beta", "0.1", "--off-policy-mask-threshold", str(threshold)]
    engine, plain = (build_trainer(parse_args(common)) for _ in range(2))
    stats = engine.update(groups)

    algo, model = plain.algo, plain.model
    with torch.no_grad():
        old_logp, _ = group_logprobs(model, batch, shared=False)
        ref_logp, _ = group_logprobs(plain.reference, batch, shared=False)
    masked = []
    for _ in range(2):
        plain.optimizer.zero_grad()
        logp, mask = group_logprobs(model, batch, shared=False)
        drift = ((-1.0 - logp.detach()) * mask).sum(-1) / mask.sum(-1)
        keep = ~((adv < 0) & (drift > threshold))  # [b]
        masked.append(int((~keep).sum()))
        loss, _ = policy_loss(logp, old_logp, adv, mask, ref_logp=ref_logp, eps_low=algo.epsilon,
                              eps_high=algo.epsilon_high, kl_coef=algo.beta, loss_agg=algo.loss_agg,
                              is_weights=keep[:, None].float().expand_as(logp), backend="torch")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), plain.config.max_grad_norm)
        plain.optimizer.step()
    assert 0 < masked[0] < int((adv < 0).sum())
    assert stats["off_policy_masked_frac"] == pytest.approx(sum(masked) / (2 * len(adv)))
    for a, b in zip(engine.model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("mode", ["token_truncate", "sequence_mask"])
def test_vespo_folds_the_importance_ratio_into_its_weight(tiny_model_dir, monkeypatch, mode):
    """--loss-type vespo --importance-sampling-correction (TRL's fold): the loss gets no IS weights, and each
    sample's log ratio p_train / p_rollout (truncated or masked at the cap, its log clamped at log 1e-8)
    summed over its tokens, or its sequence ratio's log once, as vespo_log_is."""
    import rpo_engine.trainer as trainer_module
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    calls, real_loss = [], trainer_module.policy_loss

    def loss_spy(logp, old_logp, adv, mask, **kwargs):
        calls.append((old_logp, mask, kwargs))
        return real_loss(logp, old_logp, adv, mask, **kwargs)

    monkeypatch.setattr(trainer_module, "policy_loss", loss_spy)
    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--loss-type", "vespo",
                                        "--importance-sampling-correction", "--importance-sampling-mode", mode]))
    trainer.update(random_groups(4, min_len=1))
    folded = []
    for old_logp, mask, kwargs in calls:  # each micro-batch: the training forward's log-probs before the step
        diff = (old_logp + 1.0) * mask  # the groups' rollout log-probs are -1 a token
        if mode == "token_truncate":
            want = (torch.clamp(torch.log(diff.exp().clamp(max=3.0)), math.log(1e-8), 20.0) * mask).sum(-1)
        else:
            ratio = diff.sum(-1).exp()
            want = torch.clamp(torch.log(ratio.masked_fill(ratio > 3.0, 0.0)), math.log(1e-8), 20.0)
        assert kwargs["is_weights"] is None
        torch.testing.assert_close(kwargs["vespo_log_is"], want, rtol=1e-5, atol=1e-5)
        folded.append(want)
    folded = torch.cat(folded)
    assert (folded < -1).any() and (folded > -10).any()  # the inputs reach the fold (and, by sequence, the mask)


def test_saturated_prompts_are_cut_deeper_on_their_next_visit(tiny_model_dir, monkeypatch):
    """--rpo-saturated-cut-growth: the trainer counts each prompt's consecutive all-right visits in the cache
    and hands the count to the cut; with every answer right, a prompt's count grows by one a visit."""
    import rpo_engine.trainer as trainer_module
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    seen, real_cut = [], trainer_module.cut_cached_path

    def cut_spy(path_len, verified, rng, max_answer_length, rpo, logprobs, saturated):
        seen.append((verified, saturated))
        return real_cut(path_len, verified, rng, max_answer_length, rpo, logprobs, saturated)

    monkeypatch.setattr(trainer_module, "cut_cached_path", cut_spy)
    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--reward", "tests.reward_fns:always_right",
                                        "--train-size", "3", "--rpo-saturated-cut-growth", "2", "--no-progress",
                                        *map(str, SMALL)]))
    for _ in range(3):
        trainer.step()
    # three prompts a step, each every step: cold paths (unknown), then right and saturated once, twice
    assert seen == [(False, 0)] * 3 + [(True, 1)] * 3 + [(True, 2)] * 3


def test_adaptive_entropy_control(tiny_model_dir, tmp_path):
    """--use-adaptive-entropy (TRL's rule): no bonus until an entropy was measured; then the coefficient
    moves by delta each optimizer step, up at or below the target and down above it, within its bounds,
    and the bonus applies while the last measured entropy is at or below the target; a skipped step moves
    nothing. Checkpointed."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    common = ["--model", str(tiny_model_dir), "--use-adaptive-entropy", "--entropy-coef", "0.3",
              "--entropy-coef-delta", "0.1", "--entropy-coef-max", "0.45"]
    trainer = build_trainer(parse_args([*common, "--entropy-target", "100"]))  # always below the target
    groups = random_groups(2, zero={0})
    first = trainer.update(groups)
    assert first["loss"] == pytest.approx(first["policy_loss"], abs=1e-7)  # nothing measured yet: no bonus
    assert trainer.last_entropy == pytest.approx(first["entropy"], rel=1e-5) and trainer.entropy_coef == 0.4
    second = trainer.update(groups)  # the bonus at 0.4, over the entropy before this step
    assert second["loss"] == pytest.approx(second["policy_loss"] - 0.4 * second["entropy"], rel=1e-5)
    assert trainer.entropy_coef == 0.45  # capped at --entropy-coef-max
    state = trainer.state_dict()
    resumed = build_trainer(parse_args([*common, "--entropy-target", "100"]))
    resumed.load_state_dict(state)
    assert (resumed.entropy_coef, resumed.last_entropy) == (trainer.entropy_coef, trainer.last_entropy)

    above = build_trainer(parse_args([*common, "--entropy-target", "0.001"]))  # the entropy stays above it
    for want in (0.2, 0.1, 0.0, 0.0):  # down to --entropy-coef-min, never applied
        stats = above.update(groups)
        assert above.entropy_coef == pytest.approx(want) and stats["loss"] == pytest.approx(stats["policy_loss"])

    skipping = build_trainer(parse_args([*common, "--entropy-target", "100"]))
    groups[1].advantages[0] = math.nan  # a non-finite loss: the step is skipped, and the coefficient stays
    with pytest.warns(UserWarning, match="update skipped"):
        assert skipping.update(groups)["skipped_updates"] == 1
    assert (skipping.entropy_coef, skipping.last_entropy) == (0.3, math.inf)


def test_adaptive_entropy_switched_on_at_a_resume_starts_from_this_runs_coefficient(tiny_model_dir):
    """A checkpoint of a run without --use-adaptive-entropy holds its fixed coefficient, no adaptive state: a
    run resumed from it with --use-adaptive-entropy --entropy-coef 0.05 adapts from 0.05 (this run's option
    governs from its first step), where it took the old run's 0 and adapted from there."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    fixed = build_trainer(parse_args(["--model", str(tiny_model_dir)]))
    fixed.update(random_groups(2, zero={0}))
    resumed = build_trainer(parse_args(["--model", str(tiny_model_dir), "--use-adaptive-entropy",
                                        "--entropy-coef", "0.05"]))
    resumed.load_state_dict(fixed.state_dict())
    assert (resumed.entropy_coef, resumed.last_entropy) == (0.05, math.inf)


@pytest.mark.parametrize("flags", [[], ["--algo", "dapo", "--num-iterations", "2"], ["--loss-type", "dr_grpo"],
                                   ["--no-prefix-sharing"]])
def test_masking_truncated_completions_trains_as_without_them(tiny_model_dir, flags):
    """--mask-truncated-completions: the samples that ran out of budget add nothing to the loss and do not
    count in its normalisers, so the step is the one the batch without them gives (the others keep the
    advantages their whole group gave them)."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer
    from rpo_engine.trainer import Group

    gen = torch.Generator().manual_seed(0)
    groups, kept = [], []
    for k in range(5):
        G, prefix = 4, torch.randint(3, 40, (int(torch.randint(4, 12, (1,), generator=gen)),), generator=gen)
        suffixes = [torch.randint(3, 40, (int(n),), generator=gen).tolist() for n in torch.randint(1, 9, (G,), generator=gen)]
        reasons = ["length" if r else "stop" for r in torch.rand(G, generator=gen).lt(0.4).tolist()]
        reasons[-1] = "length" if k == 2 else reasons[-1]  # group 2: every sample truncated
        reasons = ["length"] * G if k == 2 else reasons
        adv = torch.randn(G, generator=gen).tolist()
        make = lambda idx: Group({"id": str(k)}, prefix[:3].tolist(), prefix[3:].tolist(), [suffixes[i] for i in idx],
                                 [[-1.0] * len(suffixes[i]) for i in idx], [reasons[i] for i in idx],
                                 advantages=[adv[i] for i in idx])
        groups.append(make(range(G)))
        if any(r == "stop" for r in reasons):
            kept.append(make([i for i in range(G) if reasons[i] == "stop"]))
    assert sum(len(g.suffix_ids) for g in kept) < sum(len(g.suffix_ids) for g in groups) - 4  # some masked
    common = ["--model", str(tiny_model_dir), "--micro-batch-tokens", "60", "--learning-rate", "1e-2", *flags]
    masked = build_trainer(parse_args([*common, "--mask-truncated-completions"]))
    plain = build_trainer(parse_args(common))
    a, b = masked.update(groups), plain.update(kept)
    for key in ("loss", "grad_norm", "clip_frac"):
        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    # The two run different micro-batches, so their gradients round differently; AdamW divides each by its
    # running scale, which turns the rounding of a near-zero gradient into up to ~1e-5 after two passes.
    for x, y in zip(masked.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=3e-5)


# ---- bad input: one line, exit 2, no traceback, nothing overwritten -----------------------------

def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "expected an error message"
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]


def test_model_without_an_end_of_sequence_token(tmp_path, tiny_model_dir):
    import rpo_engine

    model_dir = tmp_path / "no_eos"
    shutil.copytree(tiny_model_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("eos_token_id")
    (model_dir / "config.json").write_text(json.dumps(config))
    tokenizer = rpo_engine.load_tokenizer(model_dir)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(str(model_dir))
    assert_user_error(run_train("--model", model_dir, "--output", tmp_path / "o", "--steps", 1, check=False),
                      "no_eos: no end-of-sequence token", "completions could never stop")


def test_end_of_sequence_token_outside_the_vocabulary(tmp_path, tiny_model_dir):
    """An eos_token_id (config.json's or generation_config.json's) the model cannot emit: one line naming it, from
    the trainer and from eval, not the rollout's ValueError traceback at the first step."""
    model_dir = tmp_path / "far_eos"
    shutil.copytree(tiny_model_dir, model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, vocab + 7]}))
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n')
    expected = (f"far_eos: end-of-sequence token id(s) [{vocab + 7}] (config.json's or generation_config.json's "
                f"eos_token_id, or the tokenizer's eos_token) are not in the model's vocabulary [0, {vocab})")
    assert_user_error(run_train("--model", model_dir, "--output", tmp_path / "o", "--steps", 1, check=False), expected)
    proc = subprocess.run([sys.executable, "-m", "rpo_engine.eval", "--model", str(model_dir), "--dataset", str(data)],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert_user_error(proc, expected)
    assert not (tmp_path / "o").exists()


def test_missing_model(tmp_path):
    assert_user_error(run_train("--model", tmp_path / "nope", "--output", tmp_path / "o", check=False),
                      "nope", "not found")


def test_bad_dataset_line(tmp_path, tiny_model_dir):
    data = tmp_path / "data.jsonl"
    data.write_text('{"prompt": "1+1", "answer": "2"}\n{"prompt": oops}\n')
    proc = run_train("--model", tiny_model_dir, "--dataset", data, "--output", tmp_path / "o", check=False)
    assert_user_error(proc, "data.jsonl:2", "not valid JSON")


def test_unknown_algo_and_option(tmp_path):
    proc = run_train("--algo", "ppo", "--output", tmp_path / "o", check=False)
    assert_user_error(proc, "--algo must be grpo or dapo")
    proc = run_train("--importance-sampling-mode", "token", "--output", tmp_path / "o", check=False)
    assert_user_error(proc, "--importance-sampling-mode must be one of ('token_truncate', 'token_mask', ")
    proc = run_train("--importance-sampling-correction", "--importance-sampling-clip-min", "1", "--output",
                     tmp_path / "o", check=False)
    assert_user_error(proc, "--importance-sampling-clip-min must be >= 0 and < 1 with --importance-sampling-mode "
                            "sequence_mask")
    assert len(proc.stderr.strip().splitlines()) == 1
    # argparse's mistakes are one line too, not its 100-line usage
    assert_user_error(run_train("--no-such-option", "1", check=False), "unknown option '--no-such-option'",
                      "--help lists every option")
    assert_user_error(run_train("--steps", "ten", check=False), "argument --steps: invalid int value: 'ten'")
    assert len(run_train("--steps", "ten", check=False).stderr.strip().splitlines()) == 1


def test_user_reward_mistakes(tmp_path, tiny_model_dir):
    """A run stopped by a reward mistake in its first step leaves nothing worth keeping: running it again, with
    or without --resume, starts over (keeping files not the run's)."""
    out = tmp_path / "run"
    for i, (fn, why) in enumerate((("text_reward", "returned 'wrong' (str), expected a finite number"),
                                   ("failing_reward", "raised IndexError: list index out of range ("))):
        proc = run_train("--model", tiny_model_dir, "--steps", 1, "--output", out, "--reward", f"tests.reward_fns:{fn}",
                         *SMALL, check=False)
        assert_user_error(proc, f"reward function 'tests.reward_fns:{fn}'", why)
        assert ("stopped before its first step ended" in proc.stdout) == (i == 1)  # the first run's directory
    (out / "notes.txt").write_text("mine")
    with open(out / "metrics.jsonl", "a") as f:  # as if stopped after the starting model's eval
        f.write('{"step": 0, "eval_accuracy": 0.5}\n')
    proc = run_train("--model", tiny_model_dir, "--steps", 1, "--output", out, "--resume", "--reward",
                     "tests.reward_fns:hash_reward", *SMALL)
    assert f"{out}: its run stopped before its first step ended" in proc.stdout
    assert [m["step"] for m in read_metrics(out)] == [0, 1] and read_metrics(out)[0]["eval_accuracy"] != 0.5
    assert (out / "notes.txt").read_text() == "mine"


def test_prompt_too_long(tmp_path, tiny_model_dir):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "1+" * 400, "answer": "2"}) + "\n")
    proc = run_train("--model", tiny_model_dir, "--dataset", data, "--output", tmp_path / "o", check=False)
    assert_user_error(proc, "tokens, more than the")
    # a completion budget the model's context cannot hold is named as such, not as a negative prompt limit
    context = json.loads((Path(tiny_model_dir) / "config.json").read_text())["max_position_embeddings"]
    proc = run_train("--model", tiny_model_dir, "--max-completion-length", context, "--output", tmp_path / "o",
                     check=False)
    assert_user_error(proc, f"--max-completion-length {context} leaves no room for a prompt",
                      f"context of {context} tokens")


def test_existing_run_is_not_overwritten(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    (out / "checkpoints" / "step-1").mkdir(parents=True)
    (out / "checkpoints" / "step-1" / "trainer_state.pt").write_bytes(b"")
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    proc = run_train("--model", tiny_model_dir, "--output", out, check=False)
    assert_user_error(proc, "already holds a run", "pass --resume or another --output")
    # a run that stopped before its first checkpoint: each message says the way out, not the other command
    shutil.rmtree(out / "checkpoints")
    proc = run_train("--model", tiny_model_dir, "--output", out, check=False)
    assert_user_error(proc, "holds a run that stopped before its first checkpoint", "remove it or pass another --output")
    proc = run_train("--model", tiny_model_dir, "--output", out, "--resume", check=False)
    assert_user_error(proc, "--resume found no complete checkpoint", "remove the directory to start again")
    assert (out / "metrics.jsonl").read_text() == '{"step": 1}\n'


def test_what_a_resume_cannot_do_is_refused_before_loading(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """Another --model (the policy would come from the checkpoint, the KL reference or LoRA base from it), fewer
    --steps than the checkpoint's, an unreadable log, a checkpoint without weights: one line each, before the
    model loads (build_trainer) and before anything is written."""
    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist
    from rpo_engine.errors import UserError

    class Built(Exception):
        pass

    def built(*args, **kwargs):
        raise Built

    monkeypatch.setattr(train, "build_trainer", built)
    out = tmp_path / "run"
    (out / "checkpoints" / "step-2" / "model").mkdir(parents=True)
    placeholder_state(out / "checkpoints" / "step-2")
    (out / "config.json").write_text(json.dumps({"model": str(tiny_model_dir)}))
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def resume(*flags):
        return train.train(parse_args(["--output", str(out), "--resume", *map(str, flags)]), Dist())

    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    with pytest.raises(UserError, match=re.escape(f"--model {other}: the run in {out} started from {tiny_model_dir}, "
                                                  f"and a resumed run keeps its model; resume with --model {tiny_model_dir}")):
        resume("--model", other)
    with pytest.raises(UserError, match=re.escape("no --model (the starter model): the run")):  # nothing built
        resume()
    with pytest.raises(UserError, match=re.escape(f"--steps 1 is below step 2, where the run in {out} was checkpointed")):
        resume("--model", tiny_model_dir, "--steps", 1)
    for broken in (b'{"step": 1}\n\xff\n', None):
        if broken is None:
            (out / "metrics.jsonl").unlink()
            (out / "metrics.jsonl").mkdir()
        else:
            (out / "metrics.jsonl").write_bytes(broken)
        with pytest.raises(UserError, match="metrics.jsonl: (not UTF-8 text|Is a directory)"):
            resume("--model", tiny_model_dir)
    (out / "metrics.jsonl").rmdir()
    (out / "metrics.jsonl").write_bytes(before[out / "metrics.jsonl"])
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    # the same model by another path; as many --steps as done: said, and final/ is written from the checkpoint
    with pytest.raises(Built):
        resume("--model", tiny_model_dir / ".." / tiny_model_dir.name, "--steps", 2)
    assert "is at --steps 2: nothing left to train" in capsys.readouterr().out
    (out / "config.json").write_text(json.dumps({"model": None}))  # started from the starter model
    with pytest.raises(UserError, match=re.escape("started from the starter model, and a resumed run keeps its "
                                                  "model; resume with no --model")):
        resume("--model", tiny_model_dir)
    # a checkpoint that lost its weights says so, not that it holds the other kind
    shutil.rmtree(out / "checkpoints" / "step-2" / "model")
    for peft in (False, True):
        with pytest.raises(UserError, match=r"step-2: has lost its weights \(no model/ directory, nor a LoRA run's"):
            train.check_checkpoint_kind(out / "checkpoints" / "step-2", parse_args(["--use-peft"] if peft else []))


def test_a_resume_knows_the_runs_model_from_any_working_directory(tmp_path, monkeypatch):
    """A relative --model is recorded as the directory it names: resumed from another working directory, that
    directory by another path is the run's model, and the same text naming another directory there is not."""
    from rpo_engine import train
    from rpo_engine.config import config_to_dict, parse_args
    from rpo_engine.distributed import Dist
    from rpo_engine.errors import UserError

    class Built(Exception):
        pass

    def built(*args, **kwargs):
        raise Built

    monkeypatch.setattr(train, "build_trainer", built)
    first, second, out = tmp_path.resolve() / "a", tmp_path / "b", tmp_path / "run"
    (first / "m").mkdir(parents=True)
    (second / "m").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "model").mkdir(parents=True)
    placeholder_state(out / "checkpoints" / "step-2")
    (out / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    monkeypatch.chdir(first)
    (out / "config.json").write_text(json.dumps(config_to_dict(parse_args(["--model", "m"]))))
    monkeypatch.chdir(second)

    def resume(model):
        return train.train(parse_args(["--output", str(out), "--resume", "--model", model]), Dist())

    with pytest.raises(Built):
        resume("../a/m")
    with pytest.raises(UserError, match=re.escape(f"the run in {out} started from {first / 'm'}, and a resumed run "
                                                  f"keeps its model; resume with --model {first / 'm'}")):
        resume("m")


def test_a_resume_without_log_completions_still_cuts_completions_back(tmp_path, monkeypatch):
    """completions.jsonl's records past the checkpoint describe steps the resumed run undoes: cut back as
    metrics.jsonl is, also when the resumed run no longer passes --log-completions."""
    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist

    class Stepped(Exception):
        pass

    class Resumed:  # what train() asks of a trainer until its first step
        device, step_num, eval_rows = torch.device("cpu"), 0, []
        reward_fn, extra_rewards = None, []  # no reward workers to close

        def load_state_dict(self, state):
            self.step_num = 2

        def step(self):
            raise Stepped

    monkeypatch.setattr(train, "build_trainer", lambda *args, **kwargs: Resumed())
    out = tmp_path / "run"
    (out / "checkpoints" / "step-2" / "model").mkdir(parents=True)
    placeholder_state(out / "checkpoints" / "step-2")
    (out / "config.json").write_text(json.dumps({"model": None}))
    for name in ("metrics.jsonl", "completions.jsonl"):  # killed after logging step 3, before its checkpoint
        (out / name).write_text("".join(json.dumps({"step": s}) + "\n" for s in (1, 2, 3)))
    config = parse_args(["--output", str(out), "--resume", "--steps", "3", "--no-progress", "--report-to", "none"])
    with pytest.raises(Stepped):
        train.train(config, Dist())
    assert [json.loads(line)["step"] for line in (out / "completions.jsonl").read_text().splitlines()] == [1, 2]


def test_a_run_keeps_only_what_its_plot_reads_of_each_step(tmp_path, tiny_model_dir, monkeypatch):
    """The run holds every step's record until its end for curves.png: all of its ~40 metrics grew a long run's
    process by ~1.3 KiB a step; it keeps the plotted ones, also of the steps a resumed run read back."""
    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist

    kept = []
    monkeypatch.setattr(train, "write_plot", lambda records, *args: kept.append(records))
    out = tmp_path / "run"
    for steps, resume in ((2, []), (3, ["--resume"])):
        config = parse_args(["--model", str(tiny_model_dir), "--output", str(out), "--steps", str(steps),
                             "--eval-steps", "2", "--save-steps", "2", "--no-progress", "--report-to", "none",
                             *resume, *map(str, SMALL)])
        assert train.train(config, Dist()) == 0
    assert [r["step"] for r in kept[1]] == [0, 1, 2, 3]
    assert {key for records in kept for r in records for key in r} == {"step", "reward_mean", "rollout_generated_tokens",
                                                                       "eval_accuracy"}


def test_a_run_killed_before_its_log_opened_starts_again(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """A run writes OUTPUT/config.json and opens metrics.jsonl once its model has loaded, with TensorBoard's
    import (seconds) in between: killed there, its directory is still a run's, which the same command (a preempted
    job's, with --resume or without) starts again, never a config.json alone that reads as a model directory's."""
    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist

    class Built(Exception):
        pass

    def preempted(*args, **kwargs):
        raise KeyboardInterrupt

    def built(*args, **kwargs):
        raise Built

    out = tmp_path / "run"
    monkeypatch.setattr(train, "Reporter", preempted)
    for resume in ([], ["--resume"]):
        config = parse_args(["--model", str(tiny_model_dir), "--output", str(out), "--steps", "1", "--eval-steps", "0",
                             "--no-progress", *resume])
        with pytest.raises(KeyboardInterrupt):
            train.train(config, Dist())
        with monkeypatch.context() as patch:
            patch.setattr(train, "build_trainer", built)
            with pytest.raises(Built):
                train.train(config, Dist())
        assert "its run stopped before its first step ended" in capsys.readouterr().out


@pytest.mark.parametrize("lines", [
    ['{"step": 0, "eval_a'],  # killed while writing the step-0 eval's record
    ['{"step": 0, "eval_accuracy": 0.0}', '{"step": 1, "reward_mean": 0.2, "rew'],  # while writing step 1's
])
def test_a_run_killed_while_writing_its_first_record_starts_again(tmp_path, monkeypatch, capsys, lines):
    """A last line cut short is a record the run never finished writing (truncate_log drops it): with no
    checkpoint behind it, the run stopped before its first step ended and the same command, with --resume or
    without, starts it again, where it was refused as a run to remove by hand."""
    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist

    class Built(Exception):
        pass

    def built(*args, **kwargs):
        raise Built

    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:-1]) + lines[-1])
    monkeypatch.setattr(train, "build_trainer", built)
    for resume in ([], ["--resume"]):
        config = parse_args(["--output", str(out), "--steps", "1", "--no-progress", *resume])
        with pytest.raises(Built):
            train.train(config, Dist())
        assert "its run stopped before its first step ended" in capsys.readouterr().out


def test_output_holding_a_model_is_refused(tmp_path, tiny_model_dir):
    """A run writes its options to OUTPUT/config.json: --output pointed at a model directory (--model's own
    too) would overwrite the model's config.json, so a directory holding a run's files but no run is refused."""
    model_dir = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    before = {p.name: p.read_bytes() for p in model_dir.iterdir()}
    for model in (tiny_model_dir, model_dir):
        proc = run_train("--model", model, "--output", model_dir, "--steps", 1, check=False)
        assert_user_error(proc, f"{model_dir}: holds config.json but no run of rpo_engine", "pass another --output")
    assert {p.name: p.read_bytes() for p in model_dir.iterdir()} == before


def test_resume_without_a_run_starts_one(tmp_path, tiny_model_dir):
    """--resume where no run is yet starts one (a preempted job's command reruns as it is), and says so; its
    evals show progress."""
    out = tmp_path / "new"
    proc = run_train("--model", tiny_model_dir, "--steps", 1, "--eval-steps", 1, "--output", out, "--resume", *SMALL,
                     progress=True)
    assert f"--resume: {out} holds no run yet; starting a new one" in proc.stdout
    assert [m["step"] for m in read_metrics(out)] == [0, 1]
    # the evals show progress: the step-0 one before the training bar, the later ones beside it
    assert "step 0: evaluating the starting model on 4 prompts" in proc.stdout
    bars = proc.stderr  # the evals show the engine's bar, named "eval" (the rollout's shows none)
    assert "eval:" in bars[:bars.index("RPO-GRPO:")], bars
    assert "eval:" in bars[bars.index("RPO-GRPO:"):], bars  # (in this log, without the terminal's "step 1: eval on")


@pytest.mark.parametrize("flag, value, message", [
    ("--weight-decay", "nan", "--weight-decay must be a finite number, got nan"),  # trained to NaN weights before
    ("--max-grad-norm", "nan", "--max-grad-norm must be a finite number, got nan"),
    ("--temperature", "inf", "--temperature must be a finite number, got inf"),
    ("--format-reward-weight", "nan", "--format-reward-weight must be a finite number"),
    ("--rpo-epsilon", "nan", "--rpo-epsilon must be a finite number"),  # each section's options
    ("--epsilon-high", "inf", "--epsilon-high must be a finite number"),
    ("--max-grad-norm", "-1", "--max-grad-norm must be >= 0 (0: no clipping), got -1.0"),
    ("--weight-decay", "-0.1", "--weight-decay must be >= 0, got -0.1"),
])
def test_non_finite_and_negative_options(flag, value, message):
    from rpo_engine.config import parse_args
    from rpo_engine.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        parse_args([flag, value])


def test_non_finite_option_on_the_command_line(tmp_path):
    out = tmp_path / "o"
    assert_user_error(run_train("--weight-decay", "nan", "--output", out, check=False),
                      "--weight-decay must be a finite number, got nan")
    assert not out.exists()


def test_broken_config_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("steps: [1, 2\n")
    assert_user_error(run_train("--config", cfg, check=False), "c.yaml", "not valid YAML")
    cfg.write_text("stepz: 3\n")
    assert_user_error(run_train("--config", cfg, check=False), "unknown option 'stepz'")
    cfg.write_text("steps: ten\n")
    assert_user_error(run_train("--config", cfg, check=False), "c.yaml", "steps must be an integer, got 'ten'")


def test_output_that_is_a_file(tmp_path, monkeypatch):
    taken = tmp_path / "taken"
    taken.write_text("keep me")
    for output in (taken, taken / "run"):
        assert_user_error(run_train("--output", output, check=False), "taken: is a file, not a directory")
    assert taken.read_text() == "keep me"
    # what mkdir would trip on after the model loaded: a link to nowhere, a name too long; and no --output at all
    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist
    from rpo_engine.errors import UserError

    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    for output in (tmp_path / "link", tmp_path / "link" / "run"):
        with pytest.raises(UserError, match=re.escape(f"{tmp_path / 'link'}: a broken symbolic link (to {tmp_path}/nowhere)")):
            train.check_output_dir(output)
    with pytest.raises(UserError, match="File name too long"):
        train.check_output_dir(tmp_path / ("x" * 300) / "run")
    monkeypatch.chdir(tmp_path)  # where "" would train, were it let through
    monkeypatch.setattr(train, "build_trainer", lambda *args, **kwargs: pytest.fail("--output '' was taken"))
    with pytest.raises(UserError, match="--output is empty"):
        train.train(parse_args(["--output", ""]), Dist())


def test_help_lists_options():
    out = subprocess.run([sys.executable, "-m", "rpo_engine.train", "--help"], capture_output=True, text=True).stdout
    for flag in ("--model", "--dataset", "--algo", "--rpo", "--no-rpo", "--steps", "--output", "--resume", "--seed",
                 "--config", "--num-generations", "--prompts-per-step", "--max-completion-length", "--learning-rate"):
        assert flag in out


def test_help_gives_each_option_one_default():
    from rpo_engine.config import build_parser

    for action in build_parser()._actions:
        if action.option_strings == ["-h", "--help"]:
            continue
        assert action.help.count("(default") == 1, (action.option_strings, action.help)
        assert "(default: None)" not in action.help, action.option_strings
    rpo = next(a for a in build_parser()._actions if "--rpo" in a.option_strings)
    assert rpo.help.endswith("(default: on)")


def test_eval_cli(tmp_path, tiny_model_dir):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Q: 1+1\\nA:", "answer": "2"}\n{"prompt": "Q: 2+2\\nA:", "answer": "4"}\n')
    preds = tmp_path / "preds.jsonl"
    cmd = [sys.executable, "-m", "rpo_engine.eval", "--model", str(tiny_model_dir), "--dataset", str(data),
           "--max-completion-length", "8", "--output", str(preds)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "accuracy 0.0000 on 2 rows" in proc.stdout  # a random model answers nothing right
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["answer"] for r in rows] == ["2", "4"] and all(r["correct"] is False and r["reward"] == 0.0 for r in rows)
    assert [r["id"] for r in rows] == ["0", "1"]  # the dataset's ids (here its row numbers), to join the file back
    assert all(isinstance(r["completion"], str) and r["prompt"].startswith("Q: ") for r in rows)
    # --stop: the random model writes "::::::::" after the prompt's "A:"; its first ":" makes "::" with the prompt's
    # last character, which does not count (the generated text alone, as vLLM), its second completes "::"
    assert [r["completion"] for r in rows] == ["::::::::"] * 2
    stopped = [*cmd[:-1], str(tmp_path / "stopped.jsonl"), "--stop", '["::", "never"]']
    assert subprocess.run(stopped, capture_output=True, text=True, cwd=REPO).returncode == 0
    assert [json.loads(line)["completion"] for line in (tmp_path / "stopped.jsonl").read_text().splitlines()] == ["::"] * 2
    before = preds.read_text()
    assert_user_error(subprocess.run(cmd, capture_output=True, text=True, cwd=REPO), f"{preds}: already exists")
    assert preds.read_text() == before  # nothing overwritten
    missing = [*cmd[:-1], str(tmp_path / "no" / "p.jsonl")]
    assert_user_error(subprocess.run(missing, capture_output=True, text=True, cwd=REPO), "no such directory")
    # --max-prompt-length, as in training (the default, 512, is training's; the tiny model's context is 512)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "1+" * 200 + "1=", "answer": "201"}) + "\n")  # 402 tokens
    cmd = [sys.executable, "-m", "rpo_engine.eval", "--model", str(tiny_model_dir), "--dataset", str(long),
           "--max-completion-length", "8", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "accuracy 0.0000 on 1 rows" in proc.stdout, proc.stderr
    proc = subprocess.run([*cmd, "--max-prompt-length", "300"], capture_output=True, text=True, cwd=REPO)
    assert_user_error(proc, f"error: {long}: prompt of row '0' has 402 tokens, more than the 300 allowed")
    assert len(proc.stderr.splitlines()) == 1, proc.stderr  # one line: the file, the row, the limit
    # every --reward entry is checked, though eval grades with the first alone
    for rewards, message in (("exact,bogus", "got 'bogus'"), ("exact,nomod:fn", "cannot import 'nomod'")):
        assert_user_error(subprocess.run([*cmd, "--reward", rewards], capture_output=True, text=True, cwd=REPO),
                          message)


def test_eval_cli_names_the_model_in_a_run_directory(tmp_path):
    """--model given a run's directory or a checkpoint (their config.json holds the run's options): the error
    names the directory that holds the model, not a field the options lack."""
    from rpo_engine.errors import UserError
    from rpo_engine.eval import main

    run = tmp_path / "run"
    for directory in (run / "final", run / "checkpoints" / "step-2" / "model"):
        directory.mkdir(parents=True)
    for where in (run, run / "checkpoints" / "step-2"):
        (where / "config.json").write_text(json.dumps({"model": None, "steps": 2}))
    for given, want in ((run, run / "final"), (run / "checkpoints" / "step-2", run / "checkpoints" / "step-2" / "model")):
        with pytest.raises(UserError, match=f"pass its .*--model {re.escape(str(want))}$"):
            main(["--model", str(given), "--no-progress"])


def test_eval_cli_model_that_is_or_holds_a_lora_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """--model given a LoRA adapter's directory (adapter_config.json, as a run's final-adapter/ or PEFT's save):
    alone, the error said config.json was missing; beside a model's config.json (which transformers' from_pretrained
    loads with the adapter applied) the adapter was silently left out, evaluating the base. Both are one line that
    names the command, before the model loads; --adapter DIR applies the adapter there as anywhere."""
    import rpo_engine
    from rpo_engine.errors import UserError
    from rpo_engine.eval import main
    from rpo_engine.model.lora import apply_lora, save_adapter

    save_adapter(apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0), tmp_path / "adapter",
                 base_model_name_or_path="org/base")
    shutil.copytree(tiny_model_dir, tmp_path / "both")
    shutil.copytree(tmp_path / "adapter", tmp_path / "both", dirs_exist_ok=True)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Q: 1+1\\nA:", "answer": "2"}\n')
    monkeypatch.setattr(rpo_engine, "load_model", lambda *args, **kwargs: pytest.fail("loaded the model first"))
    with pytest.raises(UserError, match=re.escape(f"--model {tmp_path / 'adapter'}: a LoRA adapter, not a model; pass "
                                                  f"its base model and the adapter: --model org/base --adapter "
                                                  f"{tmp_path / 'adapter'}")):
        main(["--model", str(tmp_path / "adapter"), "--dataset", str(data), "--no-progress"])
    with pytest.raises(UserError, match=re.escape(f"--model {tmp_path / 'both'}: holds a LoRA adapter "
                                                  f"(adapter_config.json) beside the model") + ".*--adapter " +
                                        re.escape(str(tmp_path / "both"))):
        main(["--model", str(tmp_path / "both"), "--dataset", str(data), "--no-progress"])


def test_training_model_that_is_or_holds_a_lora_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """Training's --model given a LoRA adapter's directory said config.json was missing; given a model directory
    holding an adapter beside it (transformers loads it applied), training started from the model without it,
    silently. Both are one line before the model loads."""
    import rpo_engine
    from rpo_engine.config import parse_args
    from rpo_engine.errors import UserError
    from rpo_engine.model.lora import apply_lora, save_adapter
    from rpo_engine.train import build_trainer

    save_adapter(apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0), tmp_path / "adapter")
    shutil.copytree(tiny_model_dir, tmp_path / "both")
    shutil.copytree(tmp_path / "adapter", tmp_path / "both", dirs_exist_ok=True)
    monkeypatch.setattr(rpo_engine, "load_model", lambda *args, **kwargs: pytest.fail("loaded the model first"))
    for name, message in (("adapter", "a LoRA adapter, not a model; train from its base model"),
                          ("both", "holds a LoRA adapter (adapter_config.json) beside the model")):
        with pytest.raises(UserError, match=re.escape(f"--model {tmp_path / name}: {message}")):
            build_trainer(parse_args(["--model", str(tmp_path / name), "--no-progress"]))


def test_eval_cli_adapter_is_checked_first_and_may_be_a_hub_id(tmp_path, tiny_model_dir, monkeypatch):
    """--adapter with a typo failed only after the model had loaded (minutes at 7B); and a Hub id, as --push-to-hub
    uploads a LoRA run's adapter (PEFT's from_pretrained takes one), was no directory. Now the adapter is read
    before the model, and an id is resolved as --model's are: the local cache here (HF_HUB_OFFLINE)."""
    import huggingface_hub

    import rpo_engine
    import rpo_engine.model.lora
    from rpo_engine.errors import UserError
    from rpo_engine.eval import main
    from rpo_engine.model.lora import apply_lora, save_adapter
    from tests.helpers import hub_snapshot

    save_adapter(apply_lora(rpo_engine.load_model(tiny_model_dir), r=2, alpha=4.0), tmp_path / "adapter")
    snapshot = hub_snapshot(tmp_path / "hub", "me/run-a", tmp_path / "adapter")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Q: 1+1\\nA:", "answer": "2"}\n')
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--no-progress", "--adapter"]
    load_model = rpo_engine.load_model
    monkeypatch.setattr(rpo_engine, "load_model", lambda *a, **kw: pytest.fail("loaded the model first"))
    with pytest.raises(UserError, match="nope: no adapter_config.json"):
        main([*args, str(tmp_path / "nope")])
    monkeypatch.setattr(rpo_engine, "load_model", load_model)
    applied = []

    def stop_after(model, directory):
        applied.append(directory)
        raise KeyboardInterrupt  # the rest is test_eval_cli's

    monkeypatch.setattr(rpo_engine.model.lora, "load_adapter", stop_after)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "me/run-a"])
    assert applied == [snapshot]


def test_eval_sampling_options_with_greedy_decoding_are_an_error():
    # greedy decoding (--temperature 0, the default) takes the most likely token, which top-k, top-p and min-p all
    # keep, and draws nothing: these options were read and silently changed nothing
    from rpo_engine.errors import UserError
    from rpo_engine.eval import main

    with pytest.raises(UserError, match=r"^--top-k does nothing with --temperature 0 \(greedy; give --temperature > 0"):
        main(["--top-k", "3"])
    with pytest.raises(UserError, match=r"^--top-p, --min-p and --seed do nothing with --temperature 0 "):
        main(["--dataset", "d.jsonl", "--top-p", "0.5", "--min-p", "0.1", "--seed", "7", "--temperature", "0"])
    # without --dataset, --seed picks the built-in task's eval split (test_the_eval_command_on_a_runs_model_...[seed])


def test_tokenizer_leaves_the_prompt_length_to_our_check(tmp_path, tiny_model_dir):
    """A tokenizer_config.json's model_max_length below a prompt: transformers' warning would print a line
    before our one-line error (and is wrong about what matters: the model's context)."""
    import logging

    from rpo_engine import load_tokenizer

    shutil.copytree(tiny_model_dir, tmp_path / "m")
    config = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(dict(config, model_max_length=8)))
    tokenizer = load_tokenizer(tmp_path / "m")
    records, handler = [], logging.Handler()
    handler.emit = records.append  # transformers' loggers do not propagate to pytest's
    logging.getLogger("transformers").addHandler(handler)
    try:
        assert len(tokenizer.encode("1+" * 20)) > 8
    finally:
        logging.getLogger("transformers").removeHandler(handler)
    assert not [r for r in records if "Token indices sequence length" in r.getMessage()]


def test_eval_cli_samples(tmp_path, tiny_model_dir):
    """--num-samples K: K sampled completions a row, avg@K and pass@K from their verdicts, the same again
    from the same seed."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\nA:", "answer": str(i + 1)}) + "\n" for i in range(6)))
    cmd = [sys.executable, "-m", "rpo_engine.eval", "--model", str(tiny_model_dir), "--dataset", str(data),
           "--max-completion-length", "8", "--num-samples", "4", "--temperature", "1", "--no-progress",
           "--reward", "tests.reward_fns:hash_reward"]
    outs = []
    for name, more in (("a.jsonl", []), ("b.jsonl", []), ("pooled.jsonl", ["--reward-workers", "2"])):
        proc = subprocess.run([*cmd, *more, "--output", str(tmp_path / name)], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        outs.append([json.loads(line) for line in (tmp_path / name).read_text().splitlines()])
    assert outs[0] == outs[1] == outs[2]  # seeded; scored in worker processes the same
    rows = outs[0]
    # the same reward as an async TRL-style judge: the same verdicts, with what it logged (a column of each row's
    # K values; its metric, the trainer_state.global_step of a model no run is training)
    judged = subprocess.run([*cmd[:-1], "tests.reward_fns:async_judge", "--output", str(tmp_path / "judge.jsonl")],
                            capture_output=True, text=True, cwd=REPO)
    assert judged.returncode == 0, judged.stderr
    judge = [json.loads(line) for line in (tmp_path / "judge.jsonl").read_text().splitlines()]
    assert [{k: v for k, v in r.items() if k != "judge_verdict"} for r in judge] == rows
    assert [r["judge_verdict"] for r in judge] == [["right" if c else "wrong" for c in r["correct"]] for r in rows]
    assert all(len(r["completions"]) == len(r["rewards"]) == len(r["correct"]) == 4 for r in rows)
    assert len({c for r in rows for c in r["completions"]}) > 6  # sampled, not the same completion four times
    avg = sum(sum(r["correct"]) for r in rows) / 24
    solved = sum(any(r["correct"]) for r in rows) / 6
    assert 0 < avg < 1 and f"avg@4 {avg:.4f}, pass@4 {solved:.4f} on 6 rows" in proc.stdout
    assert f"\neval_judge/global_step 0, eval_judge/mean_score {avg:.4g}\n" in judged.stdout  # one call, all rows
    from rpo_engine.eval import pass_at_k

    pass_2 = sum(pass_at_k(4, sum(r["correct"]), 2) for r in rows) / 6
    assert f"\npass@2 {pass_2:.4f} (unbiased, from the 4 answers a row)\n" in proc.stdout
    assert_user_error(subprocess.run([*cmd, "--temperature", "0"], capture_output=True, text=True, cwd=REPO),
                      "--num-samples 4 needs --temperature > 0")


def test_evaluate_returns_the_numbers_the_eval_cli_prints_and_writes(tmp_path, tiny_model_dir, capsys):
    """rpo_engine.eval.evaluate: the eval from a notebook or a script, as train(TrainConfig(...)) is the training,
    returning the numbers, which are the command line's on the same options: its printed accuracy, avg@K, pass@k
    and logged reward metrics, and the mean of the rewards its --output writes."""
    from rpo_engine.eval import evaluate, main, pass_at_k

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\nA:", "answer": str(i + 1)}) + "\n" for i in range(6)))
    common = {"model": Path(tiny_model_dir), "dataset": str(data), "max_completion_length": 6, "no_progress": True}
    flags = ["--model", str(tiny_model_dir), "--dataset", str(data), "--max-completion-length", "6", "--no-progress"]
    runs = {"greedy": (dict(common, reward="tests.reward_fns:hash_reward"),
                       [*flags, "--reward", "tests.reward_fns:hash_reward"]),
            "sampled": (dict(common, reward="tests.reward_fns:async_judge", num_samples=4, temperature=1),
                        [*flags, "--reward", "tests.reward_fns:async_judge", "--num-samples", "4", "--temperature", "1"])}
    for name, (options, argv) in runs.items():
        assert main([*argv, "--output", str(tmp_path / f"{name}.jsonl")]) == 0
        printed = capsys.readouterr().out
        metrics = evaluate(**options)
        assert capsys.readouterr().out == ""  # returned, not printed
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        if name == "greedy":
            rewards = [r["reward"] for r in rows]
            assert metrics == {"accuracy": sum(r["correct"] for r in rows) / 6, "reward_mean": sum(rewards) / 6,
                               "rows": 6}
            assert printed == f"accuracy {metrics['accuracy']:.4f} on 6 rows ({data})\n"
        else:
            rights = [sum(r["correct"]) for r in rows]
            assert metrics == {"accuracy": sum(rights) / 24,
                               "pass@2": sum(pass_at_k(4, c, 2) for c in rights) / 6,
                               "pass@4": sum(c > 0 for c in rights) / 6,
                               "reward_mean": sum(sum(r["rewards"]) for r in rows) / 24, "rows": 6,
                               "eval_judge/global_step": 0, "eval_judge/mean_score": sum(rights) / 24}
            assert 0 < metrics["accuracy"] < metrics["pass@2"] < metrics["pass@4"]
            assert printed == (f"avg@4 {metrics['accuracy']:.4f}, pass@4 {metrics['pass@4']:.4f} on 6 rows, "
                               f"temperature 1 ({data})\n"
                               f"pass@2 {metrics['pass@2']:.4f} (unbiased, from the 4 answers a row)\n"
                               f"eval_judge/global_step 0, eval_judge/mean_score {metrics['accuracy']:.4g}\n")


def test_evaluate_checks_its_options_as_the_command_line_does(tmp_path, tiny_model_dir, monkeypatch):
    """evaluate's keyword arguments are the eval's flags with underscores, typed and checked as the command line
    checks them: a mistake is a UserError naming the option, before the model loads."""
    import rpo_engine
    from rpo_engine.errors import UserError
    from rpo_engine.eval import evaluate

    monkeypatch.setattr(rpo_engine, "load_model", lambda *args, **kwargs: pytest.fail("loaded the model"))
    for options, message in (({"eval_sizes": 3}, "evaluate: unknown option 'eval_sizes'; did you mean eval_size?"),
                             ({"tokenzier": None}, "evaluate: unknown option 'tokenzier'; did you mean tokenizer?"),
                             ({"eval_size": "3"}, "evaluate: eval_size must be an integer, got '3'"),
                             ({"eval_size": 2.0}, "evaluate: eval_size must be an integer, got 2.0"),
                             ({"no_progress": "yes"}, "evaluate: no_progress must be true or false, got 'yes'"),
                             ({"dataset": 7}, "evaluate: dataset must be a string or null, got 7"),
                             ({"num_samples": 0}, "--num-samples must be >= 1, got 0"),
                             ({"top_k": 3}, "--top-k does nothing with --temperature 0"),
                             ({"output": tmp_path / "no" / "p.jsonl"}, f"{tmp_path / 'no'}: no such directory"),
                             ({"model": tiny_model_dir, "help": True}, "evaluate: unknown option 'help'")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            evaluate(**options)


def test_evaluate_leaves_the_callers_random_generators_as_they_were(tmp_path, tiny_model_dir):
    """evaluate seeds the global generators (--seed: a stochastic reward scores the same again), which a
    trainer calling it between its steps draws from: its random streams go on after the call as if there had
    been none, as the trainer's own eval leaves them."""
    import random

    import numpy

    from rpo_engine.eval import evaluate

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1\nA:", "answer": "2"}) + "\n")
    random.seed(11), numpy.random.seed(11), torch.manual_seed(11)
    expected = (random.random(), numpy.random.rand(), torch.rand(()))
    random.seed(11), numpy.random.seed(11), torch.manual_seed(11)
    evaluate(model=tiny_model_dir, dataset=data, max_completion_length=2, temperature=1.0, seed=3,
             reward="tests.reward_fns:torch_coin_reward", no_progress=True)
    assert (random.random(), numpy.random.rand(), torch.rand(())) == expected


def test_evaluate_frees_the_model_when_a_user_error_stops_it(tmp_path, tiny_model_dir, monkeypatch):
    """A UserError after the model loaded (a prompt too long for it) reaches a notebook's cell, which keeps it: its
    traceback's frames must not hold the model (on a GPU, the memory the corrected second call needs)."""
    import gc
    import weakref

    import rpo_engine
    from rpo_engine.errors import UserError
    from rpo_engine.eval import evaluate

    models, load_model = [], rpo_engine.load_model

    def loaded(*args, **kwargs):
        model = load_model(*args, **kwargs)
        models.append(weakref.ref(model))
        return model

    monkeypatch.setattr(rpo_engine, "load_model", loaded)
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+" * 200 + "1=", "answer": "201"}) + "\n")
    with pytest.raises(UserError, match="prompt of row .0. has 402 tokens") as raised:  # held, as a notebook holds it
        evaluate(model=tiny_model_dir, dataset=data, max_prompt_length=300, no_progress=True)
    gc.collect()
    assert models and models[0]() is None, raised


def trained_step(model, tokenizer, lr: float = 0.5) -> None:
    """One SGD step of next-token loss on a task line: the weights (with LoRA, the adapters) move, their gradients
    stay on the parameters as a training loop leaves them before its next zero_grad."""
    ids = torch.tensor([tokenizer.encode("Q: 2+3\nA: 5", add_special_tokens=False)], device=model.device)
    logits = model(ids)
    loss = torch.nn.functional.cross_entropy(logits[0, :-1].float(), ids[0, 1:])
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def model_state(model) -> dict:
    """Everything of `model` an eval must leave alone: each parameter's values, storage, version (an in-place
    write bumps it), requires_grad and gradient (the same tensor, the same values), each module's mode and
    attributes (a merged LoRA copy left on an adapter)."""
    return {"parameters": {name: (p.detach().clone(), p.data_ptr(), p._version, p.requires_grad,
                                  None if p.grad is None else (id(p.grad), p.grad.clone()))
                           for name, p in model.named_parameters()},
            "modes": {name: m.training for name, m in model.named_modules()},
            "attributes": {name: {k: v for k, v in vars(m).items() if not k.startswith("_")}
                           for name, m in model.named_modules()}}


def assert_same_state(before: dict, after: dict) -> None:
    assert before["modes"] == after["modes"] and before["attributes"].keys() == after["attributes"].keys()
    for name, attributes in before["attributes"].items():
        assert attributes.keys() == after["attributes"][name].keys(), name
        for key, value in attributes.items():
            if not isinstance(value, torch.Tensor):
                assert after["attributes"][name][key] is value or after["attributes"][name][key] == value, (name, key)
    assert before["parameters"].keys() == after["parameters"].keys()
    for name, (values, pointer, version, requires_grad, grad) in before["parameters"].items():
        values_after, pointer_after, version_after, requires_grad_after, grad_after = after["parameters"][name]
        assert torch.equal(values, values_after) and (pointer, version, requires_grad) == \
            (pointer_after, version_after, requires_grad_after), name
        assert (grad is None) == (grad_after is None), name
        if grad is not None:
            assert grad[0] == grad_after[0] and torch.equal(grad[1], grad_after[1]), name


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_evaluate_takes_the_model_being_trained_in_memory(tmp_path, tiny_model_dir, lora):
    """evaluate(model=<the model object>, tokenizer=...): a loop of one's own (examples/custom_loop.py) evaluates
    its model between steps without saving it. The metrics and completions are those of saving it (save_pretrained,
    LoRA adapters merged) and evaluating that directory, greedy and sampled, a reward drawing from the seeded
    global generators included; the live weights are read (the trained model answers otherwise than the
    untrained one, sampling); and the model is left as it was: values, storage and version of each weight,
    requires_grad, gradients, train/eval mode, no merged LoRA copy left on it."""
    import rpo_engine
    from rpo_engine.eval import evaluate
    from rpo_engine.model import apply_lora

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\nA:", "answer": str(i + 1)}) + "\n" for i in range(6)))
    model, tokenizer = rpo_engine.load_model(tiny_model_dir), rpo_engine.load_tokenizer(tiny_model_dir)
    if lora:
        apply_lora(model, r=4, alpha=8.0)
    trained_step(model, tokenizer)
    for training in (True, False):
        model.train(training)
        before = model_state(model)
        for name, options in {"greedy": dict(reward="tests.reward_fns:hash_reward"),
                              "sampled": dict(reward="tests.reward_fns:torch_coin_reward", num_samples=4,
                                              temperature=1.0, seed=5)}.items():
            common = dict(dataset=data, max_completion_length=8, no_progress=True, **options)
            run = tmp_path / f"{name}-{lora}-{training}"
            run.mkdir()
            in_memory = evaluate(model=model, tokenizer=tokenizer, output=run / "in_memory.jsonl", **common)
            assert_same_state(before, model_state(model))
            model.save_pretrained(run / "saved", tokenizer=tokenizer)
            assert in_memory == evaluate(model=run / "saved", output=run / "saved.jsonl", **common)
            assert (run / "in_memory.jsonl").read_text() == (run / "saved.jsonl").read_text()
            if name == "sampled":  # the tiny model's greedy answers are all alike, trained or not
                evaluate(model=tiny_model_dir, output=run / "untrained.jsonl", **common)
                assert (run / "in_memory.jsonl").read_text() != (run / "untrained.jsonl").read_text()
    # its tokenizer by default, as TRL's trainers read a model's own: the directory it was loaded from
    assert evaluate(model=rpo_engine.load_model(tiny_model_dir), dataset=data, max_completion_length=8,
                    no_progress=True) == evaluate(model=tiny_model_dir, dataset=data, max_completion_length=8,
                                                  no_progress=True)


def test_evaluate_keeps_the_merged_lora_copies_of_the_callers_own_engine(tmp_path, tiny_model_dir):
    """A loop whose RolloutEngine decodes merged LoRA copies (merge_lora=True) keeps them through an eval of its
    model: the same tensors (its CUDA graphs read them), brought up to date, and its next rollout unchanged."""
    import rpo_engine
    from rpo_engine.eval import evaluate
    from rpo_engine.model import apply_lora
    from rpo_engine.model.lora import lora_modules
    from rpo_engine.rollout import RolloutEngine, SamplingParams

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1\nA:", "answer": "2"}) + "\n")
    model, tokenizer = rpo_engine.load_model(tiny_model_dir), rpo_engine.load_tokenizer(tiny_model_dir)
    apply_lora(model, r=4, alpha=8.0)
    engine = RolloutEngine(model, merge_lora=True, tokenizer=tokenizer)
    params = SamplingParams(n=2, max_new_tokens=6, temperature=1.0, seed=1)
    engine.generate([[5, 6, 7]], params)
    trained_step(model, tokenizer)
    copies = {name: m.rollout_weight for name, m in lora_modules(model).items()}
    expected = engine.generate([[5, 6, 7]], params)
    evaluate(model=model, tokenizer=tokenizer, dataset=data, max_completion_length=4, no_progress=True)
    assert {name: m.rollout_weight for name, m in lora_modules(model).items()} == copies
    assert [[c.token_ids for c in s] for s in engine.generate([[5, 6, 7]], params)] == \
        [[c.token_ids for c in s] for s in expected]


@pytest.mark.parametrize("given", ["object", "directory"])
def test_evaluate_gives_the_kv_cache_back_however_it_ends(tmp_path, tiny_model_dir, monkeypatch, given):
    """The eval's K/V cache is freed when the call returns, and when it fails with an error the caller keeps (a
    notebook's cell keeps its traceback, whose frames hold the engine): the memory a training step needs next."""
    import weakref

    import rpo_engine
    import rpo_engine.trainer
    from rpo_engine.eval import evaluate

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1\nA:", "answer": "2"}) + "\n")
    model = dict(model=rpo_engine.load_model(tiny_model_dir), tokenizer=rpo_engine.load_tokenizer(tiny_model_dir)) \
        if given == "object" else dict(model=tiny_model_dir)
    caches, graded = [], rpo_engine.trainer.sampled_graded

    def recorded(engine, *args, **kwargs):
        caches.extend(weakref.ref(t) for t in (engine.runner.k_cache, engine.runner.v_cache))
        if fail:
            raise KeyboardInterrupt  # not a UserError: evaluate leaves its frames alone
        return graded(engine, *args, **kwargs)

    monkeypatch.setattr(rpo_engine.trainer, "sampled_graded", recorded)
    for fail in (False, True):
        caches.clear()
        with pytest.raises(KeyboardInterrupt) if fail else contextlib.nullcontext() as raised:
            evaluate(**model, dataset=data, max_completion_length=4, no_progress=True)
        assert len(caches) == 2 and all(cache() is None for cache in caches), raised


def test_evaluate_refuses_what_it_cannot_evaluate_in_memory(tmp_path, tiny_model_dir):
    """evaluate's model object is our CausalLM, a transformers causal LM or a PEFT model of one; anything else, and
    the options a model object cannot take (it is evaluated as it is, where it is), are one-line UserErrors."""
    import rpo_engine
    from rpo_engine.errors import UserError
    from rpo_engine.eval import evaluate

    class Wrapped(torch.nn.Module):  # as DistributedDataParallel wraps a model
        def __init__(self, module):
            super().__init__()
            self.module = module

    model, tokenizer = rpo_engine.load_model(tiny_model_dir), rpo_engine.load_tokenizer(tiny_model_dir)
    from rpo_engine.data.starter import tiny_task_model

    unsaved, _ = tiny_task_model()
    for options, message in (
            ({"model": {"w": 1}}, "evaluate: model must be a directory, a Hub id, or a model object (rpo_engine's "
                                  "CausalLM, a transformers causal LM or a PEFT model of one), got dict"),
            ({"model": Wrapped(model)}, "evaluate: model must be a directory, a Hub id, or a model object "
                                        "(rpo_engine's CausalLM, a transformers causal LM or a PEFT model of one), "
                                        "got Wrapped; pass the CausalLM it wraps"),
            ({"model": 7}, "evaluate: model must be a directory"),
            ({"model": model, "adapter": str(tmp_path)}, "evaluate: adapter= applies to a model loaded from a "
                                                         "directory; a model object is evaluated as it is"),
            ({"model": model, "device": "cpu"}, "evaluate: device= with a model object, which is evaluated where "
                                                "it is (cpu): leave device out"),
            ({"model": model, "dtype": "bfloat16"}, "evaluate: dtype= with a model object, which is evaluated in its "
                                                    "own dtype (torch.float32): leave dtype out"),
            ({"model": model, "tokenizer": tokenizer, "system_prompt": "Be brief."},
             "--system-prompt needs a chat template: the tokenizer of the CausalLM given has none"),
            ({"model": unsaved}, "evaluate: pass tokenizer= with the CausalLM (it was not loaded from a directory "
                                 "to read one from)"),
            ({"model": model, "tokenizer": "tok"}, "evaluate: tokenizer must be the model's tokenizer, got str"),
            ({"model": tiny_model_dir, "tokenizer": tokenizer}, "evaluate: tokenizer= goes with a model object"),
            ({"tokenizer": tokenizer}, "evaluate: tokenizer= goes with a model object")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            evaluate(**options)


def test_evaluate_takes_a_transformers_model_in_memory(tmp_path, tiny_model_dir):
    """A transformers causal LM (a TRL user's model), PEFT-wrapped or not, is evaluated on its own tensors
    (from_transformers), with the metrics and completions of its directory's (with PEFT's adapter, --adapter),
    and left as it was."""
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from rpo_engine.eval import evaluate

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\nA:", "answer": str(i + 1)}) + "\n" for i in range(4)))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    common = dict(dataset=data, max_completion_length=6, no_progress=True, reward="tests.reward_fns:hash_reward",
                  num_samples=3, temperature=1.0)
    for saved in ({}, {"adapter": tmp_path / "adapter"}):
        model = hf if not saved else peft.get_peft_model(  # which adds the adapters to hf itself
            hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
        before = model_state(model)
        in_memory = evaluate(model=model, output=tmp_path / f"{len(saved)}-in_memory.jsonl", **common)
        assert_same_state(before, model_state(model))
        if saved:
            model.save_pretrained(saved["adapter"])
        assert in_memory == evaluate(model=tiny_model_dir, output=tmp_path / f"{len(saved)}-saved.jsonl", **saved,
                                     **common)
        assert (tmp_path / f"{len(saved)}-in_memory.jsonl").read_text() == \
            (tmp_path / f"{len(saved)}-saved.jsonl").read_text()
    assert (tmp_path / "0-in_memory.jsonl").read_text() != (tmp_path / "1-in_memory.jsonl").read_text()

def test_eval_cli_seeds_the_torch_rng_a_stochastic_reward_reads(tmp_path, tiny_model_dir):
    """A reward drawing from torch's global generator (a sampled judge) scores the same in two eval processes: --seed
    seeds it, as a training run's does (torch starts it from the OS in each process)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\nA:", "answer": str(i + 1)}) + "\n" for i in range(12)))
    cmd = [sys.executable, "-m", "rpo_engine.eval", "--model", str(tiny_model_dir), "--dataset", str(data),
           "--max-completion-length", "4", "--no-progress", "--reward", "tests.reward_fns:torch_coin_reward"]
    rewards = []
    for name in ("a.jsonl", "b.jsonl"):
        proc = subprocess.run([*cmd, "--output", str(tmp_path / name)], capture_output=True, text=True, cwd=REPO)
        assert proc.returncode == 0, proc.stderr
        rewards.append([json.loads(line)["reward"] for line in (tmp_path / name).read_text().splitlines()])
    assert rewards[0] == rewards[1] and 0 < sum(rewards[0]) < 12, rewards  # the same 12 coins, not all alike


def test_eval_cli_takes_a_seed_past_64_bits_as_its_sampler_does(tmp_path, tiny_model_dir):
    """eval's --seed is any integer (the sampler keeps its low 64 bits); seeding the global generators with it too
    made one past torch.manual_seed's range a ValueError traceback ("Overflow when unpacking long long"). Without
    --dataset too, where it also picks the built-in split: training's 64-bit check of its --seed refused it there."""
    from rpo_engine.eval import main
    from rpo_engine.trainer import seed_global_rngs

    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "Q: 1+1\nA:", "answer": "2"}) + "\n")
    for source in (["--dataset", str(data)], ["--eval-size", "2"]):
        assert main(["--model", str(tiny_model_dir), *source, "--max-completion-length", "2",
                     "--no-progress", "--temperature", "1", "--seed", str(2 ** 64 + 5)]) == 0
    for seed in (0, 5, -3, 2 ** 64 - 1):  # within torch's range: seeded as before
        seed_global_rngs(seed)
        state = torch.get_rng_state()
        torch.manual_seed(seed)
        assert torch.equal(torch.get_rng_state(), state)


def test_next_steps_cold_starts_run_with_this_steps_suffixes(tmp_path, tiny_model_dir):
    out = tmp_path / "ahead"
    run_train("--model", tiny_model_dir, "--steps", 3, "--eval-steps", 0, "--train-size", 6, "--output", out, *SMALL)
    first, second, third = read_metrics(out)
    # step 1 cold-starts its 3 prompts first, then the next step's 3 beside its own suffixes
    assert first["cold_starts"] == 6 and first["cache_hit_rate"] == 0.0
    # every later prompt finds its path ready
    assert second["cold_starts"] == 0 and second["cache_hit_rate"] == 1.0
    assert third["cold_starts"] == 0 and third["cache_hit_rate"] == 1.0


def test_data_order_reads_ahead_exactly(tmp_path, tiny_model_dir):
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    config = parse_args(["--model", str(tiny_model_dir), "--train-size", "5", "--output", str(tmp_path), "--seed", "3"])
    trainer = build_trainer(config)
    seen = []
    for _ in range(4):  # 12 rows: across two epoch boundaries
        ahead = trainer.peek_rows(3)
        rows = trainer.next_rows(3)
        assert [r["id"] for r in ahead] == [r["id"] for r in rows]
        seen += [r["id"] for r in rows]
    assert sorted(seen[:5]) == sorted(seen[5:10])  # each epoch is a permutation of the 5 rows
    assert seen[:5] != seen[5:10]  # reshuffled (seed 3 gives different orders)
    assert seen[:5] != [r["id"] for r in trainer.train_rows]
    # --no-shuffle-dataset (TRL's shuffle_dataset=False): the dataset's order, epoch after epoch
    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--train-size", "5", "--output",
                                        str(tmp_path), "--seed", "3", "--no-shuffle-dataset"]))
    assert trainer.peek_rows(3) == trainer.next_rows(3)
    in_order = [r["id"] for r in trainer.train_rows]
    assert [r["id"] for r in trainer.next_rows(9)] == in_order[3:] + in_order + in_order[:2]


def test_broken_checkpoint_is_a_user_error(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    run_train("--model", tiny_model_dir, "--steps", 1, "--eval-steps", 0, "--output", out, *SMALL)
    metrics = (out / "metrics.jsonl").read_text()
    state = out / "checkpoints" / "step-1" / "trainer_state.pt"
    for broken in (b"not a checkpoint", None):
        if broken is None:  # a loadable file that lacks what a trainer state holds
            torch.save({"step": 1}, state)
        else:
            state.write_bytes(broken)
        proc = run_train("--model", tiny_model_dir, "--steps", 2, "--eval-steps", 0, "--output", out, "--resume",
                         *SMALL, check=False)
        assert_user_error(proc, "trainer_state.pt", "not a checkpoint this rpo_engine can resume")
        assert (out / "metrics.jsonl").read_text() == metrics


def test_a_broken_trainer_state_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """What can be told of a trainer_state.pt without the model (not a torch file, not a trainer state, a step or
    rows_drawn that is no count, a step not its directory's) is told before build_trainer loads one: at 7B that
    is minutes, and each rank's memory."""
    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist
    from rpo_engine.errors import UserError

    monkeypatch.setattr(train, "build_trainer", lambda *a, **k: pytest.fail("built a trainer"))
    out = tmp_path / "run"
    state_file = out / "checkpoints" / "step-1" / "trainer_state.pt"
    state_file.parent.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    cases = {"not a torch file": (b"not a checkpoint", "not a checkpoint this rpo_engine can resume"),
             "a list": ([1, 2], "holds a list, not a trainer state"),
             "no rows_drawn": ({"step": 1}, "KeyError: 'rows_drawn'"),
             "a step that is text": ({"step": "1", "rows_drawn": 8}, "step is '1', not a count"),
             "negative rows_drawn": ({"step": 1, "rows_drawn": -3}, "rows_drawn is -3, not a count"),
             "another step's": ({"step": 5, "rows_drawn": 8}, "holds step 5, not its directory's 1")}
    for case, (content, said) in cases.items():
        if isinstance(content, bytes):
            state_file.write_bytes(content)
        else:
            torch.save(content, state_file)
        with pytest.raises(UserError, match=re.escape(said)) as raised:
            train.train(parse_args(["--output", str(out), "--resume"]), Dist())
        assert str(state_file) in str(raised.value), case
    assert not (out / "config.json").exists()


def test_a_broken_trainer_state_is_refused_before_the_hub_repository_is_made(tmp_path, monkeypatch):
    """--push-to-hub makes its Hub repository before the training (a missing token fails at once): a resume whose
    trainer_state.pt cannot resume made it first, a repository for a run that never ran."""
    import rpo_engine.hub
    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist
    from rpo_engine.errors import UserError

    made = []
    monkeypatch.setattr(rpo_engine.hub, "create_push_repo", lambda *args: made.append(args))
    monkeypatch.setattr(train, "build_trainer", lambda *a, **k: pytest.fail("built a trainer"))
    out = tmp_path / "run"
    state_file = out / "checkpoints" / "step-1" / "trainer_state.pt"
    state_file.parent.mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"step": 1}\n')
    torch.save({"step": 5, "rows_drawn": 8}, state_file)
    with pytest.raises(UserError, match="holds step 5, not its directory's 1"):
        train.train(parse_args(["--output", str(out), "--resume", "--push-to-hub", "--hub-model-id", "a/b"]), Dist())
    assert made == []


def test_a_warmup_as_long_as_the_run_is_warned_of(tmp_path, monkeypatch, capsys):
    """--warmup-steps at or above --steps is accepted, as transformers accepts it, but said: the learning rate would
    rise through the whole run and never decay (a 40-step default with a 100-step warmup from another recipe)."""
    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist

    class Built(Exception):
        pass

    def built(*args, **kwargs):
        raise Built

    monkeypatch.setattr(train, "build_trainer", built)
    for flags, warned in [(["--warmup-steps", "40"], True), (["--warmup-steps", "100"], True),
                          (["--warmup-steps", "39"], False), (["--warmup-steps", "0.999"], True), ([], False),
                          (["--steps", "1"], False)]:  # one step: its warmup of 5% rounds up to the step itself
        with pytest.raises(Built):
            train.train(parse_args(["--output", str(tmp_path / "run"), "--steps", "40", *flags]), Dist())
        err = capsys.readouterr().err
        assert ("warning: the warmup (" in err) == warned, (flags, err)
        if flags == ["--warmup-steps", "100"]:
            assert "warning: the warmup (100 steps) is not shorter than --steps 40: the learning rate rises" in err


def test_a_run_from_python_with_a_train_config(tmp_path, tiny_model_dir):
    """A whole run from a script, as TRL's `GRPOTrainer(...).train()` is: TrainConfig (nested AlgoConfig/RPOConfig,
    checked as the flags are) into rpo_engine.train.train, the same outputs as the command line; a mistake raises
    UserError instead of exiting."""
    from rpo_engine import TrainConfig, UserError
    from rpo_engine.config import AlgoConfig, RPOConfig
    from rpo_engine.train import train

    config = TrainConfig(model=str(tiny_model_dir), output=str(tmp_path / "run"), steps=2, prompts_per_step=3,
                         num_generations=4, max_completion_length=48, eval_steps=0, progress=False,
                         algo=AlgoConfig(algo="dapo"), rpo=RPOConfig(rpo_max_cut=8))
    assert train(config) == 0
    assert [m["step"] for m in read_metrics(tmp_path / "run")] == [1, 2]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["algo"]["algo"] == "dapo"
    with pytest.raises(UserError, match="already holds a run; pass --resume"):
        train(config)
    with pytest.raises(UserError, match="--steps must be >= 1"):
        TrainConfig(steps=0)


def test_a_tampered_trainer_state_is_refused_in_one_line(tmp_path, tiny_model_dir):
    """A trainer_state.pt that loads (weights only) but holds what no run saved: a cached path of token ids outside
    the vocabulary (the rollout's traceback a step later), a cache whose paths are no dict. Each is refused in one
    line at the resume, before anything is written (a step that is no count or not its directory's: the test
    above, before the model loads)."""
    out = tmp_path / "run"
    run_train("--model", tiny_model_dir, "--steps", 1, "--eval-steps", 0, "--output", out, *SMALL)
    metrics = (out / "metrics.jsonl").read_text()
    state_file = out / "checkpoints" / "step-1" / "trainer_state.pt"
    saved = torch.load(state_file, weights_only=True)
    assert saved["cache"]["packed_paths"]["ids"]  # RPO (the default) cached the cold starts' paths
    legacy = legacy_cache_state(saved["cache"])  # as the code before packed paths saved it: still checked alike

    def out_of_vocab(state, token):
        first = next(iter(state["cache"]["paths"].values()))
        first[0], first[4] = [token, *first[0][1:]], None

    def packed_token(state, token, dtype=torch.int32):
        tokens = state["cache"]["packed_paths"]["tokens"].to(dtype)
        tokens[3] = token
        state["cache"]["packed_paths"]["tokens"] = tokens
    tampers = {"token id 1000000": lambda s: out_of_vocab(s, 10 ** 6), "token id -3": lambda s: out_of_vocab(s, -3),
               "token id 2.5": lambda s: out_of_vocab(s, 2.5),
               "paths is a list": lambda s: s["cache"].update(paths=[1, 2]),
               "not [token ids, reward, step": lambda s: s["cache"]["paths"].update(extra=7)}
    packed_tampers = {"token id 1000000": lambda s: packed_token(s, 10 ** 6),
                      "token id -3": lambda s: packed_token(s, -3),
                      "tokens is not a 1-d tensor of integers": lambda s: packed_token(s, 2.5, torch.float32),
                      "offsets do not split": lambda s: s["cache"]["packed_paths"]["offsets"].add_(1)}
    for fragment, tamper, old_format in [*((f, t, True) for f, t in tampers.items()),
                                         *((f, t, False) for f, t in packed_tampers.items())]:
        if old_format:
            cache = {**legacy, "paths": {k: list(v) for k, v in legacy["paths"].items()}}
        else:
            cache = {**saved["cache"], "packed_paths": {k: v.clone() if isinstance(v, torch.Tensor) else v
                                                        for k, v in saved["cache"]["packed_paths"].items()}}
        state = {**saved, "cache": cache}
        tamper(state)
        torch.save(state, state_file)
        proc = run_train("--model", tiny_model_dir, "--steps", 2, "--eval-steps", 0, "--output", out, "--resume",
                         *SMALL, check=False)
        assert_user_error(proc, "trainer_state.pt", fragment)
        assert (out / "metrics.jsonl").read_text() == metrics


def test_top_entropy_quantile_counts_last_bit_differences_as_ties():
    """A group's G samples predict their first suffix token from one context, so those entropies tie; computed in
    another layout (padded, a sample a micro-batch) they differ in the last bits (5.399603366851807 shared,
    5.399603843688965 padded, in the update fuzz). A threshold on the tie kept all G shared and a layout-dependent
    subset padded, so the kept tokens and the loss changed with --no-prefix-sharing and the budget."""
    from rpo_engine.trainer import at_or_above

    tied, below = 5.399603366851807, 5.399603843688965 * (1 - 1e-5)
    values = torch.tensor([[tied, 5.399603843688965, below, math.nan]])
    assert at_or_above(values, 5.399603843688965).tolist() == [[True, True, False, False]]
    assert at_or_above(values, tied).tolist() == [[True, True, False, False]]
    assert not at_or_above(values, math.inf).any()  # no token with a policy gradient: none kept
    assert at_or_above(torch.tensor([-2.0, -2.0 * (1 + 2 ** -22)]), -2.0).tolist() == [True, True]


def test_eval_cli_repetition_penalty_applies_to_greedy_decoding(tmp_path, tiny_model_dir):
    # transformers' generate applies it to greedy decoding too, so unlike --top-k it is no error with --temperature 0
    from rpo_engine.eval import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\nA:", "answer": str(i + 1)}) + "\n" for i in range(4)))
    common = ["--model", str(tiny_model_dir), "--dataset", str(data), "--max-completion-length", "24", "--no-progress",
              "--reward", "tests.reward_fns:hash_reward"]
    main([*common, "--output", str(tmp_path / "plain.jsonl")])
    main([*common, "--output", str(tmp_path / "penalized.jsonl"), "--repetition-penalty", "2.0"])
    plain, penalized = ([json.loads(line)["completion"] for line in (tmp_path / name).read_text().splitlines()]
                        for name in ("plain.jsonl", "penalized.jsonl"))
    assert len(plain) == len(penalized) == 4 and plain != penalized


def test_filter_overlong_prompts_drops_those_rows_and_says_how_many(tmp_path, tiny_model_dir):
    """verl's filter_overlong_prompts: the rows whose prompts are over the limit leave the training and eval
    sets (counted on stderr); the others train as they would alone. Without it the first is an error naming
    the option; with every row too long, an error too."""
    short = [{"id": f"s{i}", "prompt": f"Q: {i}+1\nA:", "answer": str(i + 1)} for i in range(6)]
    long = [{"id": f"l{i}", "prompt": "1+" * (150 + i) + "1=", "answer": "1"} for i in range(2)]  # 300+ tokens
    mixed, only_short, only_long = tmp_path / "mixed.jsonl", tmp_path / "short.jsonl", tmp_path / "long.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in short[:3] + long[:1] + short[3:] + long[1:]))
    only_short.write_text("".join(json.dumps(r) + "\n" for r in short))
    only_long.write_text("".join(json.dumps(r) + "\n" for r in long))
    common = ["--model", tiny_model_dir, "--max-prompt-length", 200, "--steps", 2, "--eval-steps", 1,
              "--reward", "tests.reward_fns:hash_reward", *SMALL]
    assert_user_error(run_train(*common, "--dataset", mixed, "--eval-dataset", only_short, "--output", tmp_path / "x",
                                check=False), "prompt of row 'l0' has", "--filter-overlong-prompts drops such rows")
    filtered = run_train(*common, "--dataset", mixed, "--eval-dataset", mixed, "--filter-overlong-prompts",
                         "--output", tmp_path / "filtered")
    assert (f"{mixed}: --filter-overlong-prompts dropped 2 of its 8 rows, whose prompts exceed 200 tokens "
            f"(the longest 304)") in filtered.stderr
    assert filtered.stderr.count("--filter-overlong-prompts dropped") == 2  # the training and the eval set
    run_train(*common, "--dataset", only_short, "--eval-dataset", only_short, "--output", tmp_path / "alone")
    for a, b in zip(read_metrics(tmp_path / "filtered"), read_metrics(tmp_path / "alone")):
        for key in ("eval_accuracy", "reward_mean", "rollout_generated_tokens", "loss"):
            assert a.get(key) == pytest.approx(b.get(key), rel=1e-5), key
    assert_user_error(run_train(*common, "--dataset", only_long, "--eval-dataset", only_short,
                                "--filter-overlong-prompts", "--output", tmp_path / "y", check=False),
                      f"{only_long}: --filter-overlong-prompts would drop all 2 of its 2 rows",
                      "raise --max-prompt-length")


def test_eval_cli_filter_overlong_prompts(tmp_path, tiny_model_dir, capsys):
    from rpo_engine.eval import main

    data = tmp_path / "d.jsonl"
    rows = [{"prompt": f"Q: {i}+1\nA:", "answer": str(i + 1)} for i in range(3)] + [{"prompt": "1+" * 150, "answer": "1"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["--model", str(tiny_model_dir), "--dataset", str(data), "--max-prompt-length", "200",
          "--max-completion-length", "8", "--no-progress", "--filter-overlong-prompts"])
    out = capsys.readouterr()
    assert "on 3 rows" in out.out and f"{data}: --filter-overlong-prompts dropped 1 of its 4 rows" in out.err


def test_sampled_eval_reports_avg_and_pass_at_k_and_resumes_alike(tmp_path, tiny_model_dir):
    """--eval-temperature / --num-generations-eval (verl's val_kwargs, TRL's num_generations_eval): eval_accuracy
    is the mean over K sampled answers a prompt, eval_pass_at_k the share of prompts with a right one; seeded by
    (run seed, step, row), so a resumed run evaluates as the uninterrupted one."""
    full, part = tmp_path / "full", tmp_path / "part"
    common = ["--model", tiny_model_dir, "--save-steps", 1, "--eval-steps", 1, "--reward", "tests.reward_fns:hash_reward",
              "--eval-temperature", 1.0, "--num-generations-eval", 4, "--eval-top-k", 50, *SMALL]
    proc = run_train(*common, "--steps", 2, "--output", full)
    a = read_metrics(full)
    evals = [(m["eval_accuracy"], m["eval_pass_at_k"]) for m in a]
    assert len(evals) == 3 and all(0 < acc < pass_ <= 1 for acc, pass_ in evals), evals  # 4 tries beat 1
    assert all(acc * 16 == int(acc * 16) for acc, _ in evals)  # 4 eval prompts x 4 answers
    assert f"step 0: eval accuracy {evals[0][0]:.3f} (avg@4 at T=1), pass@4 {evals[0][1]:.3f}" in proc.stdout
    assert f"eval accuracy {evals[0][0]:.3f} -> {evals[-1][0]:.3f} (avg@4 at T=1)" in proc.stdout  # the summary
    stopped_after(full, 1, part)
    shutil.copy(full / "config.json", part / "config.json")
    run_train(*common, "--steps", 2, "--output", part, "--resume")
    b = read_metrics(part)
    assert [m["step"] for m in b] == [0, 1, 2] and b[2]["eval_accuracy"] == a[2]["eval_accuracy"]
    assert b[2]["eval_pass_at_k"] == a[2]["eval_pass_at_k"]
    greedy = run_train("--model", tiny_model_dir, "--eval-steps", 1, "--reward", "tests.reward_fns:hash_reward",
                       *SMALL, "--steps", 1, "--output", tmp_path / "greedy")
    assert "pass@" not in greedy.stdout and all("eval_pass_at_k" not in m for m in read_metrics(tmp_path / "greedy"))


@pytest.mark.parametrize("flags,message", [
    (["--num-generations-eval", "4"], "--num-generations-eval does nothing without --eval-temperature > 0"),
    (["--eval-top-p", "0.9", "--eval-top-k", "5"], "--eval-top-p and --eval-top-k do nothing without --eval-temperature"),
    (["--eval-temperature", "1e-9"], "--eval-temperature must be 0 (greedy) or >="),
    (["--eval-temperature", "0.6", "--num-generations-eval", "0"], "--num-generations-eval must be >= 1"),
    (["--eval-temperature", "0.6", "--eval-top-p", "0"], "--eval-top-p must be in (0, 1]"),
])
def test_eval_sampling_options_are_checked(flags, message):
    from rpo_engine.config import parse_args
    from rpo_engine.errors import UserError

    with pytest.raises(UserError, match=re.escape(message)):
        parse_args(flags)


class FakeHub:
    """huggingface_hub.HfApi's create_repo and upload_folder, recorded (no network here); `fail` names a call
    that raises as a lost connection would."""

    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def api(self):
        hub = self

        class Api:
            def create_repo(self, repo_id, private=None, exist_ok=False):
                hub.calls.append(("create_repo", repo_id, private, exist_ok))
                if hub.fail == "create_repo":
                    raise OSError("Connection refused")
                return SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}")

            def upload_folder(self, repo_id, folder_path, commit_message):
                hub.calls.append(("upload_folder", repo_id, sorted(p.name for p in Path(folder_path).iterdir()),
                                  commit_message))
                if hub.fail == "upload_folder":
                    raise OSError("Connection reset by peer")

        return Api


def test_push_to_hub_creates_the_repo_first_and_uploads_final(tmp_path, tiny_model_dir, monkeypatch, capsys):
    import huggingface_hub
    from huggingface_hub import constants

    from rpo_engine import train
    from rpo_engine.errors import UserError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
    monkeypatch.setattr(train, "write_plot", lambda *args: None)
    args = ["--model", tiny_model_dir, "--no-progress", "--prompts-per-step", 1, "--num-generations", 2,
            "--max-completion-length", 4, "--train-size", 1, "--eval-size", 1, "--steps", 1, "--push-to-hub"]
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api())
    assert train.main(list(map(str, [*args, "--output", tmp_path / "run-a", "--hub-private-repo"]))) == 0
    assert hub.calls[0] == ("create_repo", "run-a", True, True)  # --output's name in the token's namespace
    _, repo, files, message = hub.calls[1]
    assert repo == "me/run-a" and "model.safetensors" in files and "config.json" in files and "RPO-GRPO" in message
    assert f"pushed {tmp_path / 'run-a' / 'final'} to https://huggingface.co/me/run-a" in capsys.readouterr().out
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.api())
    assert train.main(list(map(str, [*args, "--output", tmp_path / "lora", "--hub-model-id", "org/x", "--use-peft",
                                     "--lora-r", 2]))) == 0
    assert hub.calls[0] == ("create_repo", "org/x", None, True)
    assert "adapter_config.json" in hub.calls[1][2] and "config.json" not in hub.calls[1][2]  # the adapter, as TRL
    # a lost connection: at the start nothing trains; at the end the model is kept and the command to upload it named
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub("create_repo").api())
    with pytest.raises(UserError, match=r"cannot create or reach the model repository me/y \(OSError: Connection refused"):
        train.main(list(map(str, [*args, "--output", tmp_path / "none", "--hub-model-id", "me/y"])))
    assert not (tmp_path / "none" / "metrics.jsonl").exists()
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub("upload_folder").api())
    final = tmp_path / "late" / "final"
    with pytest.raises(UserError, match=re.escape(f"it is kept: upload it with `hf upload me/late {final}`")):
        train.main(list(map(str, [*args, "--output", tmp_path / "late"])))
    assert (final / "model.safetensors").is_file()
    with pytest.raises(UserError, match="--hub-model-id and --hub-private-repo do nothing without --push-to-hub"):
        train.main(list(map(str, [*args[:-1], "--hub-model-id", "a/b", "--hub-private-repo"])))
    with pytest.raises(UserError, match="--hub-model-id 'a/b/c': not a Hub repository id"):
        train.main(list(map(str, [*args, "--output", tmp_path / "never", "--hub-model-id", "a/b/c"])))
    # no --hub-model-id: the name is --output's, and the error says so (it named the --hub-model-id never given)
    with pytest.raises(UserError, match=re.escape("--push-to-hub: --output's last part 'my run', the repository's "
                                                  "default name, is not a Hub repository name")):
        train.main(list(map(str, [*args, "--output", tmp_path / "my run"])))
    assert not (tmp_path / "my run").exists()
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    with pytest.raises(UserError, match="needs a Hugging Face token that may write: set HF_TOKEN"):
        train.main(list(map(str, [*args, "--output", tmp_path / "never"])))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set, so nothing can be uploaded"):
        train.main(list(map(str, [*args, "--output", tmp_path / "never"])))


def test_a_local_spelling_of_an_id_is_never_looked_up_on_the_hub(tmp_path, tiny_model_dir, monkeypatch):
    """./org/tiny and org/tiny/ are local paths (is_hub_id says so), and with no such directory an error: a Path
    drops the ./ and the trailing /, so the model, its tokenizer and a train or eval run (which resolve the name,
    then load what it resolved to) read the Hub's org/tiny in their place."""
    import huggingface_hub

    import rpo_engine
    from rpo_engine.errors import UserError
    from rpo_engine.model.checkpoint import model_directory
    from tests.helpers import hub_snapshot

    hub_snapshot(tmp_path / "hub", "org/tiny", tiny_model_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    for name in ("./org/tiny", "org/tiny/"):
        for load in (rpo_engine.load_model, rpo_engine.load_tokenizer):
            with pytest.raises(UserError, match=f"^{re.escape(str(tmp_path / 'org' / 'tiny'))}: (model|tokenizer) "
                                                f"directory not found$"):
                load(model_directory(name))
    assert model_directory("org/tiny").parent.name == "snapshots"  # the id itself still is the Hub's


def test_a_wandb_run_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    """wandb.init refusing (no API key: `wandb login` never run; a project name W&B does not take; no connection)
    raises one of W&B's errors, which went up as a traceback (exit 1) after the model had loaded: one line now,
    naming --report-to wandb and W&B's reason."""
    import types

    from rpo_engine.errors import UserError
    from rpo_engine.reporting import Reporter

    class Error(Exception):
        pass

    class UsageError(Error):
        pass

    def init(**kwargs):
        raise UsageError("No API key configured. Use `wandb login` to log in.\nmore")

    wandb = types.ModuleType("wandb")
    wandb.init, wandb.errors = init, types.SimpleNamespace(Error=Error, UsageError=UsageError)
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    with pytest.raises(UserError, match=r"^--report-to wandb: W&B could not start a run \(UsageError: No API key "
                                        r"configured\. Use `wandb login` to log in\.\)$"):
        Reporter(["wandb"], tmp_path, {}, resumed_at=None)


def test_no_progress_hides_huggingface_hub_download_bars(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub.utils

    from rpo_engine import eval as eval_cli
    from rpo_engine import train

    calls = []
    monkeypatch.setattr(huggingface_hub.utils, "disable_progress_bars", lambda: calls.append("off"))
    monkeypatch.setattr(train, "write_plot", lambda *args: None)
    args = ["--model", tiny_model_dir, "--prompts-per-step", 1, "--num-generations", 2, "--max-completion-length", 4,
            "--train-size", 1, "--eval-steps", 0, "--steps", 1]
    assert train.main(list(map(str, [*args, "--output", tmp_path / "a", "--no-progress"]))) == 0
    assert calls == ["off"]
    eval_cli.main(["--model", str(tiny_model_dir), "--eval-size", "1", "--max-completion-length", "2", "--no-progress"])
    assert calls == ["off", "off"]
    assert train.main(list(map(str, [*args, "--output", tmp_path / "b"]))) == 0
    assert calls == ["off", "off"]  # with its bars on, theirs too


def test_no_progress_shows_the_download_bars_again_after_a_run_or_eval_in_this_process(tmp_path, tiny_model_dir,
                                                                                       monkeypatch):
    """train(config) or eval's main from a notebook or script with --no-progress hides huggingface_hub's download
    bars while it runs; they stayed hidden for the rest of the caller's process (its own downloads, its next run
    with bars on), after a run that ended in an error too."""
    from huggingface_hub.utils import are_progress_bars_disabled, enable_progress_bars

    from rpo_engine import UserError
    from rpo_engine import eval as eval_cli
    from rpo_engine import train
    from rpo_engine.config import parse_args

    enable_progress_bars()  # as a fresh process has them
    monkeypatch.setattr(train, "write_plot", lambda *args: None)
    args = ["--model", tiny_model_dir, "--prompts-per-step", 1, "--num-generations", 2, "--max-completion-length", 4,
            "--train-size", 1, "--eval-steps", 0, "--steps", 1, "--no-progress", "--report-to", "none"]
    assert train.train(parse_args(list(map(str, [*args, "--output", tmp_path / "a"])))) == 0
    assert not are_progress_bars_disabled()
    with pytest.raises(UserError, match="already holds a run"):
        train.train(parse_args(list(map(str, [*args, "--output", tmp_path / "a"]))))
    assert not are_progress_bars_disabled()
    eval_cli.main(["--model", str(tiny_model_dir), "--eval-size", "1", "--max-completion-length", "2", "--no-progress"])
    assert not are_progress_bars_disabled()


def test_a_run_that_raises_mid_training_closes_its_progress_bar(tmp_path, tiny_model_dir, monkeypatch):
    """An error in a step (a reward function's bug, Ctrl-C) left the run's tqdm bar open for as long as the caller
    held the error (a notebook keeps the last one): a later run's bar took the next free line below it."""
    from tqdm.auto import tqdm

    from rpo_engine import train
    from rpo_engine.config import parse_args
    from rpo_engine.trainer import Trainer

    class RewardBug(Exception):
        pass

    step = Trainer.step

    def step_then_fail(self):
        if self.step_num == 1:
            raise RewardBug
        return step(self)

    monkeypatch.setattr(Trainer, "step", step_then_fail)
    monkeypatch.setattr(train, "write_plot", lambda *args: None)
    config = parse_args(list(map(str, ["--model", tiny_model_dir, "--output", tmp_path / "run", "--steps", 3,
                                       "--eval-steps", 0, "--report-to", "none", *SMALL])))
    with pytest.raises(RewardBug) as raised:  # held, as a notebook holds it: its traceback holds the run's frames
        train.train(config)
    assert not [bar for bar in tqdm._instances if bar.desc == "RPO-GRPO"], raised


def test_a_user_error_mid_run_frees_the_trainer_for_the_corrected_call(tmp_path, tiny_model_dir, monkeypatch):
    """A UserError in a step (out of GPU memory, said as the settings to lower) reaches a notebook's cell, which
    keeps it: its traceback held the run's frames, and with them the model, the optimizer and the rollout's K/V
    cache (on a GPU, the memory the corrected second call needs)."""
    import gc
    import weakref

    from rpo_engine import UserError, train
    from rpo_engine.config import parse_args
    from rpo_engine.trainer import Trainer

    trainers = []

    def step_out_of_memory(self):
        trainers.append(weakref.ref(self))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (a stand-in)")

    monkeypatch.setattr(Trainer, "step", step_out_of_memory)
    config = parse_args(list(map(str, ["--model", tiny_model_dir, "--output", tmp_path / "run", "--steps", 2,
                                       "--eval-steps", 0, "--report-to", "none", "--no-progress", *SMALL])))
    with pytest.raises(UserError, match="out of GPU memory in step 1") as raised:  # held, as a notebook holds it
        train.train(config)
    gc.collect()
    assert trainers and trainers[0]() is None, raised


def test_log_completions_go_to_wandb_as_a_table(tmp_path, tiny_model_dir, monkeypatch):
    """--log-completions --report-to wandb: each step's completions.jsonl records also as a W&B table (TRL's
    "completions"), a column per field and per reward function's score. W&B is a stand-in (not installed in CI)."""
    import types

    from rpo_engine import reporting, train

    logged = []

    class Run:
        def define_metric(self, name, step_metric=None):
            pass

        def log(self, data):
            logged.append(data)

        def finish(self):
            pass

    class Table:
        def __init__(self, columns, data):
            self.columns, self.data = columns, data

    wandb = types.ModuleType("wandb")
    wandb.init, wandb.Table = (lambda **kwargs: Run()), Table
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setattr(reporting, "installed", lambda package: package == "wandb")
    monkeypatch.setattr(train, "write_plot", lambda *args: None)
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--output", out, "--no-progress", "--prompts-per-step", 1, "--num-generations", 2,
            "--max-completion-length", 4, "--train-size", 1, "--eval-steps", 0, "--report-to", "wandb",
            "--log-completions", "--reward", "tests.reward_fns:hash_reward,exact", "--steps", 2]
    assert train.main(list(map(str, args))) == 0
    tables = [(d["step"], d["completions"]) for d in logged if "completions" in d]
    written = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [step for step, _ in tables] == [1, 2] and all(len(t.data) == 2 for _, t in tables)
    columns = tables[0][1].columns
    assert columns[:3] == ["step", "prompt_id", "prompt"] and columns[-2:] == ["score/hash_reward", "score/exact_answer_reward"]
    rows = [dict(zip(t.columns, row)) for _, t in tables for row in t.data]
    assert [(r["completion"], r["reward"], r["score/exact_answer_reward"]) for r in rows] == \
        [(w["completion"], w["reward"], w["scores"]["exact_answer_reward"]) for w in written]


def test_sleep_mode_frees_the_rollout_cache_for_the_update_and_trains_alike(tiny_model_dir):
    """--enable-sleep-mode (TRL's vllm_enable_sleep_mode): the engine sleeps through each update (its K/V cache
    freed for the update's activations) and the run is the run without it, step for step."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    args = ["--model", str(tiny_model_dir), "--reward", "tests.reward_fns:hash_reward", "--prompts-per-step", "2",
            "--num-generations", "4", "--max-completion-length", "16", "--eval-steps", "0", "--learning-rate", "1e-3"]
    plain, sleepy = build_trainer(parse_args(args)), build_trainer(parse_args([*args, "--enable-sleep-mode"]))
    sleeps = []
    update = sleepy.update

    def recorded(*a, **kw):
        sleeps.append(sleepy.engine.is_sleeping)
        return update(*a, **kw)

    sleepy.update = recorded
    for _ in range(2):
        a, b = plain.step(), sleepy.step()
        for key in ("reward_mean", "rollout_generated_tokens", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
        assert sleepy.engine.is_sleeping and not plain.engine.is_sleeping
    assert sleeps == [True, True]  # asleep through each update


def test_pass_at_k_is_the_unbiased_estimator():
    """1 - C(n-c, k) / C(n, k): the chance that k answers drawn from the n hold a right one, checked by counting
    every k-subset; pass@n is 'any right', pass@1 the mean."""
    import itertools

    from rpo_engine.eval import pass_at_k

    for n, c, k in ((8, 0, 2), (8, 3, 1), (8, 3, 4), (6, 5, 2), (6, 6, 3), (5, 2, 5), (7, 1, 3)):
        answers = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(answers, k))
        assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets)), (n, c, k)
    assert pass_at_k(8, 3, 1) == pytest.approx(3 / 8) and pass_at_k(8, 1, 8) == 1.0 and pass_at_k(8, 0, 8) == 0.0


def test_sampled_eval_takes_the_eval_options_and_seeds_by_step_and_row(tiny_model_dir, monkeypatch):
    """The sampled eval's requests: --eval-temperature/-top-p/-top-k and K answers (not the training's sampling
    options), seeded by (run seed, step, row): the same eval at the same step (a resume's), fresh draws at another
    step, a seed a row. The evals decode without --repetition-penalty (README), as without the temperature."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    common = ["--model", str(tiny_model_dir), "--eval-size", "3", "--max-completion-length", "4", "--temperature",
              "0.9", "--top-p", "0.95", "--top-k", "30", "--repetition-penalty", "1.3", "--no-progress"]
    for flags in (["--eval-temperature", "0.6", "--eval-top-p", "0.8", "--eval-top-k", "7", "--num-generations-eval", "2"],
                  []):
        trainer = build_trainer(parse_args([*common, *flags]))
        calls, generate = [], trainer.engine.generate

        def recorded(prompts, params, progress=False):
            calls.append(params if isinstance(params, list) else [params] * len(prompts))
            return generate(prompts, params, progress=progress)

        monkeypatch.setattr(trainer.engine, "generate", recorded)
        for step in (0, 5, 0):
            trainer.step_num = step
            trainer.evaluate_metrics()
        sampling = {(p.n, p.temperature, p.top_p, p.top_k, p.repetition_penalty) for c in calls for p in c}
        if flags:
            assert sampling == {(2, 0.6, 0.8, 7, 1.0)}
            seeds = [[p.seed for p in c] for c in calls]
            assert seeds[0] == seeds[2] and len(set(seeds[0])) == 3 and not set(seeds[0]) & set(seeds[1]), seeds
        else:
            assert sampling == {(1, 0.0, 1.0, 0, 1.0)}


@pytest.mark.parametrize("source", ["torch", "python", "numpy"])
def test_a_run_seeds_the_global_rngs_it_checkpoints(tiny_model_dir, source):
    """torch's, Python's and numpy's global generators are a run's state (checkpointed, so a resume draws on as the
    uninterrupted run did), read by a stochastic reward: the run seeds them from --seed, as TRL's set_seed does, so
    the same command run twice trains alike. torch's was left as the process found it (torch seeds it from the OS
    at import), so two runs of one command gave other rewards and weights; Python's and numpy's were neither
    seeded nor checkpointed."""
    import random

    import numpy

    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    args = ["--model", str(tiny_model_dir), "--reward", f"tests.reward_fns:{source}_coin_reward", "--prompts-per-step",
            "2", "--num-generations", "4", "--max-completion-length", "8", "--eval-steps", "0", "--learning-rate",
            "1e-3", "--no-progress"]
    runs = []
    for process_seed in (1, 2):  # what two fresh processes find
        torch.manual_seed(process_seed)
        random.seed(process_seed)
        numpy.random.seed(process_seed)
        trainer = build_trainer(parse_args(args))
        steps = [trainer.step() for _ in range(2)]
        runs.append((steps, [p.detach().clone() for p in trainer.model.parameters()]))
    for a, b in zip(runs[0][0], runs[1][0]):
        for key in ("reward_mean", "rollout_generated_tokens", "loss", "grad_norm"):
            assert a[key] == b[key], key
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    # a checkpoint's state (through torch.load's weights_only) puts them back where they were
    buffer = io.BytesIO()
    torch.save(trainer.state_dict(), buffer)
    weights = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    expected = trainer.step()
    torch.manual_seed(7)  # a resuming process's
    random.seed(7)
    numpy.random.seed(7)
    trainer.model.load_state_dict(weights)
    trainer.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    again = trainer.step()
    for key in ("reward_mean", "rollout_generated_tokens", "loss"):
        assert again[key] == expected[key], key


@pytest.mark.parametrize("source", ["torch", "python", "numpy"])
@pytest.mark.parametrize("eval_flags", [[], ["--eval-temperature", "1", "--num-generations-eval", "2"]])
def test_evaluating_leaves_the_training_rng_alone(tiny_model_dir, eval_flags, source):
    """An eval between steps must not move the RNGs the training draws from: torch's, Python's and numpy's global
    generators (a run's state, in its checkpoints) read by a stochastic reward. A greedy eval's requests drew their
    seeds from torch's, and any eval's reward calls draw from them too; so --eval-steps changed the training's
    rewards, hence its updates."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer
    from rpo_engine.trainer import global_rng_states

    args = ["--model", str(tiny_model_dir), "--reward", f"tests.reward_fns:{source}_coin_reward", "--prompts-per-step",
            "2", "--num-generations", "4", "--max-completion-length", "8", "--eval-size", "3", "--learning-rate",
            "1e-3", "--no-progress", *eval_flags]
    runs = []
    for evaluating in (False, True):
        trainer = build_trainer(parse_args(args))
        torch.manual_seed(0)
        steps = []
        for _ in range(2):
            if evaluating:
                state = global_rng_states()
                trainer.evaluate_metrics()
                assert torch.equal(torch.get_rng_state(), state["torch_rng"])
                assert global_rng_states()["python_rng"] == state["python_rng"]
                assert torch.equal(global_rng_states()["numpy_rng"][1], state["numpy_rng"][1])
            steps.append(trainer.step())
        runs.append((steps, [p.detach().clone() for p in trainer.model.parameters()]))
    (plain, plain_weights), (evaluated, evaluated_weights) = runs
    for a, b in zip(plain, evaluated):
        for key in ("reward_mean", "rollout_generated_tokens", "loss", "grad_norm"):
            assert a[key] == b[key], key
    for a, b in zip(plain_weights, evaluated_weights):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_only_the_main_rank_says_which_rows_filter_overlong_prompts_dropped(tmp_path, tiny_model_dir, capsys):
    from rpo_engine.config import parse_args
    from rpo_engine.distributed import Dist
    from rpo_engine.train import build_trainer

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": "1"}) + "\n" for p in ("1+0=", "1+" * 60 + "0=", "0+1=")))
    flags = ["--model", str(tiny_model_dir), "--dataset", str(data), "--eval-dataset", str(data), "--max-prompt-length",
             "40", "--filter-overlong-prompts", "--no-progress"]
    for rank, lines in ((1, 0), (0, 2)):  # the training and the eval set, each said once by rank 0
        trainer = build_trainer(parse_args(flags), dist=Dist(rank=rank, world_size=2))
        assert len(trainer.train_rows) == len(trainer.eval_rows) == 2
        assert capsys.readouterr().err.count("--filter-overlong-prompts dropped 1 of its 3 rows") == lines, rank


def test_eval_cli_bad_engine_options_are_one_line(monkeypatch):
    import rpo_engine
    from rpo_engine.errors import UserError
    from rpo_engine.eval import main

    monkeypatch.setattr(rpo_engine, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    for flags, message in ((["--max-num-seqs", "0"], "--max-num-seqs must be >= 1, got 0"),
                           (["--gpu-memory-utilization", "nan"], "--gpu-memory-utilization must be in (0, 1], got nan")):
        with pytest.raises(UserError, match=f"^{re.escape(message)}"):
            main(["--temperature", "1", "--max-completion-length", "2", "--no-progress", *flags])


def test_eval_cli_max_num_seqs_batches_the_samples_without_changing_them(tmp_path, tiny_model_dir, monkeypatch):
    """eval's --max-num-seqs 2 decodes 4 rows x 3 samples two at a time (a row's third sample waits), --enforce-eager
    asks for no graphs: the same samples as the defaults (each row's own seed)."""
    import rpo_engine.rollout
    from rpo_engine.eval import main

    made = []

    class Recorded(rpo_engine.rollout.RolloutEngine):
        def __init__(self, model, **kwargs):
            made.append(kwargs)
            super().__init__(model, **kwargs)

    monkeypatch.setattr(rpo_engine.rollout, "RolloutEngine", Recorded)
    for name, flags in (("default", []), ("few", ["--max-num-seqs", "2", "--enforce-eager"])):
        assert main(["--model", str(tiny_model_dir), "--num-samples", "3", "--temperature", "1", "--eval-size", "4",
                     "--max-completion-length", "8", "--no-progress", "--output", str(tmp_path / name), *flags]) == 0
    assert [(k["max_num_seqs"], k["use_cuda_graphs"], k["gpu_memory_utilization"]) for k in made] == [
        (256, None, 0.9), (2, False, 0.9)]
    assert (tmp_path / "default").read_text() == (tmp_path / "few").read_text()


def test_max_num_seqs_changes_how_the_rollout_is_batched_not_what_it_samples(tmp_path, tiny_model_dir):
    """--max-num-seqs 3 decodes a step's 3 x 4 samples three at a time (a prompt's fourth sample a prefill of its
    own, its prompt's full blocks from the prefix cache): each request's own seeded generator draws the same
    tokens, so the run's steps are the same."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    runs = []
    for flags in ([], ["--max-num-seqs", "3", "--enforce-eager"]):
        trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--reward", "tests.reward_fns:hash_reward",
                                            "--train-size", "3", "--steps", "2", "--eval-steps", "0", "--no-progress",
                                            *map(str, SMALL), *flags]))
        assert trainer.engine.max_num_seqs == (3 if flags else 256)
        runs.append([trainer.step() for _ in range(2)])
    for a, b in zip(*runs):
        for key in ("reward_mean", "rollout_generated_tokens", "loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key


def test_a_second_run_on_an_output_another_run_is_writing_is_refused(tmp_path, tiny_model_dir):
    """Two runs writing one --output at once (a requeued job started while the first still runs) truncated and
    interleaved each other's metrics.jsonl, set each other's checkpoints aside, and both exited 0. The running
    one holds a lock on the directory; the second is a one-line error and changes nothing."""
    import fcntl

    out, starting = tmp_path / "run", tmp_path / "starting"
    common = ["--model", tiny_model_dir, "--eval-steps", 0, "--train-size", 3, *SMALL]
    run_train(*common, "--steps", 1, "--output", out)
    starting.mkdir()  # a run in its step-0 eval: a plain rerun would take it for one stopped there and start again
    (starting / "metrics.jsonl").write_text('{"step": 0, "eval_accuracy": 0.5}\n')
    for directory, extra in ((out, ["--resume", "--steps", 2]), (starting, ["--steps", 1])):
        files = lambda: {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*")  # noqa: E731
                         if p.is_file() and p.name != ".rpo_engine.lock"}
        before = files()
        with open(directory / ".rpo_engine.lock", "a") as held:  # as the first run holds it while it trains
            fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            proc = run_train(*common, *extra, "--output", directory, check=False)
            assert_user_error(proc, f"{directory}: another run is writing it")
            assert files() == before
    run_train(*common, "--resume", "--steps", 2, "--output", out)  # the lock goes with the process that held it
    assert [m["step"] for m in read_metrics(out)] == [1, 2]


def test_a_run_another_run_wrote_to_while_it_loaded_is_refused(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The lock is taken once the model has loaded (minutes), after the run chose its checkpoint: a run holding the
    lock meanwhile and ending (a requeued job's first run, stopping with a checkpoint at the scheduler's signal)
    wrote a later checkpoint and final/ that the stale choice then set aside, cutting metrics.jsonl back to its
    step and training again. Refused with one line instead, changing nothing."""
    from rpo_engine import train
    from rpo_engine.errors import run_cli

    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--eval-steps", "0", "--train-size", "3", "--output", str(out),
              "--no-progress", "--save-steps", "1", *map(str, SMALL)]
    assert run_cli(train.main, [*common, "--steps", "1"]) == 0
    shutil.rmtree(out / "final")  # a run at step 1 that goes on
    real, other = train.build_trainer, []

    def other_run_ends_meanwhile(*args, **kwargs):
        trainer = real(*args, **kwargs)
        if not other:
            other.append(None)  # the other run's own load does not start a third
            other[0] = run_cli(train.main, [*common, "--steps", "2", "--resume"])
        return trainer

    monkeypatch.setattr(train, "build_trainer", other_run_ends_meanwhile)
    capsys.readouterr()
    code = run_cli(train.main, [*common, "--steps", "2", "--resume"])
    assert other == [0]
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: {out}: another run wrote it while this one loaded"), err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert (out / "final").is_dir() and [m["step"] for m in read_metrics(out)] == [1, 2]


def test_a_save_the_disk_refuses_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, tiny_model_dir):
    """A full disk (here the file-size limit, which fails a write as ENOSPC does, with EFBIG) while a checkpoint or
    final/ is written: a line naming the directory and the system's reason, not torch's "unexpected pos 51136 vs
    51024" traceback; no half-written save left taking the space, the earlier checkpoint as it was."""
    import resource
    import signal

    def limited(size):
        def preexec():
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing
            resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        return preexec

    out = tmp_path / "run"
    common = ["--model", tiny_model_dir, "--eval-steps", 0, "--train-size", 3, "--output", out, *SMALL]
    run_train(*common, "--steps", 1)
    step1 = {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()}
    shutil.rmtree(out / "final")
    for steps, size, written in ((2, 150_000, "checkpoints/step-2"), (1, 50_000, "final")):
        proc = subprocess.run([sys.executable, "-m", "rpo_engine.train", "--no-progress", *map(str, common), "--steps",
                               str(steps), "--resume"], capture_output=True, text=True, timeout=600, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=limited(size))
        assert_user_error(proc, f"{out / written}: ", "File too large")
        assert {p.relative_to(out): p.read_bytes() for p in (out / "checkpoints").rglob("*") if p.is_file()} == step1
        assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoints"]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]


def test_a_log_or_plot_write_the_disk_refuses_is_one_line_and_keeps_the_good_file(tmp_path, tiny_model_dir,
                                                                                 monkeypatch, capsys):
    """A full disk while the run writes metrics.jsonl or curves.png: a line naming the file and the system's reason,
    not a traceback; curves.png is replaced whole, so a failed redraw leaves the one before."""
    import errno

    import matplotlib.figure

    from rpo_engine import train
    from rpo_engine.errors import run_cli

    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--eval-steps", "0", "--train-size", "3", "--output", str(out),
              "--no-progress", *map(str, SMALL)]
    assert run_cli(train.main, [*common, "--steps", "1"]) == 0
    plot = (out / "curves.png").read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def half_written(fig, path, **kwargs):
        Path(path).write_bytes(b"\x89PNG half")
        full()

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", half_written)
    capsys.readouterr()
    assert run_cli(train.main, [*common, "--steps", "2", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out / 'curves.png'}: could not be written (No space left on device)", err
    assert (out / "curves.png").read_bytes() == plot and not list(out.glob(".curves*"))

    real_open = open

    def open_full_log(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if Path(path).name == "metrics.jsonl":
            monkeypatch.setattr(f, "write", full, raising=False)
        return f

    monkeypatch.setattr(train, "open", open_full_log, raising=False)
    assert run_cli(train.main, [*common, "--steps", "3", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out / 'metrics.jsonl'}: could not be written (No space left on device)", err

    # config.json, the record --config DIR/config.json --resume reads, is replaced whole too
    monkeypatch.undo()
    record = (out / "config.json").read_text()
    real_write_text = Path.write_text

    def half_written_record(path, text, *args, **kwargs):
        if path.parent == out and "config.json" in path.name:  # the record, or the name it is written at first
            real_write_text(path, text[:20], *args, **kwargs)
            full()
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", half_written_record)
    assert run_cli(train.main, [*common, "--steps", "4", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {out / 'config.json'}: could not be written (No space left on device)", err
    assert (out / "config.json").read_text() == record and not list(out.glob(".config*"))


def test_eval_output_the_disk_refuses_leaves_no_partial_file(tmp_path, tiny_model_dir):
    """A full disk (here the file-size limit, which fails a write as ENOSPC does) while eval writes --output: one line
    naming it, and no half-written file left, which a rerun would refuse as "already exists"."""
    import resource
    import signal

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "Q: 1+1\\nA:", "answer": "2"}\n{"prompt": "Q: 2+2\\nA:", "answer": "4"}\n')
    preds = tmp_path / "preds.jsonl"
    proc = subprocess.run([sys.executable, "-m", "rpo_engine.eval", "--model", str(tiny_model_dir), "--dataset",
                           str(data), "--max-completion-length", "8", "--no-progress", "--output", str(preds)],
                          capture_output=True, text=True, cwd=REPO, preexec_fn=limited,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_user_error(proc, f"{preds}: cannot write (File too large)")
    assert not preds.exists()


def test_a_named_file_the_system_refuses_anywhere_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """No permission (or a full disk, a read-only filesystem) on a file in a place no check foresaw - here the
    checkpoints a resume from an earlier one sets aside - is one line naming it, exit 2; an OSError that names no
    file, or that is not such a refusal, stays a traceback (it may be a bug)."""
    import errno

    from rpo_engine import train
    from rpo_engine.errors import run_cli

    out = tmp_path / "run"
    common = ["--model", str(tiny_model_dir), "--eval-steps", "0", "--train-size", "3", "--output", str(out),
              "--no-progress", "--save-steps", "1", *map(str, SMALL)]
    assert run_cli(train.main, [*common, "--steps", "2"]) == 0
    real_rename = Path.rename

    def refused(path, target):
        if path.name == "step-2":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_rename(path, target)

    monkeypatch.setattr(Path, "rename", refused)
    capsys.readouterr()
    assert run_cli(train.main, [*common, "--steps", "2", "--resume-from-checkpoint",
                                str(out / "checkpoints" / "step-1")]) == 2
    assert capsys.readouterr().err.strip() == f"error: {out / 'checkpoints' / 'step-2'}: Permission denied"
    assert (out / "checkpoints" / "step-2").is_dir()

    for unnamed in (PermissionError(errno.EACCES, "Permission denied"), FileNotFoundError(errno.ENOENT, "gone", "x")):
        def fails(argv, e=unnamed):
            raise e
        with pytest.raises(OSError):
            run_cli(fails)


def test_only_the_systems_refusals_of_a_write_are_one_line(tmp_path):
    """refusals_named makes the system refusing a write (run_cli's REFUSED: a full disk, a quota, a size limit, a
    read-only filesystem, no permission) one line naming the path; any other OSError there (a missing file, a
    dropped connection), or a RuntimeError raised while one was handled, passes on as it is: it may be a bug, and
    "could not be written" would name the wrong cause with exit code 2 (run_cli's rule too)."""
    import errno

    from rpo_engine.errors import UserError, refusals_named

    def in_scope(error, context=None):
        with refusals_named(tmp_path / "x"):
            if context is None:
                raise error
            try:
                raise context
            except OSError:
                raise error

    for refusal, context in ((OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), None),
                             (OSError(errno.EFBIG, os.strerror(errno.EFBIG)), None),
                             (RuntimeError("unexpected pos 51136 vs 51024"),  # torch.save's words for a full disk
                              OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))):
        with pytest.raises(UserError, match="could not be written"):
            in_scope(refusal, context)
    for other, context in ((FileNotFoundError(errno.ENOENT, "No such file or directory", "y"), None),
                           (ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), None),
                           (RuntimeError("a bug"), FileNotFoundError(errno.ENOENT, "No such file or directory"))):
        with pytest.raises(type(other)):
            in_scope(other, context)


def test_a_run_that_raises_in_process_leaves_no_reward_worker_log_file_or_writer_open(tmp_path, tiny_model_dir,
                                                                                       monkeypatch):
    """train.main called in a process that goes on (a notebook, a sweep, the test suite) and failing mid-run: its
    reward workers (each holding torch's memory), its open metrics.jsonl and completions.jsonl and its TensorBoard
    writer (a thread) outlived it, held by the error's traceback until a garbage collection, not closed as at a
    run's normal end."""
    from rpo_engine import reporting, train
    from rpo_engine.rewards.pool import RewardPool
    from tests.helpers import process_ended

    class Writer:
        closed = False

        def add_scalar(self, *args):
            pass

        def close(self):
            self.closed = True

    writers, pids = [], []
    monkeypatch.setattr(reporting, "installed", lambda package: package == "tensorboard")
    monkeypatch.setattr(reporting, "open_tensorboard", lambda output, purge_step: writers.append(Writer()) or writers[-1])
    score = RewardPool.score
    monkeypatch.setattr(RewardPool, "score", lambda pool, *args: (
        scores := score(pool, *args), pids.extend(p.pid for p in pool.processes if p.pid not in pids),
        scores)[0])
    monkeypatch.setenv("RPO_ENGINE_TEST_FAIL_AT", "0:2")
    out = tmp_path / "run"
    args = ["--model", tiny_model_dir, "--output", out, "--no-progress", "--prompts-per-step", 1, "--num-generations",
            2, "--max-completion-length", 4, "--train-size", 1, "--eval-steps", 0, "--steps", 3, "--save-steps", 0,
            "--reward", "tests.reward_fns:hash_reward", "--reward-workers", 2, "--log-completions"]
    gc.disable()  # a collection of the traceback's cycles, whenever one comes, would hide what the run left open
    try:
        with pytest.raises(RuntimeError, match="RPO_ENGINE_TEST_FAIL_AT"):
            train.main(list(map(str, args)))
        assert len(pids) == 2 and all(process_ended(pid, 30) for pid in pids)
        held = []
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(FileNotFoundError):  # listdir's own
                held.append(os.readlink(f"/proc/self/fd/{fd}"))
        assert not [name for name in held if name.startswith(str(out))]
        assert len(writers) == 1 and writers[0].closed
    finally:
        gc.enable()


def test_cache_hit_rate_counts_the_groups_that_grew_from_a_cached_path(tiny_model_dir):
    """cache_hit_rate is the share of prompts whose group grew from a cached path (README): with --rpo-unverified-cut
    full a cached wrong path is regrown whole from the prompt, so that prompt is no hit, though its path is in the
    cache. Recomputed from the step's logged completions: the prompts whose kept part is not empty."""
    from rpo_engine.config import parse_args
    from rpo_engine.train import build_trainer

    trainer = build_trainer(parse_args(["--model", str(tiny_model_dir), "--rpo-unverified-cut", "full", "--train-size", "3",
                                        "--prompts-per-step", "3", "--num-generations", "2",
                                        "--max-completion-length", "16", "--log-completions", "--no-shuffle-dataset"]))
    right, wrong, new = (row["id"] for row in trainer.train_rows)
    trainer.cache.put(right, [5] * 12, 1.0, 0, correct=True)
    trainer.cache.put(wrong, [5] * 12, 0.0, 0, correct=False)
    metrics = trainer.step()
    grew = {r["prompt_id"] for r in trainer.completions if r["kept_tokens"] > 0}
    assert grew == {right}  # the wrong path and the uncached prompt: full-path groups
    assert metrics["cache_hit_rate"] == len(grew) / 3
    assert metrics["cache_verified_rate"] == 1 / 3 and metrics["cold_starts"] == 0


def test_eval_names_a_sampled_single_answer_accuracy_as_sampled(tmp_path, tiny_model_dir, capsys):
    """--temperature T with one sample a row: the accuracy printed is of sampled answers, not greedy ones, and says
    so (as the avg@K line does), matching the rows --output holds."""
    from rpo_engine.eval import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Q: {i}+1\nA:", "answer": str(i + 1)}) + "\n" for i in range(6)))
    args = ["--model", str(tiny_model_dir), "--dataset", str(data), "--max-completion-length", "4", "--no-progress",
            "--reward", "tests.reward_fns:hash_reward"]
    assert main([*args, "--output", str(tmp_path / "greedy.jsonl")]) == 0
    greedy = [json.loads(line)["correct"] for line in (tmp_path / "greedy.jsonl").read_text().splitlines()]
    assert f"accuracy {sum(greedy) / 6:.4f} on 6 rows ({data})\n" in capsys.readouterr().out
    assert main([*args, "--temperature", "0.7", "--output", str(tmp_path / "sampled.jsonl")]) == 0
    sampled = [json.loads(line)["correct"] for line in (tmp_path / "sampled.jsonl").read_text().splitlines()]
    assert f"accuracy {sum(sampled) / 6:.4f} on 6 rows, temperature 0.7 ({data})\n" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["bfloat16", "seed", "eval-dataset"])
def test_the_eval_command_on_a_runs_model_gives_the_runs_greedy_eval_accuracy(tmp_path, tiny_model_dir, case):
    """Two evals, one answer: a run's eval_accuracy at step N (metrics.jsonl) is what `python -m rpo_engine.eval`
    gives on that step's model (checkpoints/step-N/model, and final/ at the last step) with the options README
    names: --eval-size, the run's --eval-dataset as --dataset (else its --seed, which picks the built-in task's
    split), and its --dtype, --max-completion-length, --reward and --stop. A run in bf16 on the CPU, or with
    another --seed, was evaluated otherwise by the eval's defaults (fp32 on the CPU; seed 0's split), which no
    option changed."""
    from rpo_engine.eval import evaluate

    shared = {"max_completion_length": 24, "reward": "tests.reward_fns:hash_reward", "eval_size": 16}
    if case == "eval-dataset":
        data = tmp_path / "eval.jsonl"
        data.write_text("".join(json.dumps({"prompt": f"Q: {i}*{i + 7}\nA:", "answer": str(i * (i + 7))}) + "\n"
                                for i in range(20)))
        run_options = {**shared, "eval_dataset": data, "stop": "9"}
        eval_options = {**shared, "dataset": data, "stop": "9"}
    else:
        run_options = eval_options = {**shared, **({"dtype": "bfloat16"} if case == "bfloat16" else {"seed": 1})}
    flags = [arg for name, value in run_options.items() for arg in (f"--{name.replace('_', '-')}", value)]
    run = tmp_path / "run"
    run_train("--model", tiny_model_dir, "--output", run, "--steps", 2, "--eval-steps", 1, "--save-steps", 1,
              "--train-size", 8, "--prompts-per-step", 3, "--num-generations", 4, "--learning-rate", 1e-2, *flags)
    logged = {m["step"]: m["eval_accuracy"] for m in read_metrics(run)}
    models = {0: tiny_model_dir, 1: run / "checkpoints" / "step-1" / "model", 2: run / "final"}
    evaluated = {step: evaluate(model=model, no_progress=True, **eval_options) for step, model in models.items()}
    assert {step: m["accuracy"] for step, m in evaluated.items()} == logged
    assert all(m["rows"] == 16 for m in evaluated.values())
    assert len(set(logged.values())) > 1  # the steps' models answer apart: the comparison tells them apart
    if case != "eval-dataset":  # without the run's option the eval gives another number
        assert evaluate(model=run / "final", no_progress=True, **shared)["accuracy"] != logged[2]
