"""Smoke runs of the training benchmarks on a tiny random model, so the scripts cannot rot unseen.

The figures themselves are measured by hand (README); these check that the scripts run end to end and
write what the README reads from them.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run_bench(script, *args):
    env = {**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)}  # the user reward function lives in tests/
    proc = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=600,
                          cwd=BENCHMARKS, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def tiny_flags(model_dir):
    return ["--model", model_dir, "--prompts-per-step", "2", "--num-generations", "3", "--max-completion-length",
            "16", "--eval-size", "4", "--train-size", "2", "--reward", "tests.reward_fns:hash_reward"]


def test_bench_train_compares_each_rpo_variant_with_full_path(tmp_path, tiny_model_dir):
    out = tmp_path / "train.json"
    run_bench("bench_train.py", "--seeds", 0, 1, "--steps", 2, "--jobs", 2, "--out", out,
              "--rpo-variants", "--rpo-unverified-cut-fraction 0.5",
              "--extra", *tiny_flags(tiny_model_dir), "--eval-steps", 1)
    record = json.loads(out.read_text())
    assert [(r["algo"], r["variant"]) for r in record["summary"]] == [
        ("grpo", ""), ("grpo", "--rpo-unverified-cut-fraction 0.5")]
    assert len(record["runs"]) == 2 * 3  # per seed: full path, RPO, the variant
    for run in record["runs"]:  # each part of a step is at most the step, so is its median
        assert 0 < run["median_update_time_s"] <= run["median_step_time_s"]
        assert 0 < run["median_rollout_time_s"] <= run["median_step_time_s"]
        assert run["median_decode_steps"] > 0
    starts = [r["initial_eval_accuracy"] for r in sorted(record["runs"], key=lambda r: r["seed"]) if not r["rpo"]]
    for row in record["summary"]:
        assert row["token_ratio"] > 0 and len(row["final_eval_rpo"]) == 2
        assert row["target_eval_accuracy"] == [round(a + 0.05, 6) for a in starts]  # per seed, from its start
    assert out.with_suffix(".png").stat().st_size > 1000


def test_bench_signal_grades_every_answer(tmp_path, tiny_model_dir):
    out = tmp_path / "signal.json"
    flags = " ".join(map(str, tiny_flags(tiny_model_dir)))
    run_bench("bench_signal.py", "--steps", 2, "--out", out, "--grade-eval", 5,
              "--runs", f"--no-rpo {flags}", f"--rpo {flags}")
    full, rpo = json.loads(out.read_text())["runs"]
    # every sampled answer is counted once: 2 steps x 2 prompts x 3 samples
    assert sum(full["counts"].values()) == sum(rpo["counts"].values()) == 2 * 2 * 3
    assert all(k.startswith("full ") for k in full["counts"])
    assert all(k.split()[0] in ("verified", "unverified") for k in rpo["counts"])
    for run in (full, rpo):  # the final model's greedy answers: each wrong one placed in one quarter
        for split, problems in (("greedy_train", 2), ("greedy_eval", 5)):
            graded = run[split]
            assert graded["problems"] == problems
            wrong = sum(graded["wrong_from_quarter"].values())
            assert wrong == round(problems * (1 - graded["accuracy"]))


def test_first_wrong_quarter_places_the_first_departing_line():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from bench_signal import first_wrong_quarter
    finally:
        sys.path.remove(str(BENCHMARKS))
    solution = " a\nb\nc\nd\ne\nf\ng\n#### 8"  # 8 lines, two a quarter; line numbers below count from 0
    assert first_wrong_quarter(" a\nX\nc", solution) == "first"  # line 1
    assert first_wrong_quarter(" a\nb\nX", solution) == "second"  # line 2
    assert first_wrong_quarter(" a\nb\nc\nd\ne\nX", solution) == "third"  # line 5
    assert first_wrong_quarter(" a\nb\nc\nd\ne\nf\ng\n#### 9", solution) == "fourth"  # line 7
    assert first_wrong_quarter(" a\nb\nc", solution) == "second"  # stopped after line 2: line 3 missing


def test_bench_cut_regrows_every_wrong_path_by_each_rule(tmp_path, tiny_model_dir):
    out = tmp_path / "cut.json"
    run_bench("bench_cut.py", "--model", tiny_model_dir, "--seeds", 0, 1, "--prompts", 8, "--num-generations", 2,
              "--max-completion-length", 24, "--reward", "tests.reward_fns:hash_reward", "--out", out)
    record = json.loads(out.read_text())
    assert [r["seed"] for r in record["runs"]] == [0, 1]
    for run in record["runs"]:
        assert run["wrong_paths"] + run["cold_right"] == 8 and run["wrong_paths"] and run["cold_right"]
        for rule in ("uniform", "least-likely"):
            assert 1 <= run[rule]["mean_cut"] <= run["mean_wrong_path_tokens"] and run[rule]["tokens_per_suffix"] > 0
            assert 1 <= run[f"verified {rule}"]["mean_cut"] <= 24 * 0.25  # a verified path's bound


def test_bench_paper_shape_runs_the_trainers_update(tmp_path):
    out = tmp_path / "paper_shape.json"
    run_bench("bench_paper_shape.py", "--cpu", "--prompt-len", 16, "--full-len", 48, "--suffix-len", 8,
              "--repeats", 1, "--out", out)
    record = json.loads(out.read_text())
    full, rpo = record["median"]["full"], record["median"]["rpo"]
    assert full["generated_tokens"] == 8 * 48 and rpo["generated_tokens"] == 8 * 8
    assert 0 < record["reduction"]["generated_tokens"] < 1 and rpo["update_s"] > 0
    assert "rpo_cascade" not in record["median"]  # a GPU run's variant only, unless asked for


def test_bench_paper_shape_cascade_variant(tmp_path):
    out = tmp_path / "paper_shape.json"
    run_bench("bench_paper_shape.py", "--cpu", "--prompt-len", 16, "--full-len", 24, "--suffix-len", 4,
              "--num-generations", 3, "--repeats", 1, "--cascade-variant", "--out", out)
    median = json.loads(out.read_text())["median"]
    assert median["rpo_cascade"]["generated_tokens"] == median["rpo"]["generated_tokens"] == 3 * 4


def test_bench_host_times_decode_steps_beside_a_baseline_checkout(tmp_path):
    out = tmp_path / "host.json"
    repo = BENCHMARKS.parent  # as its own baseline: the script's subprocess path works
    run_bench("bench_host.py", "--cases", "16x256", "--repeats", 1, "--baseline-src", repo, "--out", out)
    record = json.loads(out.read_text())
    assert [r["backend"] for r in record["rows"]] == ["triton", "triton_cascade", "torch"]
    for row in record["rows"]:
        assert (row["num_seqs"], row["context"], row["decode_steps"]) == (16, 256, 127)
        assert row["host_ms_per_decode_step"] > 0 and row["speedup"] > 0
    assert len(record["baseline"]["rows"]) == 3


def test_bench_sampler_compares_with_the_reference(tmp_path):
    out = tmp_path / "sampler.json"
    run_bench("bench_sampler.py", "--rows", 4, "--vocab", 5000, "--repeats", 1, "--out", out)
    record = json.loads(out.read_text())
    assert len(record["results"]) == 2 * 4  # two logit scales x four settings
    assert all(r["same_tokens"] and r["fast_ms"] > 0 and r["reference_ms"] > 0 for r in record["results"])


def test_bench_rewards_scores_in_workers_as_here(tmp_path):
    out = tmp_path / "rewards.json"
    run_bench("bench_rewards.py", "--completions", 24, "--workers", 2, "--repeats", 1, "--out", out)
    record = json.loads(out.read_text())
    assert 0 < record["right"] < 24
    assert [r["workers"] for r in record["results"]] == [0, 2]
    assert all(r["same_scores"] and r["median_s"] > 0 for r in record["results"])


def test_bench_lora_measures_full_and_adapter_training(tmp_path):
    out = tmp_path / "lora.json"
    run_bench("bench_lora.py", "--repeats", 1, "--out", out)
    full, lora = json.loads(out.read_text())["results"]
    assert full["method"] == "full" and lora["method"].startswith("lora")
    assert lora["trained_params"] < full["trained_params"] / 10 and lora["weights_gib"] > full["weights_gib"]
    # AdamW holds two moments per trained parameter: full fine-tuning's state is twice the weights
    assert full["optimizer_gib"] > 1.9 * full["weights_gib"] and lora["optimizer_gib"] < full["optimizer_gib"] / 10
    assert all(r["update_ms"] > 0 and r["tokens_per_s"] > 0 for r in (full, lora)) and lora["merged_tokens_per_s"] > 0


def test_gpu_suite_skeleton_and_its_benchmark_flags(tmp_path):
    """A lent GPU is rare and short: the suite must not fail on a typo. Its skeleton (env.json, suite.json,
    the archive) runs here with no step selected, and every flag it passes a benchmark is one that
    benchmark's --help lists."""
    import re
    import shlex

    script = BENCHMARKS / "gpu_suite.sh"
    env = {**os.environ, "SUITE_SKIP_INSTALL": "1", "SUITE_STEPS": "none", "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=300, cwd=BENCHMARKS.parent,
                          env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    suite = json.loads((tmp_path / "out" / "suite.json").read_text())
    assert suite["steps"] == [] and suite["failed"] == []
    assert json.loads((tmp_path / "out" / "env.json").read_text())["git_commit"]
    assert (tmp_path / "out" / "suite.tar.gz").stat().st_size > 0
    lines = [line.strip() for line in script.read_text().splitlines() if line.strip().startswith("bench ")]
    assert len(lines) >= 8
    for line in lines:
        words = shlex.split(line.split("#")[0])
        bench = next(w for w in words if w.startswith("benchmarks/bench_"))
        flags = [w for w in words[words.index(bench) + 1:] if w.startswith("--")]
        usage = subprocess.run([sys.executable, bench, "--help"], capture_output=True, text=True, timeout=120,
                               cwd=BENCHMARKS.parent, env={**os.environ, "PYTHONPATH": str(BENCHMARKS.parent)})
        assert usage.returncode == 0, (bench, usage.stderr[-2000:])
        listed = set(re.findall(r"--[a-z][a-z0-9-]*", usage.stdout))
        assert set(flags) <= listed, (bench, set(flags) - listed)
