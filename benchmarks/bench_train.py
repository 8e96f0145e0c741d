"""RPO against full-path GRPO/DAPO on the built-in task and starter model, side by side in one process.

For each algorithm pair (full path vs RPO) and seed: generated tokens per step, prefill tokens,
median step time, final eval accuracy. Writes benchmarks/results/train_<device>.json and a PNG with
reward and eval accuracy against steps and against wall-clock.

    python benchmarks/bench_train.py                      # GRPO vs RPO-GRPO, 3 seeds, default job settings
    python benchmarks/bench_train.py --algos grpo dapo --seeds 0 1 2 --steps 40
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import tempfile
from pathlib import Path

import torch

from common import git_commit, machine, save_json
from rpo_engine.train import main as train_main


def run(algo: str, rpo: bool, seed: int, steps: int, extra: list[str], out: Path) -> dict:
    output = out / f"{algo}-{'rpo' if rpo else 'full'}-s{seed}"
    train_main(["--algo", algo, "--rpo" if rpo else "--no-rpo", "--seed", str(seed), "--steps", str(steps),
                "--output", str(output), "--no-progress", *extra])
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    wall, t = [], 0.0
    for r in steps_:
        t += r["step_time_s"]
        wall.append(t)
    return {"algo": algo, "rpo": rpo, "seed": seed,
            "generated_tokens_per_step": statistics.mean(r["rollout_generated_tokens"] for r in steps_),
            "prefill_tokens_per_step": statistics.mean(r["rollout_prefill_tokens"] for r in steps_),
            "median_step_time_s": statistics.median(r["step_time_s"] for r in steps_),
            "initial_eval_accuracy": evals[0]["eval_accuracy"], "final_eval_accuracy": evals[-1]["eval_accuracy"],
            "curve": {"step": [r["step"] for r in steps_], "wall_s": wall, "reward": [r["reward_mean"] for r in steps_],
                      "eval_step": [r["step"] for r in evals], "eval_accuracy": [r["eval_accuracy"] for r in evals]}}


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    colors = {}
    for r in runs:
        label = f"{'RPO-' if r['rpo'] else ''}{r['algo'].upper()}"
        color = colors.setdefault(label, f"C{len(colors)}")
        c = r["curve"]
        kw = dict(color=color, alpha=0.8, label=label if r["seed"] == runs[0]["seed"] else None)
        axes[0].plot(c["step"], c["reward"], **kw)
        axes[1].plot(c["eval_step"], c["eval_accuracy"], marker="o", **kw)
        wall_at = [0.0] + c["wall_s"]
        axes[2].plot([wall_at[s] for s in c["eval_step"]], c["eval_accuracy"], marker="o", **kw)
    axes[0].set(title="reward", xlabel="step")
    axes[1].set(title="greedy eval accuracy", xlabel="step")
    axes[2].set(title="greedy eval accuracy", xlabel="training wall-clock (s)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--algos", nargs="+", default=["grpo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes beside it)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more rpo_engine.train flags")
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for algo in args.algos:
            for seed in args.seeds:
                for rpo in (False, True):
                    runs.append(run(algo, rpo, seed, args.steps, args.extra, Path(tmp)))
                    r = runs[-1]
                    print(f"{algo:5s} rpo={r['rpo']!s:5s} seed={seed} gen_tok/step={r['generated_tokens_per_step']:8.0f} "
                          f"median_step={r['median_step_time_s']:6.2f}s eval {r['initial_eval_accuracy']:.3f} -> "
                          f"{r['final_eval_accuracy']:.3f}", flush=True)
    summary = []
    for algo in args.algos:
        full = [r for r in runs if r["algo"] == algo and not r["rpo"]]
        rpo = [r for r in runs if r["algo"] == algo and r["rpo"]]
        row = {"algo": algo,
               "token_ratio": statistics.mean(r["generated_tokens_per_step"] for r in rpo)
               / statistics.mean(r["generated_tokens_per_step"] for r in full),
               "step_time_ratio": statistics.median(r["median_step_time_s"] for r in rpo)
               / statistics.median(r["median_step_time_s"] for r in full),
               "final_eval_full": [r["final_eval_accuracy"] for r in full],
               "final_eval_rpo": [r["final_eval_accuracy"] for r in rpo]}
        summary.append(row)
        print(f"{algo}: RPO generates {row['token_ratio']:.1%} of full-path tokens, median step time "
              f"{row['step_time_ratio']:.1%}; final eval full {row['final_eval_full']} rpo {row['final_eval_rpo']}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = Path(__file__).parent / "results"
    record = {"benchmark": "train", "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "git_commit": git_commit(), "torch": torch.__version__, "steps": args.steps, "seeds": args.seeds,
              "extra_flags": args.extra, "summary": summary, "runs": runs}
    out = save_json(args.out or results / f"train_{device}.json", record)
    plot(runs, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
