"""RPO against full-path GRPO/DAPO on the built-in task and starter model, side by side in one run.

For each algorithm pair (full path vs RPO) and seed: generated tokens per step, prefill tokens,
median step time, training wall-clock to reach a target eval accuracy (by default the seed's starting
accuracy + 0.05: the starter model's own accuracy depends on the machine that built it), final eval accuracy. Writes
benchmarks/results/train_<device>.json and a PNG with reward and eval accuracy against steps and
against wall-clock; until the last run has finished, train_<device>.partial.json with the runs so far (what a
time limit leaves).

    python benchmarks/bench_train.py                      # GRPO vs RPO-GRPO, 3 seeds, default job settings
    python benchmarks/bench_train.py --algos grpo dapo --seeds 0 1 2 --steps 40
    python benchmarks/bench_train.py --rpo-variants "--rpo-unverified-cut-fraction 0.5" --jobs 2
                                                          # more RPO settings against the same full-path runs

Each training runs in a worker process (rpo_engine.train's main); --jobs N runs N of them at once: on an
N-core box give each one thread (OMP_NUM_THREADS=1), so step times stay comparable within the run. Every
run's train flags are checked before the first one starts, and the first failed run stops the rest.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import datetime
import json
import multiprocessing
import re
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

import torch

from common import arg_parser, cli, git_commit, machine, out_path, positive_int, save_json, train_config
from rpo_engine.errors import UserError
from rpo_engine.train import main as train_main


def train_argv(algo: str, rpo: bool, seed: int, steps: int, extra: list[str], output: Path, variant: str) -> list[str]:
    """rpo_engine.train's flags for one run (main checks every run's before the first starts)."""
    return ["--algo", algo, "--rpo" if rpo else "--no-rpo", "--seed", str(seed), "--steps", str(steps),
            "--output", str(output), "--no-progress", *extra, *shlex.split(variant)]


def run(algo: str, rpo: bool, seed: int, steps: int, extra: list[str], out: Path, variant: str = "") -> dict:
    """One training run; `variant` holds more flags for an RPO run ("" = the defaults)."""
    name = f"{algo}-{'rpo' if rpo else 'full'}-s{seed}" + re.sub(r"[^\w.]+", "_", variant)
    output = out / name
    # the training's own lines to stderr, with its progress bar: it runs in a worker process, beside others, and its
    # block-buffered stdout, flushed whenever, cut into the benchmark's lines there (a "wrote ..." line lost)
    with contextlib.redirect_stdout(sys.stderr):
        train_main(train_argv(algo, rpo, seed, steps, extra, output, variant))
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if "reward_mean" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    wall, t = [], 0.0
    for r in steps_:
        t += r["step_time_s"]
        wall.append(t)
    return {"algo": algo, "rpo": rpo, "variant": variant if rpo else None, "seed": seed,
            "generated_tokens_per_step": statistics.mean(r["rollout_generated_tokens"] for r in steps_),
            "prefill_tokens_per_step": statistics.mean(r["rollout_prefill_tokens"] for r in steps_),
            "median_step_time_s": statistics.median(r["step_time_s"] for r in steps_),
            "median_rollout_time_s": statistics.median(r["rollout_time_s"] for r in steps_),
            "median_update_time_s": statistics.median(r["update_time_s"] for r in steps_),
            "median_decode_steps": statistics.median(r["rollout_decode_steps"] for r in steps_),
            # groups whose rewards were all equal: no advantage, so no gradient (RPO's easy suffixes)
            "frac_groups_no_signal": statistics.mean(r["frac_reward_zero_std"] for r in steps_),
            "initial_eval_accuracy": evals[0]["eval_accuracy"], "final_eval_accuracy": evals[-1]["eval_accuracy"],
            "curve": {"step": [r["step"] for r in steps_], "wall_s": wall, "reward": [r["reward_mean"] for r in steps_],
                      "generated_tokens": [r["rollout_generated_tokens"] for r in steps_],
                      # the policy's entropy over the trained tokens (None: no update), the bonus's coefficient
                      "entropy": [r.get("entropy") for r in steps_],
                      **({"entropy_coef": [r["entropy_coef"] for r in steps_]} if "entropy_coef" in steps_[0] else {}),
                      "eval_step": [r["step"] for r in evals], "eval_accuracy": [r["eval_accuracy"] for r in evals]}}


def training_pool(jobs: int) -> concurrent.futures.ProcessPoolExecutor:
    """Worker processes for the trainings, started fresh (spawn), not forked: this process has asked CUDA whether
    it is there (torch.cuda.is_available, machine()), and a forked child cannot initialise CUDA after that ("Cannot
    re-initialize CUDA in forked subprocess"): every training on a GPU would fail."""
    return concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"))


def target_accuracy(run: dict, target: float | None, gain: float) -> float:
    """`target` if given, else the run's starting eval accuracy + `gain` (the same for a seed's full-path and
    RPO runs: one starter model, one eval set)."""
    return target if target is not None else round(run["initial_eval_accuracy"] + gain, 6)


def seconds_to_reach(run: dict, target: float) -> float | None:
    """Training wall-clock (step times summed, evals excluded) at the first eval at or above `target`."""
    wall_at = [0.0] + run["curve"]["wall_s"]
    for step, accuracy in zip(run["curve"]["eval_step"], run["curve"]["eval_accuracy"]):
        if accuracy >= target:
            return wall_at[step]
    return None


def summarize(runs: list[dict], target: float | None, gain: float = 0.05) -> list[dict]:
    """One row per (algorithm, RPO variant), each against the algorithm's full-path runs of the same seeds."""
    summary = []
    for algo in dict.fromkeys(r["algo"] for r in runs):
        full = sorted((r for r in runs if r["algo"] == algo and not r["rpo"]), key=lambda r: r["seed"])
        for variant in dict.fromkeys(r["variant"] for r in runs if r["algo"] == algo and r["rpo"]):
            rpo = sorted((r for r in runs if r["algo"] == algo and r["rpo"] and r["variant"] == variant),
                         key=lambda r: r["seed"])
            summary.append(compare(algo, variant, full, rpo, target, gain))
    return summary


def compare(algo: str, variant: str, full: list[dict], rpo: list[dict], target: float | None, gain: float) -> dict:
    targets = [target_accuracy(r, target, gain) for r in full]  # per seed
    gaps = [b["final_eval_accuracy"] - a["final_eval_accuracy"] for a, b in zip(full, rpo)]  # same seeds, in order
    return {
        "algo": algo, "variant": variant,
        "token_ratio": statistics.mean(r["generated_tokens_per_step"] for r in rpo)
        / statistics.mean(r["generated_tokens_per_step"] for r in full),
        "step_time_ratio": statistics.median(r["median_step_time_s"] for r in rpo)
        / statistics.median(r["median_step_time_s"] for r in full),
        "frac_groups_no_signal_full": statistics.mean(r["frac_groups_no_signal"] for r in full),
        "frac_groups_no_signal_rpo": statistics.mean(r["frac_groups_no_signal"] for r in rpo),
        "final_eval_full": [r["final_eval_accuracy"] for r in full],
        "final_eval_rpo": [r["final_eval_accuracy"] for r in rpo],
        "eval_gap_mean": statistics.mean(gaps), "eval_gap_std": statistics.stdev(gaps) if len(gaps) > 1 else 0.0,
        "target_eval_accuracy": targets,
        "seconds_to_target_full": [seconds_to_reach(r, t) for r, t in zip(full, targets)],
        "seconds_to_target_rpo": [seconds_to_reach(r, t) for r, t in zip(rpo, targets)]}


def plot(runs: list[dict], path: Path) -> None:
    """One row per algorithm pair: reward against steps, eval accuracy against steps and wall-clock."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(dict.fromkeys(r["algo"] for r in runs))
    fig, axes = plt.subplots(len(algos), 3, figsize=(15, 4 * len(algos)), squeeze=False)
    for row, algo in zip(axes, algos):
        pair = [r for r in runs if r["algo"] == algo]
        kinds = list(dict.fromkeys((r["rpo"], r["variant"]) for r in pair))  # full path, RPO, RPO variants
        for r in pair:
            label = f"{'RPO-' if r['rpo'] else ''}{algo.upper()}" + (f" [{r['variant']}]" if r["variant"] else "")
            c = r["curve"]
            kw = dict(color=f"C{kinds.index((r['rpo'], r['variant']))}", alpha=0.8,
                      label=label if r["seed"] == pair[0]["seed"] else None)
            row[0].plot(c["step"], c["reward"], **kw)
            row[1].plot(c["eval_step"], c["eval_accuracy"], marker="o", **kw)
            wall_at = [0.0] + c["wall_s"]
            row[2].plot([wall_at[s] for s in c["eval_step"]], c["eval_accuracy"], marker="o", **kw)
        row[0].set(title=f"{algo.upper()}: reward (one line per seed)", xlabel="step")
        row[1].set(title="greedy eval accuracy", xlabel="step")
        row[2].set(title="greedy eval accuracy", xlabel="training wall-clock (s)")
        row[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(0, -0.2))  # below the axes: long labels
    fig.tight_layout(h_pad=5)
    fig.savefig(path, dpi=100, bbox_inches="tight")


def main(argv=None):
    parser = arg_parser()
    parser.add_argument("--algos", nargs="+", default=["grpo"], choices=["grpo", "dapo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--target", type=float, default=None,
                        help="eval accuracy whose first crossing is timed (default: each seed's starting accuracy "
                        "+ --target-gain)")
    parser.add_argument("--target-gain", type=float, default=0.05)
    parser.add_argument("--out", type=out_path, default=None, help="JSON path (the PNG goes beside it)")
    parser.add_argument("--rpo-variants", nargs="*", default=[], metavar="FLAGS",
                        help='more RPO runs per seed, each with these train flags: one quoted string each, '
                        'with a leading space if it is one flag (" --no-length-shaping")')
    parser.add_argument("--jobs", type=positive_int, default=1, help="trainings run at once (one process each)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more rpo_engine.train flags")
    args = parser.parse_args(argv)
    args.rpo_variants = [v.strip() for v in args.rpo_variants]
    plan = [(algo, rpo, seed, variant) for algo in args.algos for seed in args.seeds
            for rpo, variant in [(False, ""), (True, "")] + [(True, v) for v in args.rpo_variants]]
    for algo, rpo, seed, variant in plan:  # a bad flag is an error now, not after the runs queued before it
        option = f"--rpo-variants {variant!r}" if variant else "--extra"
        try:
            flags = train_argv(algo, rpo, seed, args.steps, args.extra, Path("unused"), variant)
        except ValueError as e:  # shlex: an unclosed quote
            raise UserError(f"{option}: {e}") from None
        train_config(flags, option)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    runs = []
    record = {"benchmark": "train", "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "git_commit": git_commit(), "torch": torch.__version__, "steps": args.steps, "seeds": args.seeds,
              "extra_flags": args.extra, "rpo_variants": args.rpo_variants, "jobs": args.jobs, "runs": runs}
    out = args.out or Path(__file__).parent / "results" / f"train_{device}.json"
    with tempfile.TemporaryDirectory() as tmp, training_pool(args.jobs) as pool:
        futures = [pool.submit(run, algo, rpo, seed, args.steps, args.extra, Path(tmp), variant)
                   for algo, rpo, seed, variant in plan]
        try:
            for future in futures:
                runs.append(future.result())
                r = runs[-1]
                print(f"{r['algo']:5s} rpo={r['rpo']!s:5s} seed={r['seed']} {r['variant'] or ''} "
                      f"gen_tok/step={r['generated_tokens_per_step']:8.0f} median_step={r['median_step_time_s']:6.2f}s "
                      f"({r['median_decode_steps']:.0f} decode steps) "
                      f"eval {r['initial_eval_accuracy']:.3f} -> {r['final_eval_accuracy']:.3f}", flush=True)
                save_json(out, record, partial=True)  # after every run: a time limit keeps what was measured
        except BaseException:  # a failed run: the queued ones would only delay its error
            pool.shutdown(cancel_futures=True)
            raise
    summary = summarize(runs, args.target, args.target_gain)
    for row in summary:
        print(f"{row['algo']}{' [' + row['variant'] + ']' if row['variant'] else ''}: RPO generates "
              f"{row['token_ratio']:.1%} of full-path tokens, median step time "
              f"{row['step_time_ratio']:.1%}; groups without signal full {row['frac_groups_no_signal_full']:.0%} "
              f"rpo {row['frac_groups_no_signal_rpo']:.0%}; final eval full {row['final_eval_full']} rpo {row['final_eval_rpo']} "
              f"(RPO - full: {row['eval_gap_mean']:+.3f} +- {row['eval_gap_std']:.3f}); seconds to eval >= "
              f"{row['target_eval_accuracy']}: full {row['seconds_to_target_full']} rpo {row['seconds_to_target_rpo']}")
    record["summary"] = summary
    save_json(out, record)
    plot(runs, out.with_suffix(".png"))


if __name__ == "__main__":
    cli(main)
