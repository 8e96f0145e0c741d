"""Smoke runs of the training benchmarks on a tiny random model, so the scripts cannot rot unseen.

The figures themselves are measured by hand (README); these check that the scripts run end to end and
write what the README reads from them, and that bad input is a one-line error, not a traceback.
"""
import importlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_env(**extra):
    """The environment a user runs a benchmark in: not the tests' TRITON_INTERPRET=1 (conftest.py), which a
    script must not need unless it says so; PYTHONPATH for the user reward function in tests/."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return {**env, "PYTHONPATH": str(BENCHMARKS.parent), **extra}


def bench_module(name):
    """A module of benchmarks/, imported as the scripts import each other (benchmarks/ on sys.path)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


def run_bench(script, *args, env=None, code=0):
    proc = subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True, timeout=600,
                          cwd=BENCHMARKS, env=env or bench_env())
    assert proc.returncode == code, proc.stderr[-3000:]
    return proc.stdout if code == 0 else proc.stderr


def assert_saved_as_it_went(stdout, out, cases):
    """The run wrote `out`'s partial file after each of its `cases` cases (what a time limit would leave), then
    the complete file, which removed it."""
    partial = bench_module("common").partial_path(out)
    writes = [line.split()[1] for line in stdout.splitlines() if line.startswith("wrote ")]
    assert writes == [str(partial)] * cases + [str(out)], writes
    assert not partial.exists()


def assert_one_line_error(stderr, *words):
    assert "Traceback" not in stderr and stderr.startswith("error: ") and stderr.count("\n") == 1, stderr[-3000:]
    assert all(w in stderr for w in words), stderr


def tiny_flags(model_dir):
    return ["--model", model_dir, "--prompts-per-step", "2", "--num-generations", "3", "--max-completion-length",
            "16", "--eval-size", "4", "--train-size", "2", "--reward", "tests.reward_fns:hash_reward"]


def test_bench_train_compares_each_rpo_variant_with_full_path(tmp_path, tiny_model_dir):
    out = tmp_path / "train.json"
    stdout = run_bench("bench_train.py", "--seeds", 0, 1, "--steps", 2, "--jobs", 2, "--out", out,
                       "--rpo-variants", "--rpo-unverified-cut-fraction 0.5",
                       "--extra", *tiny_flags(tiny_model_dir), "--eval-steps", 1)
    assert_saved_as_it_went(stdout, out, cases=6)
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


def _inherited_parent_state():
    return hasattr(torch, "_bench_train_parent_state")


def test_bench_train_workers_start_fresh_not_forked(monkeypatch):
    """bench_train's parent has asked CUDA whether it is there (torch.cuda.is_available): a forked worker inherits
    that state and cannot initialise CUDA ("Cannot re-initialize CUDA in forked subprocess"), so every training on
    a GPU failed. Its workers must start fresh; here, a mark set in the parent's torch stands for that state."""
    monkeypatch.setattr(torch, "_bench_train_parent_state", True, raising=False)
    with bench_module("bench_train").training_pool(1) as pool:
        assert pool.submit(_inherited_parent_state).result(timeout=300) is False


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
    first_wrong_quarter = bench_module("bench_signal").first_wrong_quarter
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
    stdout = run_bench("bench_paper_shape.py", "--cpu", "--prompt-len", 16, "--full-len", 48, "--suffix-len", 8,
                       "--repeats", 1, "--out", out)
    assert_saved_as_it_went(stdout, out, cases=2)  # a full-path step, an RPO step
    record = json.loads(out.read_text())
    assert record["settings"]["optimizer"] == "AdamW"  # the trainer's for fp32 weights (bf16: MasterWeightAdamW)
    full, rpo = record["median"]["full"], record["median"]["rpo"]
    assert full["generated_tokens"] == 8 * 48 and rpo["generated_tokens"] == 8 * 8
    assert 0 < record["reduction"]["generated_tokens"] < 1 and rpo["update_s"] > 0
    assert "rpo_cascade" not in record["median"]  # a GPU run's variant only, unless asked for


def test_bench_paper_shape_cascade_variant(tmp_path):
    out = tmp_path / "paper_shape.json"
    flags = ["--cpu", "--prompt-len", 16, "--full-len", 24, "--suffix-len", 4, "--num-generations", 3, "--repeats", 1,
             "--cascade-variant", "--out", out]
    # on the CPU its Triton kernels run through the interpreter, which must be asked for before the run
    assert_one_line_error(run_bench("bench_paper_shape.py", *flags, code=2), "TRITON_INTERPRET=1")
    run_bench("bench_paper_shape.py", *flags, env=bench_env(TRITON_INTERPRET="1"))
    median = json.loads(out.read_text())["median"]
    assert median["rpo_cascade"]["generated_tokens"] == median["rpo"]["generated_tokens"] == 3 * 4


