"""examples/custom_loop.py runs as a script, logs sane numbers (its in-memory evals' too) and really changes the
weights."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import rpo_engine

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "custom_loop.py"


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_custom_loop_trains_tiny_model(tmp_path, lora):
    # hash_reward: a random model never gets the exact answer right, so all-zero rewards would give
    # zero advantages and no update; a keyed coin flip gives varied rewards and a real gradient.
    cmd = [sys.executable, str(EXAMPLE), "--tiny", "--steps", "2", "--prompts-per-step", "2", "--num-generations", "4",
           "--max-completion-length", "32", "--train-size", "2", "--reward", str(ROOT / "tests/reward_fns.py") + ":hash_reward",
           "--eval-every", "1", "--eval-size", "4", "--output", str(tmp_path)] + \
        (["--lora-r", "4", "--learning-rate", "1e-3"] if lora else [])
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for r in records:
        assert 0.0 <= r["reward_mean"] <= 1.0
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"])
        assert r["step_time_s"] > 0
        assert 0 < r["generated_tokens"] <= 2 * 4 * 32
        assert r["eval_accuracy"] in (0.0, 0.25, 0.5, 0.75, 1.0)  # the live model, evaluated in memory on 4 rows
    assert records[0]["cached_prompts"] == 2
    # Step 1 is full path (nothing cached yet); step 2 regenerates only suffixes of the cached paths.
    assert records[1]["generated_tokens"] < records[0]["generated_tokens"]
    assert any(r["grad_norm"] > 0 for r in records)

    # The saved weights differ from the seeded initial model the script started from.
    spec = importlib.util.spec_from_file_location("custom_loop", EXAMPLE)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    initial, _ = example.build_model(tiny=True, seed=0)
    final = rpo_engine.load_model(tmp_path / "final", dtype=torch.float32)
    changed = [name for name, p in final.state_dict().items()
               if not torch.equal(p, initial.state_dict()[name])]
    assert changed, "no parameter changed"
    if lora:  # the adapters' targets (every projection), merged into final/; nothing else moved
        assert all(name.endswith("_proj.weight") for name in changed) and (tmp_path / "final-adapter").is_dir()
    assert all(torch.isfinite(p).all() for p in final.state_dict().values())


@pytest.mark.parametrize("rpo", [True, False], ids=["rpo", "grpo"])
def test_trl_example_trains_with_our_rollout(tmp_path, rpo):
    """examples/trl_grpo.py: TRL's GRPOTrainer with RPORollout (or TRLRollout) runs its steps; RPO's cache
    state saves with weights_only-safe types and loads into a fresh RPORollout."""
    pytest.importorskip("trl")
    cmd = [sys.executable, str(ROOT / "examples" / "trl_grpo.py"), "--tiny", "--steps", "3", "--prompts-per-step", "2",
           "--num-generations", "4", "--max-completion-length", "16", "--output", str(tmp_path)]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run(cmd + ([] if rpo else ["--no-rpo"]), capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SharedPrefixGRPOTrainer: TRL's own log-prob pass runs" not in out.stderr  # the shared pass ran
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2, 3]
    assert all(0 < s["completions/mean_length"] <= 16 for s in steps if "loss" in s)
    if not rpo:
        assert not (tmp_path / "rpo_state.pt").exists()
        return
    from rpo_engine.integrations.trl import RPORollout

    state = torch.load(tmp_path / "rpo_state.pt", weights_only=True)
    restored = RPORollout()
    restored.load_state_dict(state)
    assert len(restored.cache) == 4 and restored.counters["cold_starts"] == 4
    assert "RPO: " in out.stdout
