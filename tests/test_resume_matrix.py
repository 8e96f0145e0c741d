"""Resume exactness across option combinations: a run stopped after a checkpoint and resumed with --resume gives
the uninterrupted run's later steps (CPU, same seed). Each case combines several options that carry state from
one step to the next (the experience cache and its RNG, rows drawn across an epoch boundary, the entropy
coefficient, a moving KL reference, bf16 master weights, LoRA adapters, the schedule's position), so that one
piece left out of a checkpoint shows as a difference in the resumed steps.

Compared exactly: on the CPU a resumed run is bit-identical to the uninterrupted one, and a tolerance would let a
lost piece of state whose effect is small (an entropy coefficient one delta off) pass."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
# one thread: tiny tensors, and on a busy 2-core box a second thread makes each run several times slower
ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")

STEPS = 4
COMMON = ["--reward", "tests.reward_fns:hash_reward", "--train-size", 3, "--prompts-per-step", 3, "--num-generations", 4,
          "--max-completion-length", 48, "--learning-rate", 1e-3, "--eval-size", 4, "--eval-steps", 2,
          "--log-completions", "--report-to", "none", "--no-progress", "--device", "cpu", "--steps", STEPS]


def dapo_case_ran_its_features(resumed):
    assert any(m["num_prompts_sampled"] > 2 for m in resumed)  # DAPO resampled in a resumed step
    coefs = [m["entropy_coef"] for m in resumed]
    assert len(set(coefs)) == len(coefs)  # the adaptive coefficient moved each step


def lora_case_ran_its_features(resumed):
    assert resumed[0]["lr"] < resumed[1]["lr"]  # the warmup runs on past the checkpoint
    assert all(m["kl"] > 0 and "eval_pass_at_k" in m for m in resumed)


def bf16_case_ran_its_features(resumed):
    assert all(m["kl"] > 0 for m in resumed)  # against the reference the checkpoint carried (moved every step)


def sapo_case_ran_its_features(resumed):
    assert any(m["off_policy_masked_frac"] > 0 for m in resumed)
    assert all(m["judge/global_step"] == m["step"] - 1 for m in resumed)  # the async judge's log_metric
    assert all(m["cache_hit_rate"] == 1 for m in resumed)  # every prompt continues a path the checkpoint held


# id -> (flags, the step the run is stopped after (a --save-steps multiple), what the case must exercise)
CASES = {
    # DAPO resampling rounds, 2 prompts a step of 3 rows (an epoch ends mid-step, shuffled), the adaptive entropy
    # coefficient, token selection and IS correction, least-likely cuts of paths whose log-probs the cache keeps,
    # epsilon-greedy cache choices (the RNG), deeper cuts of prompts whose G answers were all right (the cache's
    # counts), the penalized and filtered sampler, async scheduling, sleep mode
    "dapo-epochs-adaptive-entropy-least-likely-cuts": (
        ["--algo", "dapo", "--num-generations", 2, "--max-resample-rounds", 2, "--prompts-per-step", 2,
         "--top-entropy-quantile", 0.5, "--use-adaptive-entropy", "--entropy-coef", 0.02, "--entropy-target", 10,
         "--importance-sampling-correction", "--rpo-unverified-cut", "least-likely",
         "--rpo-cache-policy", "epsilon-greedy", "--rpo-saturated-cut-growth", 2, "--repetition-penalty", 1.2,
         "--min-p", 0.05, "--async-scheduling", "--enable-sleep-mode", "--save-steps", 2], 2, dapo_case_ran_its_features),
    # LoRA with merged rollout weights, a KL to the base, two passes over two mini-batches, a warmup that ends
    # after the checkpoint, a sampled eval every step, pooled rewards
    "lora-merged-kl-mini-batches-warmup-sampled-eval": (
        ["--use-peft", "--lora-r", 4, "--lora-merged-rollout", "--beta", 0.05, "--num-iterations", 2,
         "--ppo-mini-batch-size", 2, "--lr-scheduler-type", "linear", "--warmup-steps", 3, "--eval-temperature", 1,
         "--num-generations-eval", 2, "--eval-steps", 1, "--reward-workers", 1, "--save-steps", 2], 2,
        lora_case_ran_its_features),
    # bf16 weights (fp32 masters in the optimizer state), a reference --sync-ref-model moves every step, a JSONL
    # dataset of 4 rows in file order (an epoch ends mid-step), loss on the kept prefix, full regrowth of
    # unverified paths, truncated completions masked, a format bonus, cosine decay with weight decay
    "bf16-moving-reference-dataset-file": (
        ["--dtype", "bfloat16", "--beta", 0.05, "--sync-ref-model", "--ref-model-sync-steps", 1,
         "--dataset", "{data}", "--eval-dataset", "{data}", "--no-shuffle-dataset", "--rpo-loss-on-prefix",
         "--rpo-unverified-cut", "full", "--mask-truncated-completions", "--format-reward-weight", 0.1,
         "--lr-scheduler-type", "cosine", "--weight-decay", 0.1, "--save-steps", 2], 2, bf16_case_ran_its_features),
    # stopped after the first step (the cache holds the first choices and the read-ahead cold paths): three reward
    # functions normalized apart (GDPO), one an async TRL-style judge that logs a metric and a column, SAPO with
    # off-policy masking over two passes, padded rows in small micro-batches, fewer decode slots than samples,
    # top-k/top-p sampling, stop strings
    "first-step-checkpoint-gdpo-sapo-off-policy-mask": (
        ["--reward", "tests.reward_fns:hash_reward,tests.reward_fns:length_reward,tests.reward_fns:async_judge",
         "--reward-weights", "1,0.5,0.5", "--stop", '["3", "a"]',
         "--multi-objective-aggregation", "normalize_then_sum", "--loss-type", "sapo",
         "--off-policy-mask-threshold", 0.001, "--num-iterations", 2, "--no-prefix-sharing",
         "--micro-batch-tokens", 96, "--max-num-seqs", 5, "--top-k", 8, "--top-p", 0.8, "--temperature", 0.9,
         "--save-steps", 1], 1, sapo_case_ran_its_features),
}


def run_train(*args):
    proc = subprocess.run([sys.executable, "-m", "rpo_engine.train", *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=REPO, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_metrics(output):
    return [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]


def stopped_after(run, step, copy):
    """`copy`: `run`'s directory as if killed after its step-`step` checkpoint, while writing a log line one step
    later (as tests/test_train.py's helper of the same name)."""
    shutil.copytree(run / "checkpoints" / f"step-{step}", copy / "checkpoints" / f"step-{step}")
    shutil.copy(run / "config.json", copy / "config.json")
    for name in ("metrics.jsonl", "completions.jsonl"):
        lines = (run / name).read_text().splitlines()
        ran = [line for line in lines if json.loads(line)["step"] <= step + 1]
        torn = [line[:len(line) // 2] for line in lines if json.loads(line)["step"] > step + 1][:1]
        (copy / name).write_text("".join(line + "\n" for line in ran) + "".join(torn))


def final_weights(output):
    adapter = output / "final-adapter" / "adapter_model.safetensors"
    return load_file(adapter if adapter.exists() else output / "final" / "model.safetensors")


@pytest.mark.parametrize("case", CASES)
def test_resumed_run_is_the_uninterrupted_run(case, tmp_path, tiny_model_dir):
    flags, stop, exercised = CASES[case]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} + {b}?", "answer": str(a + b)}) + "\n"
                            for a, b in ((1, 2), (3, 4), (5, 6), (7, 8))))
    flags = [str(data) if f == "{data}" else f for f in flags]
    common = ["--model", tiny_model_dir, *COMMON, *flags]
    if "--dataset" in flags:  # --train-size sizes the built-in task only
        common = common[:common.index("--train-size")] + common[common.index("--train-size") + 2:]
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(*common, "--output", full)
    stopped_after(full, stop, part)
    proc = run_train(*common, "--output", part, "--resume")
    assert f"at step {stop}" in proc.stdout and "changed options" not in proc.stderr

    a, b = read_metrics(full), read_metrics(part)
    assert [m["step"] for m in a] == [m["step"] for m in b] == list(range(STEPS + 1))
    for x, y in zip(a[stop + 1:], b[stop + 1:]):
        differ = {k: (x.get(k), y.get(k)) for k in x.keys() | y.keys() if not k.endswith("_time_s") and x.get(k) != y.get(k)}
        assert not differ, f"step {x['step']}, uninterrupted vs resumed: {differ}"
    # the very same samples, rewards and advantages
    assert (full / "completions.jsonl").read_text() == (part / "completions.jsonl").read_text()
    ends = final_weights(full), final_weights(part)
    assert ends[0].keys() == ends[1].keys() and all(torch.equal(ends[0][k], ends[1][k]) for k in ends[0])
    exercised(b[stop + 1:])