def test_bench_host_times_decode_steps_beside_a_baseline_checkout(tmp_path):
    out = tmp_path / "host.json"
    repo = BENCHMARKS.parent  # as its own baseline: the script's subprocess path works
    run_bench("bench_host.py", "--cases", "16x256", "--repeats", 1, "--baseline-src", repo, "--out", out)
    record = json.loads(out.read_text())
    assert [r["backend"] for r in record["rows"]] == ["triton", "triton_cascade", "torch", "torch_stop",
                                                      "torch_stop_text"]  # the last two: with stop strings
    for row in record["rows"]:
        assert (row["num_seqs"], row["context"], row["decode_steps"]) == (16, 256, 127)
        assert row["host_ms_per_decode_step"] > 0 and row["speedup"] > 0
    assert len(record["baseline"]["rows"]) == 5


def test_bench_kernels_measures_each_method_against_the_naive_path(tmp_path):
    """gpu_suite.sh's kernels step, at a small shape: each method in its own process, every row saved as it went."""
    out = tmp_path / "kernels.json"
    stdout = run_bench("bench_kernels.py", "--shape", 64, 32, 500, "--repeats", 1, "--out", out)
    assert_saved_as_it_went(stdout, out, cases=4)
    record = json.loads(out.read_text())
    assert record["machine"] and record["git_commit"] and record["date"]
    assert [r["method"] for r in record["results"]] == ["naive", "torch", "naive+entropy", "torch+entropy"]
    assert all((r["tokens"], r["hidden"], r["vocab"], r["dtype"]) == (64, 32, 500, "float32") for r in record["results"])
    assert all(r["ms"] > 0 for r in record["results"])


def test_bench_cache_measures_each_case_here_and_on_a_baseline_checkout(tmp_path):
    """bench_cache.py at a small case, with --baseline-src naming a copy of this checkout elsewhere: each side's row
    names the rpo_engine it ran (a baseline run by mistake on the current code would show), and every figure is
    measured."""
    import shutil

    out, baseline = tmp_path / "cache.json", tmp_path / "baseline"
    shutil.copytree(BENCHMARKS.parent / "rpo_engine", baseline / "rpo_engine",
                    ignore=shutil.ignore_patterns("__pycache__"))
    run_bench("bench_cache.py", "--cases", "64x32", "--baseline-src", baseline, "--out", out)
    record = json.loads(out.read_text())
    assert record["machine"] and record["git_commit"] and record["date"]
    for rows, src in ((record["rows"], BENCHMARKS.parent), (record["baseline"]["rows"], baseline)):
        assert [(r["prompts"], r["tokens"]) for r in rows] == [(64, 32)]
        assert rows[0]["rpo_engine"] == str(src / "rpo_engine")
        assert all(rows[0][key] > 0 for key in ("rss_mib", "step_ms", "save_s", "file_mib", "load_s"))
    stderr = run_bench("bench_cache.py", "--baseline-src", tmp_path, "--out", out, code=2)
    assert f"--baseline-src {tmp_path}: not a checkout of this repository" in stderr


def test_bench_kernels_cpu_memory_baseline_is_what_is_resident():
    """On the CPU a method's extra memory is its peak RSS minus the peak before the call: making the inputs must not
    raise that peak above what stays resident (an unscaled weight draw, freed, did by 31 MiB at the CPU shape: every
    method's extra memory read 31 MiB low, the fused path's ratio to the naive one 0.053x where it was ~0.063x)."""
    # the peak is reset just before the inputs are made (Linux's clear_refs 5), so only they move it: measured from the
    # process's start, a busy box evicting torch's mapped library pages after the imports read 277 MiB here
    code = """if True:
        import sys, torch
        sys.path.insert(0, "benchmarks")
        from bench_kernels import cpu_peak_bytes, make_inputs, reset_cpu_peak
        reset_cpu_peak()
        inputs = make_inputs(1024, 256, 32000, torch.float32, "cpu")
        resident = int(open("/proc/self/statm").read().split()[1]) * 4096
        print((cpu_peak_bytes() - resident) / 2**20)
    """
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=BENCHMARKS.parent, env=bench_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert float(proc.stdout.split()[-1]) < 8  # MiB above the resident set: not the weight's 31 MiB draw


