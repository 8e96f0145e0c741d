"""Where a run's learning signal comes from, on the built-in task: every training answer graded twice.

GRPO learns which answers are right only from groups that hold both right and wrong ones ("mixed";
length shaping alone separates right answers by length). For each run this counts, over all steps,
the answers of mixed and uniform groups, right or wrong by the exact-answer
reward, and whether their worked trace is valid (`check_trace`: every step line right, the final
line the last result). A right answer with an invalid trace is rewarded for a final line its working
does not support. RPO groups are split by the cached path they continue: verified (a right answer)
or unverified (a cold start's, or a wrong answer kept in its place).

Reported per run: right answers in mixed groups, their rate per 1k generated tokens, the share of them
with an invalid trace, and the final greedy eval accuracy. Then what the trained model learned where: its
greedy answers to the training problems and to --grade-eval held-out ones, and for each wrong one the
first line of its trace that differs from the reference solution, by quarter of that solution (RPO
regenerates a verified path's last quarter at most, so its first three quarters are trained only where
a path was not verified). Writes benchmarks/results/signal_<device>.json.

    python benchmarks/bench_signal.py                  # full path, RPO, RPO with unverified cuts at most halfway
    python benchmarks/bench_signal.py --seed 1 --runs " --no-rpo" "--rpo --rpo-unverified-cut-fraction 0.25"
                                                       # a one-flag run needs a leading space
    python benchmarks/bench_signal.py --steps 120 --runs " --no-rpo" " --rpo"   # a longer run
"""
from __future__ import annotations

import collections
import datetime
import shlex
import tempfile
from pathlib import Path

import torch

from common import arg_parser, cli, git_commit, machine, out_path, positive_int, save_json, train_config
from rpo_engine.data.arithmetic import check_trace, make_split
from rpo_engine.errors import UserError
from rpo_engine.train import build_trainer
from rpo_engine.trainer import greedy_graded

QUARTERS = ("first", "second", "third", "fourth")


def first_wrong_quarter(text: str, solution: str) -> str:
    """The quarter of the reference `solution` holding the first line where `text` departs from it."""
    want, got = solution.strip().split("\n"), text.strip().split("\n")
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    return QUARTERS[min(3, 4 * first // len(want))]


def grade_greedy(trainer, rows: list[dict]) -> dict:
    """Greedy answers of the trainer's model to `rows` (built-in task rows, with their solution): accuracy,
    and where the wrong ones first depart from the reference trace."""
    graded = greedy_graded(trainer.engine, trainer.tokenizer, rows, trainer.reward_fn,
                           [trainer.encode_prompt(r) for r in rows], trainer.config.max_completion_length,
                           trainer.eos_ids)
    wrong = collections.Counter(first_wrong_quarter(text, row["solution"])
                                for row, (text, _, right) in zip(rows, graded) if not right)
    right = sum(right for _, _, right in graded)
    return {"problems": len(rows), "accuracy": right / len(rows),
            "wrong_from_quarter": {q: wrong[q] for q in QUARTERS}}


def run_config(flags: str, seed: int, steps: int, output: Path):
    """The run's TrainConfig, checked (main checks every run's before the first starts)."""
    option = f"--runs {flags!r}"
    try:
        argv = shlex.split(flags)
    except ValueError as e:  # an unclosed quote
        raise UserError(f"{option}: {e}") from None
    config = train_config(["--seed", str(seed), "--steps", str(steps), "--eval-steps", "0", "--no-progress",
                           "--output", str(output), *argv], option)
    if config.dataset is not None:
        raise UserError(f"{option}: bench_signal grades traces of the built-in task: run it without --dataset")
    return config


def audit(flags: str, seed: int, steps: int, output: Path, grade_eval: int) -> dict:
    trainer = build_trainer(run_config(flags, seed, steps, output))
    counts, score = collections.Counter(), trainer.score_groups

    def graded_score(groups):  # the trainer's own scoring, then the trace grade of each answer
        score(groups)
        for group in groups:
            if not trainer.rpo.rpo:  # (an RPO group may keep nothing: a path cut whole at its first token)
                kind = "full"
            else:
                kind = "verified" if trainer.cache.verified(group.row["id"]) else "unverified"
            mixed = "mixed" if len(set(group.correct)) > 1 else "uniform"
            for i, right in enumerate(group.correct):
                text = trainer.tokenizer.decode(group.answer_ids(i), skip_special_tokens=True)
                trace = "invalid" if check_trace(text) else "valid"
                counts[f"{kind} {mixed} {'right' if right else 'wrong'} {trace}"] += 1

    trainer.score_groups = graded_score  # called before the cache update: `verified` is the path's state as cut
    generated = sum(trainer.step()["rollout_generated_tokens"] for _ in range(steps))
    right_mixed = sum(n for k, n in counts.items() if " mixed right" in k)
    invalid = sum(n for k, n in counts.items() if " mixed right invalid" in k)
    return {"flags": flags, "seed": seed, "steps": steps, "generated_tokens": generated,
            "right_answers_in_mixed_groups": right_mixed,
            "per_1k_generated_tokens": 1000 * right_mixed / generated,
            "invalid_trace_share": invalid / max(1, right_mixed),
            "final_eval_accuracy": trainer.evaluate(), "counts": dict(sorted(counts.items())),
            "greedy_train": grade_greedy(trainer, trainer.train_rows),
            "greedy_eval": grade_greedy(trainer, make_split("eval", grade_eval, seed))}


def main(argv=None):
    parser = arg_parser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=positive_int, default=40)
    parser.add_argument("--runs", nargs="+", metavar="FLAGS",
                        default=["--no-rpo", "--rpo", "--rpo --rpo-unverified-cut-fraction 0.5"],
                        help="train flags of each run, one quoted string each")
    parser.add_argument("--grade-eval", type=positive_int, default=512,
                        help="held-out problems the trained model answers greedily, graded line by line")
    parser.add_argument("--out", type=out_path, default=None)
    args = parser.parse_args(argv)
    for flags in args.runs:  # a bad run is an error now, not after the runs before it
        run_config(flags, args.seed, args.steps, Path("unused"))
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, flags in enumerate(args.runs):
            r = audit(flags, args.seed, args.steps, Path(tmp) / f"run{k}", args.grade_eval)
            runs.append(r)
            print(f"[{flags}] right answers in mixed groups {r['right_answers_in_mixed_groups']} "
                  f"({r['per_1k_generated_tokens']:.2f} per 1k generated tokens), invalid trace "
                  f"{r['invalid_trace_share']:.0%}; final eval {r['final_eval_accuracy']:.3f}; greedy "
                  + "; ".join(f"{split} {g['accuracy']:.3f}, wrong answers by the quarter of the trace they first "
                              f"depart in {list(g['wrong_from_quarter'].values())}"
                              for split, g in (("train", r["greedy_train"]), ("eval", r["greedy_eval"]))), flush=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    record = {"benchmark": "signal", "machine": machine(), "date": datetime.datetime.now().isoformat(timespec="seconds"),
              "git_commit": git_commit(), "torch": torch.__version__, "runs": runs}
    save_json(args.out or Path(__file__).parent / "results" / f"signal_{device}.json", record)


if __name__ == "__main__":
    cli(main)
