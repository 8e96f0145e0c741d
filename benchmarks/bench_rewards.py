"""Reward scoring: math-verify over one step's completions in the trainer's process against `--reward-workers`
processes (rewards.pool.RewardPool), side by side in one run, with the same scores checked.

The load: 512 completions (64 prompts x 8 samples) of ~1k characters of reasoning with LaTeX, each ending
in a \\boxed{} answer (a fraction, a surd, a polynomial or an integer), about 60% of them right, against
references written another way than the answer (\\frac12 for \\frac{1}{2}, 2\\sqrt 3 for 2\\sqrt{3}), so
math-verify's parser and comparison run as they do on a math dataset. Reports the median seconds of R calls
for each worker count (every pool started and warmed up beforehand; its start-up is reported on its own), the
counts timed in turns: each round one call of each, the order turned every round.
Writes benchmarks/results/rewards_cpu.json.
"""
import contextlib, datetime, os, random, statistics, sys, time  # noqa: E401
from pathlib import Path

from common import arg_parser, cli, git_commit, machine, out_path, positive_int, save_json, time_alternating
from rpo_engine.rewards.pool import RewardPool, reward_function


def completions(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    texts, answers = [], []
    for i in range(n):
        steps = " ".join(f"Then $x_{{{k}}} = \\frac{{{rng.randint(1, 99)}}}{{{rng.randint(2, 99)}}}$, so the sum "
                         f"grows by {rng.randint(1, 9)}." for k in range(14))
        a, b = rng.randint(1, 30), rng.randint(2, 30)
        kind = i % 4
        if kind == 0:
            boxed, reference = f"\\frac{{{a}}}{{{b}}}", f"\\frac{a}{b}" if a < 10 and b < 10 else f"{a}/{b}"
        elif kind == 1:
            boxed, reference = f"{a}\\sqrt{{3}}", f"{a}\\sqrt 3"
        elif kind == 2:
            boxed, reference = f"x^{{2}} + {a}x", f"x^2+{a}x"
        else:
            boxed, reference = str(a * b), str(a * b)
        if rng.random() < 0.5:  # a wrong answer: another value of the same form
            boxed = boxed.replace(str(a), str(a + 1), 1)
        texts.append(f"Let us work it out. {steps} Therefore the answer is $\\boxed{{{boxed}}}$.")
        answers.append(reference)
    return texts, answers


def main(argv=None):
    parser = arg_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--completions", type=positive_int, default=512)
    parser.add_argument("--workers", type=positive_int, nargs="+",
                        help="worker counts (default: 1, 2, 4, 8 up to the CPUs)")
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--out", type=out_path, default=None)
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1
    counts = args.workers or [w for w in (1, 2, 4, 8, 16) if w <= cpus]
    texts, answers = completions(args.completions)
    fn = reward_function("math")

    def serial():
        return [fn(t, a) for t, a in zip(texts, answers)]

    expected = serial()
    with contextlib.ExitStack() as stack:
        pools, startup, same = {}, {}, {}
        for workers in counts:  # every pool started and warmed up before any is timed
            start = time.perf_counter()
            pools[workers] = stack.enter_context(RewardPool({0: "math"}, workers))
            same[workers] = pools[workers].score(0, texts, answers) == expected  # also the warm-up: imports math-verify
            startup[workers] = time.perf_counter() - start
        calls = {0: serial, **{w: lambda pool=pool: pool.score(0, texts, answers) for w, pool in pools.items()}}
        timings = time_alternating(calls, args.repeats, warmup=0)  # in turns: drift on the box falls on all alike
    here = statistics.median(timings[0]["wall"])
    print(f"{len(texts)} completions, {sum(expected):.0f} right: in this process {here:.3f} s "
          f"({here / len(texts) * 1e3:.2f} ms each)", flush=True)
    results = [dict(workers=0, median_s=round(here, 4), speedup=1.0, same_scores=True)]
    for workers in counts:
        median = statistics.median(timings[workers]["wall"])
        same_scores = same[workers] and all(scores == expected for scores in timings[workers]["results"])
        results.append(dict(workers=workers, median_s=round(median, 4), speedup=round(here / median, 2),
                            startup_s=round(startup[workers], 2), same_scores=same_scores))
        print(f"{workers} workers: {median:.3f} s ({here / median:.2f}x), start-up and first call "
              f"{startup[workers]:.2f} s, same scores: {same_scores}", flush=True)
    record = dict(benchmark="rewards", machine=f"{machine('cpu')}, {cpus} CPUs", date=datetime.date.today().isoformat(),
                  git_commit=git_commit(), completions=len(texts), right=int(sum(expected)), repeats=args.repeats,
                  results=results)
    save_json(args.out or Path(__file__).resolve().parent / "results" / "rewards_cpu.json", record)
    if not all(r["same_scores"] for r in results):
        sys.exit("the pool's scores differ from the trainer process's")


if __name__ == "__main__":
    cli(main)