def test_bench_shared_prefix_compares_both_layouts_on_each_load(tmp_path):
    """gpu_suite.sh's shared_prefix step, on small loads: padded and shared side by side, with their ratios."""
    out = tmp_path / "shared_prefix.json"
    stdout = run_bench("bench_shared_prefix.py", "--loads", "48:2", "64:3", "--repeats", 1, "--out", out)
    assert_saved_as_it_went(stdout, out, cases=2)
    record = json.loads(out.read_text())
    assert record["machine"] and record["git_commit"] and record["date"]
    rows = record["results"]
    assert [(r["path"], r["prefix"], r["G"]) for r in rows] == [
        ("padded", 48, 2), ("shared", 48, 2), ("padded", 64, 3), ("shared", 64, 3)]
    for padded, shared in (rows[:2], rows[2:]):  # the shared layout runs the prefix once, not once per sample
        assert shared["layout_tokens"] < padded["layout_tokens"] and shared["saved_mib"] < padded["saved_mib"]
        assert shared["speedup"] > 0 and shared["memory_reduction"] > 1


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
    assert_saved_as_it_went(run_bench("bench_lora.py", "--repeats", 1, "--out", out), out, cases=2)
    full, lora = json.loads(out.read_text())["results"]
    assert full["method"] == "full" and lora["method"].startswith("lora")
    # the same work for both: one draw of the update's group and the decode's prompts
    assert full["update_suffix_tokens"] == lora["update_suffix_tokens"] and full["new_tokens"] == lora["new_tokens"]
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


SCRIPTS = sorted(p.name for p in BENCHMARKS.glob("bench_*.py"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_checks_out_before_it_runs(tmp_path, script):
    """--out naming a directory is a one-line error at once, not a failure after the whole run."""
    assert_one_line_error(run_bench(script, "--out", tmp_path, code=2), "--out", str(tmp_path), "directory")


@pytest.mark.parametrize("script, args, words", [
    ("bench_host.py", ["--bogus"], ["--bogus", "--help"]),
    ("bench_host.py", ["--cases", "foo"], ["--cases", "foo"]),
    ("bench_cut.py", ["--model", "MISSING"], ["MISSING"]),
    ("bench_cut.py", ["--reward", "bogus"], ["--reward", "bogus"]),
    ("bench_signal.py", ["--runs", " --bogus"], ["--runs", "--bogus"]),
    ("bench_signal.py", ["--runs", " --model MISSING"], ["--runs", "MISSING"]),
    ("bench_sampler.py", ["--repeats", "0"], ["--repeats"]),
    ("bench_kernels.py", ["--shape", "64", "0", "500"], ["--shape"]),
    ("bench_shared_prefix.py", ["--loads", "64x2"], ["--loads", "64x2"]),
    ("bench_rewards.py", ["--repeats", "0"], ["--repeats"]),
    ("bench_rewards.py", ["--completions", "0"], ["--completions"]),
    ("bench_trl.py", ["--prompts-per-step", "0"], ["--prompts-per-step"]),
    ("bench_trl_update.py", ["--loads", "64:8"], ["--loads", "64:8", "prompt"]),
    ("bench_paper_shape.py", ["--cpu", "--suffix-len", "16", "--full-len", "8"], ["--suffix-len", "--full-len"]),
    # every run's train flags are checked before the first training starts
    ("bench_train.py", ["--rpo-variants", " --bogus"], ["--rpo-variants", "--bogus"]),
    ("bench_train.py", ["--extra", "--bogus-flag"], ["--extra", "--bogus-flag"]),
])
def test_bad_input_is_one_line_and_exit_code_2(tmp_path, script, args, words):
    # MISSING: a path that surely does not exist; --out: a run that wrongly went ahead writes nothing committed
    missing = str(tmp_path / "missing")
    args, words = [a.replace("MISSING", missing) for a in args], [w.replace("MISSING", missing) for w in words]
    assert_one_line_error(run_bench(script, *args, "--out", tmp_path / "out.json", code=2), *words)


def test_bench_trl_runs_our_systems_without_trl(tmp_path, tiny_model_dir):
    """TRL is needed by its own system only: with it missing, --systems trl says what to install, and full and
    rpo still run."""
    fake = tmp_path / "no_trl" / "trl"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'trl'\", name='trl')\n")
    env = bench_env(PYTHONPATH=f"{fake.parent}{os.pathsep}{BENCHMARKS.parent}")
    assert_one_line_error(run_bench("bench_trl.py", "--systems", "trl", "full", env=env, code=2), "trl", ".[bench]")
    out = tmp_path / "trl.json"
    stdout = run_bench("bench_trl.py", "--model", tiny_model_dir, "--systems", "full", "rpo", "--steps", 2,
                       "--prompts-per-step", 2, "--num-generations", 2, "--max-completion-length", 16, "--eval-size", 4,
                       "--passes", 1, "--out", out, env=env)
    assert_saved_as_it_went(stdout, out, cases=2)
    record = json.loads(out.read_text())
    assert [r["system"] for r in record["results"]] == ["full", "rpo"] and record["trl"] is None
    # one pass: the file says so, and in what order the systems ran (drift between them is not averaged out)
    assert record["run_order"] == [["full", "rpo"]] and record["timing"].startswith("one pass")


def test_bench_trl_runs_trl_with_and_without_our_rollout(tmp_path, tiny_model_dir):
    """The TRL-hosted systems: TRL's own trainer, generating with transformers or through TRLRollout or
    RPORollout, and SharedPrefixGRPOTrainer with RPORollout, side by side in one run, with the ratios to TRL."""
    pytest.importorskip("trl")
    out = tmp_path / "trl.json"
    systems = ["trl", "trl_engine", "trl_rpo", "trl_rpo_shared"]
    stdout = run_bench("bench_trl.py", "--model", tiny_model_dir, "--systems", *systems, "--steps", 3, "--prompts-per-step", 2, "--num-generations", 2, "--max-completion-length", 8,
                       "--eval-size", 4, "--passes", 1, "--out", out)
    assert_saved_as_it_went(stdout, out, cases=4)
    record = json.loads(out.read_text())
    assert record["errors"] == {} and [r["system"] for r in record["results"]] == systems
    by = {r["system"]: r for r in record["results"]}
    assert all(r["median_generated_tokens"] > 0 for r in record["results"])
    # RPO's own count: after the cold starts, suffixes only, fewer than the full completions (budget 8 each)
    later = {name: sum(step["generated_tokens"] for step in by[name]["passes"][0][1:]) for name in systems}
    assert later["trl_rpo"] < later["trl"] and later["trl_rpo_shared"] < later["trl"]
    assert sorted(record["ratios"]) == ["trl_engine_vs_trl_rollout_time", "trl_engine_vs_trl_step_time",
                                        "trl_engine_vs_trl_time_per_token", "trl_rpo_shared_vs_trl_step_time",
                                        "trl_rpo_shared_vs_trl_time_per_token", "trl_rpo_vs_trl_step_time",
                                        "trl_rpo_vs_trl_time_per_token"]


def test_bench_trl_update_measures_both_trainers_on_the_same_computation(tmp_path):
    """bench_trl_update: GRPOTrainer's loss pass and SharedPrefixGRPOTrainer's on the same RPO inputs, the same
    loss and gradients, with the speedup and memory ratio."""
    pytest.importorskip("trl")
    out = tmp_path / "update.json"
    stdout = run_bench("bench_trl_update.py", "--tiny", "--loads", "160:2", "200:3", "--repeats", 1, "--out", out)
    assert_saved_as_it_went(stdout, out, cases=2)
    rows = json.loads(out.read_text())["results"]
    assert [(r["trainer"], r["prefix"], r["G"]) for r in rows] == [
        ("GRPOTrainer", 160, 2), ("SharedPrefixGRPOTrainer", 160, 2),
        ("GRPOTrainer", 200, 3), ("SharedPrefixGRPOTrainer", 200, 3)]
    for plain, shared in (rows[:2], rows[2:]):
        assert shared["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-6)
        assert shared["max_grad_difference"] < 1e-3 and shared["speedup"] > 0 and shared["memory_reduction"] > 1


def test_bench_trl_keeps_our_systems_when_trl_fails(tmp_path, tiny_model_dir):
    """TRL failing at run time (here: a stand-in whose GRPOConfig raises) is recorded, left out of the later
    passes, and our system's figures make a complete file."""
    fake = tmp_path / "broken"
    broken_trl = ("__version__ = 'broken'\n\n\nclass GRPOTrainer:\n    pass\n\n\nclass GRPOConfig:\n"
                  "    def __init__(self, **kwargs):\n        raise RuntimeError('CUBLAS_STATUS_EXECUTION_FAILED')\n")
    for package, code in (("trl", broken_trl), ("datasets", "class Dataset:\n    from_list = staticmethod(list)\n")):
        (fake / package).mkdir(parents=True)
        (fake / package / "__init__.py").write_text(code)
    out = tmp_path / "trl.json"
    stdout = run_bench("bench_trl.py", "--model", tiny_model_dir, "--systems", "trl", "full", "--steps", 2,
                       "--prompts-per-step", 2, "--num-generations", 2, "--max-completion-length", 16, "--eval-size", 4,
                       "--passes", 2, "--out", out, env=bench_env(PYTHONPATH=f"{fake}{os.pathsep}{BENCHMARKS.parent}"))
    assert_saved_as_it_went(stdout, out, cases=2)  # full's two passes; trl ran once
    record = json.loads(out.read_text())
    assert record["trl_error"] == "RuntimeError: CUBLAS_STATUS_EXECUTION_FAILED" and record["ratios"] == {}
    assert record["errors"] == {"trl": record["trl_error"]}
    assert [(r["system"], len(r["passes"])) for r in record["results"]] == [("full", 2)]


def test_save_json_replaces_a_complete_file_only_with_a_complete_one(tmp_path):
    common = bench_module("common")
    partial_path, save_json = common.partial_path, common.save_json
    out = tmp_path / "rollout_cpu.json"
    save_json(out, {"rows": [1, 2]})
    save_json(out, {"rows": [1]}, partial=True)  # a later run, stopped after its first case
    assert json.loads(out.read_text()) == {"rows": [1, 2]}
    assert json.loads(partial_path(out).read_text()) == {"rows": [1]}
    save_json(out, {"rows": [3, 4]})  # complete: replaces the file, the partial one goes
    assert json.loads(out.read_text()) == {"rows": [3, 4]} and sorted(os.listdir(tmp_path)) == ["rollout_cpu.json"]


def test_git_commit_without_git_or_a_checkout(tmp_path, monkeypatch):
    """The GPU machine's copy may have no .git and no git binary: the commit is $GIT_COMMIT, else "unknown",
    never an error (a benchmark records it beside its figures, and would lose them)."""
    common = bench_module("common")
    assert common.git_head(tmp_path) is None  # not a checkout: git rev-parse fails
    monkeypatch.setenv("PATH", str(tmp_path))  # no git binary on it
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    assert common.git_head(BENCHMARKS) is None and common.git_commit() == "unknown"
    monkeypatch.setenv("GIT_COMMIT", "0123abc")
    assert common.git_commit() == "0123abc"


def test_an_interrupted_benchmark_leaves_what_it_measured(tmp_path):
    """A time limit (timeout -s INT) stops a run part-way: the partial file holds the steps measured before."""
    out = tmp_path / "paper_shape.json"
    proc = subprocess.Popen([sys.executable, "bench_paper_shape.py", "--cpu", "--prompt-len", "16", "--full-len", "48",
                             "--suffix-len", "8", "--repeats", "50", "--out", str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=BENCHMARKS, env=bench_env(PYTHONUNBUFFERED="1"),
                            # SIGINT handled as by default, also where the suite runs with it ignored (`cmd &`)
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        next((line for line in proc.stdout if line.startswith("wrote ")), None)  # the first step's partial file
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode == 130, output[-3000:]
    partial = bench_module("common").partial_path(out)
    assert len(json.loads(partial.read_text())["runs"]["full"]) >= 1
    assert os.listdir(tmp_path) == [partial.name]  # no complete file, no temporary file beside it


def test_bench_rollout_keeps_our_figures_when_transformers_fails(tiny_model_dir):
    from rpo_engine import load_model

    class FailingPeer:  # transformers' generate failing as cuBLAS might on a GPU
        def generate(self, *args, **kwargs):
            raise RuntimeError("CUBLAS_STATUS_EXECUTION_FAILED")

    row, = bench_module("bench_rollout").run_load(FailingPeer(), load_model(tiny_model_dir), num_prompts=2, n=2,
                                                  prompt_len=8, new_tokens=4, repeats=1, variants=[("tiny", {})])
    assert row["ours_tok_s"] > 0 and row["hf_s"] is None
    assert row["hf_error"] == "RuntimeError: CUBLAS_STATUS_EXECUTION_FAILED"


def test_random_benchmark_models_match_loaded_ones(tmp_path):
    """A benchmark's bf16 model has RoPE's frequencies in fp32, as load_model gives a checkpoint's."""
    from rpo_engine import load_model
    from rpo_engine.model import ModelConfig

    config = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                           rope_theta=1e6, max_position_embeddings=4096))
    model = bench_module("common").random_model(config, "cpu", torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = load_model(tmp_path, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16 and model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, loaded.model.rotary_emb.inv_freq)
    positions = torch.arange(4096)[None]
    for ours, theirs in zip(model.model.rotary_emb(positions, torch.bfloat16),
                            loaded.model.rotary_emb(positions, torch.bfloat16)):
        assert torch.equal(ours, theirs)


def test_every_cuda_only_test_is_in_the_gpu_suite():
    """gpu_suite.sh runs `pytest -m gpu`: a test skipped off CUDA without the gpu mark would run nowhere (three such
    tests were written this way)."""
    import re

    unmarked = []
    for path in sorted((BENCHMARKS.parent / "tests").glob("test_*.py")):
        text = path.read_text()
        if re.search(r"^pytestmark = .*pytest\.mark\.gpu", text, re.M):
            continue
        for decorators, name in re.findall(r"((?:^@.*\n(?:^ .*\n)*)+)def (test_\w+)", text, re.M):
            skips_off_cuda = re.search(r"skipif\(not [^,]*(ON_CUDA|cuda)", decorators, re.I)
            if skips_off_cuda and "@pytest.mark.gpu" not in decorators:
                unmarked.append(f"{path.name}::{name}")
    assert not unmarked


def test_time_alternating_turns_the_order_every_round():
    """Each round times every variant once, the order rotated (A B, B A, A B, ...), after the warm-up round: drift
    on the machine falls on every variant alike; a variant that fails is left out of the rounds after."""
    common, calls = bench_module("common"), []

    def call(name):
        def run():
            calls.append(name)
            if name == "c" and calls.count("c") == 2:
                raise MemoryError
            return len(calls)
        return run

    timed = common.time_alternating({n: call(n) for n in "abc"}, 3, errors=(MemoryError,))
    # warm-up a b c; round 1 b c (c fails: left out); then a b, b a, as two variants turn
    assert calls == [*"abc", *"bca", *"ab", *"ba"], calls
    assert [len(timed[n]["wall"]) for n in "ab"] == [3, 3] and isinstance(timed["c"]["error"], MemoryError)
    assert timed["a"]["results"] == [6, 7, 10] and all(t >= 0 for t in timed["a"]["wall"] + timed["a"]["cpu"])


def test_time_steps_alternates_training_steps_from_zeroed_gradients():
    common, order = bench_module("common"), []
    models = {name: torch.nn.Linear(4, 1) for name in ("plain", "shared")}

    def step(name):
        def run():
            assert models[name].weight.grad is None  # zeroed before each run
            order.append(name)
            models[name](torch.ones(1, 4)).sum().backward()
            return name
        return run

    rows = common.time_steps({name: (m, step(name)) for name, m in models.items()}, 3)
    assert order == ["plain", "shared", "shared", "plain", "plain", "shared", "shared", "plain"]
    for name, (row, last) in rows.items():
        assert last == name and row["ms"] > 0 and row["cpu_ms"] >= 0


def test_bench_shared_prefix_alternates_the_layouts(monkeypatch):
    import random

    from rpo_engine.model import ModelConfig

    bench, order = bench_module("bench_shared_prefix"), []
    step = bench.step
    monkeypatch.setattr(bench, "step", lambda model, groups, shared: (order.append(shared),
                                                                      step(model, groups, shared)))
    config = ModelConfig.from_hf_dict(dict(model_type="qwen2", vocab_size=64, hidden_size=16, intermediate_size=32,
                                           num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                           max_position_embeddings=512))
    model = bench_module("common").random_model(config, "cpu", torch.float32).train()
    plain, shared = bench.measure(model, [bench.make_group(32, 2, 64, random.Random(0))], repeats=3)
    # the warm-up round, 3 timed rounds in turned orders, then each layout's saved-activation count
    assert order == [False, True, True, False, False, True, True, False, False, True]
    assert shared["layout_tokens"] < plain["layout_tokens"] and plain["ms"] > 0 and shared["saved_mib"] > 0


def longest_run(names: list) -> int:
    """The most calls of one variant in a row."""
    run = best = 0
    for i, name in enumerate(names):
        run = run + 1 if i and names[i - 1] == name else 1
        best = max(best, run)
    return best


def test_bench_sampler_alternates_what_it_compares(tmp_path, monkeypatch):
    """The fast sampler and the reference (and the penalty off and on) are timed in turns, not all of one's repeats
    before the other's: two calls of one in a row at most, where a rotated round ends and the next begins."""
    bench, calls = bench_module("bench_sampler"), []
    for name in ("sample", "sample_reference"):
        original = getattr(bench, name)
        monkeypatch.setattr(bench, name, lambda *a, _f=original, _n=name, **k: (calls.append(_n), _f(*a, **k))[1])
    sample_sequences = bench.sample_sequences
    monkeypatch.setattr(bench, "sample_sequences", lambda logits, seqs, seen: (
        calls.append(seqs[0].params.repetition_penalty), sample_sequences(logits, seqs, seen))[1])
    bench.main(["--rows", "2", "--vocab", "3000", "--repeats", "4", "--out", str(tmp_path / "sampler.json")])
    penalty = [c for c in calls if not isinstance(c, str)]
    assert longest_run([c for c in calls if isinstance(c, str)]) <= 2 and longest_run(penalty) <= 2
    assert penalty.count(1.0) == penalty.count(1.1) == 5  # a warm-up round and 4 timed ones


def test_bench_host_times_backends_and_the_baseline_in_turns(monkeypatch):
    """A case's engines, ours and the baseline checkout's, take turns a generate call at a time."""
    bench, calls = bench_module("bench_host"), []
    monkeypatch.setattr(bench, "NUM_BLOCKS", 512)
    build = bench.build

    def recorded(num_seqs, context, backend):
        run = build(num_seqs, context, backend)
        return lambda: (calls.append(backend), run())[1]

    class FakeBaseline:
        def ask(self, request):
            if request[0] == "build":
                return ["torch"]
            calls.append("baseline")
            return [0.5, [0.001] * 3]

    monkeypatch.setattr(bench, "build", recorded)
    rows, base_rows = bench.measure_all(3, [(8, 160)], FakeBaseline())
    assert longest_run(calls) == 1 and len(calls) == 3 * 6 and calls[:6] != calls[6:12]  # the order turns
    assert [r["decode_steps"] for r in rows] == [3 * 127] * 5
    assert base_rows[:2] == [None, None]
    assert base_rows[2]["decode_steps"] == 9 and base_rows[2]["host_s_per_call"] == 0.5


def test_bench_cache_runs_each_case_on_both_sides_before_the_next(monkeypatch):
    bench, order = bench_module("bench_cache"), []
    monkeypatch.setattr(bench, "run_case", lambda n, length, src=None: order.append((n, src)) or {"prompts": n})
    rows, base_rows = bench.run_cases([(1, 2), (3, 4), (5, 6)], [(1, 2), (5, 6)], "old")
    assert order == [(1, None), (1, "old"), (3, None), (5, None), (5, "old")]
    assert [r["prompts"] for r in rows] == [1, 3, 5] and [r["prompts"] for r in base_rows] == [1, 5]


def test_bench_rewards_times_the_worker_counts_in_turns(tmp_path, monkeypatch):
    bench, calls = bench_module("bench_rewards"), []
    score = bench.RewardPool.score
    monkeypatch.setattr(bench.RewardPool, "score", lambda self, *a: (calls.append(self.workers), score(self, *a))[1])
    bench.main(["--completions", "8", "--workers", "1", "2", "--repeats", "3", "--out", str(tmp_path / "r.json")])
    assert calls[:2] == [1, 2] and longest_run(calls[2:]) <= 2 and sorted(calls[2:]) == [1, 1, 1, 2, 2, 2]


def test_bench_lora_times_full_and_adapters_in_turns(tmp_path, monkeypatch):
    bench, updates, decodes = bench_module("bench_lora"), [], []
    step = bench.step
    monkeypatch.setattr(bench, "step", lambda model, groups, shared: (updates.append(id(model)),
                                                                      step(model, groups, shared)))

    class RecordingEngine(bench.RolloutEngine):
        def generate(self, prompts, params):
            decodes.append(id(self))
            return super().generate(prompts, params)

    monkeypatch.setattr(bench, "RolloutEngine", RecordingEngine)
    bench.main(["--repeats", "3", "--out", str(tmp_path / "lora.json")])
    assert len(set(updates)) == 2 and len(updates) == 8 and longest_run(updates) <= 2
    assert len(set(decodes)) == 3 and len(decodes) == 3 * 4 and longest_run(decodes[3:]) <= 2  # after the warm-ups


def test_bench_rollout_times_a_loads_engines_and_transformers_in_turns(tiny_model_dir, monkeypatch):
    from rpo_engine import load_model

    bench, calls = bench_module("bench_rollout"), []

    class RecordingPeer:
        def generate(self, ids, **kwargs):
            calls.append("hf")

    class RecordingEngine(bench.RolloutEngine):
        def generate(self, prompts, params):
            calls.append("sharing" if self.enable_prefix_sharing else "plain")
            return super().generate(prompts, params)

    monkeypatch.setattr(bench, "RolloutEngine", RecordingEngine)
    rows = bench.run_load(RecordingPeer(), load_model(tiny_model_dir), num_prompts=2, n=2, prompt_len=8, new_tokens=4,
                          repeats=3, variants=[("sharing", dict(enable_prefix_sharing=True)),
                                               ("plain", dict(enable_prefix_sharing=False))])
    timed = calls[3:]  # after each one's warm-up
    assert longest_run(timed) <= 2 and sorted(timed) == sorted(["hf", "plain", "sharing"] * 3), calls
    assert [r["case"] for r in rows] == ["sharing", "plain"] and rows[0]["speedup"] > 0 and "speedup" not in rows[1]


def test_bench_kernels_times_the_methods_in_turns(tmp_path, monkeypatch):
    """Each method's child process is started first, then the methods take turns a step at a time."""
    bench, turns = bench_module("bench_kernels"), []
    turn = bench.Child.turn
    monkeypatch.setattr(bench.Child, "turn", lambda self: (turns.append(self.proc.args[3]), turn(self))[1])
    bench.main(["--shape", "64", "32", "500", "--repeats", "3", "--out", str(tmp_path / "kernels.json")])
    assert sorted(turns) == sorted(["naive", "torch", "naive+entropy", "torch+entropy"] * 3)
    assert longest_run(turns) == 1 and turns[:4] != turns[4:8]
    rows = json.loads((tmp_path / "kernels.json").read_text())["results"]
    assert all(r["ms"] > 0 and r["peak_extra_mib"] > 0 for r in rows)


# What the GPU image brings of the package's and the suite's requirements: torch and triton, transformers (the
# image's own) and what transformers itself requires. The rest must come from gpu_prepare.sh's wheels.
IMAGE_HAS = {"torch", "triton", "transformers", "tokenizers", "safetensors", "numpy", "pyyaml", "tqdm"}


def _requirement_name(spec: str) -> str:
    import re

    return re.match(r"[A-Za-z0-9._-]+", spec).group(0).lower().replace("_", "-")


def test_gpu_prepare_ships_what_the_image_lacks():
    """The GPU image has no network and installs rpo_engine with --no-deps: each requirement it does not bring
    (matplotlib: every training run's curves.png; pytest: the suite's tests) needs a wheel from gpu_prepare.sh,
    built for its Python (3.12), with every requirement of those wheels that the image lacks too."""
    import ast
    import re
    import shlex

    setup = ast.parse((BENCHMARKS.parent / "setup.py").read_text())
    kwargs = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kwargs = {k.arg: ast.literal_eval(k.value) for k in kwargs.keywords if k.arg in ("install_requires", "extras_require")}
    needed = {_requirement_name(r) for r in kwargs["install_requires"]} | {"pytest"}
    script = (BENCHMARKS / "gpu_prepare.sh").read_text()
    download = " ".join(shlex.split(re.search(r"pip download(.*?)\n(?!\s)", script.replace("\\\n", " "), re.S).group(1)))
    shipped = {_requirement_name(w) for w in download.split() if "==" in w}
    assert "--python-version 3.12" in download
    assert needed - IMAGE_HAS <= shipped, needed - IMAGE_HAS - shipped
    from importlib.metadata import PackageNotFoundError, requires

    from packaging.requirements import Requirement

    on_the_image = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
                    "platform_system": "Linux", "extra": ""}
    for name in sorted(shipped):  # their own requirements (as installed here, at the versions shipped)
        try:
            specs = requires(name) or []
        except PackageNotFoundError:  # not a CPU requirement (Liger-Kernel: it requires torch and triton alone)
            continue
        for spec in specs:
            requirement = Requirement(spec)
            if requirement.marker and not requirement.marker.evaluate(on_the_image):
                continue
            dep = _requirement_name(requirement.name)
            if dep not in IMAGE_HAS | shipped | {"accelerate", "huggingface-hub", "packaging", "pyarrow", "pandas",
                                                 "xxhash", "fsspec", "filelock", "jinja2", "psutil", "sympy"}:
                raise AssertionError(f"{name} requires {dep}, neither on the image nor shipped")


def test_gpu_suite_installs_only_the_wheels_the_image_lacks(tmp_path):
    """A wheel whose distribution the image already has is left out: a second copy on PYTHONPATH would shadow the
    image's own (a binary one, such as pillow's, built against other libraries), and so would its older plugins."""
    wheels = [tmp_path / name for name in ("pytest-0.0.1-py3-none-any.whl", "no_such_dist_rpo-1.0-py3-none-any.whl",
                                           "Python_Dateutil-2.9.0.post0-py2.py3-none-any.whl")]
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "missing_wheels.py"), *map(str, wheels)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [str(wheels[1])]
    script = (BENCHMARKS / "gpu_suite.sh").read_text()
    assert "benchmarks/missing_wheels.py" in script and "python3 " not in script  # one interpreter: `python`
