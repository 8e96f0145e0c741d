"""The rollout sampler at Qwen's 151,936-token vocabulary: `sample` (linear in the vocabulary: no sort, no
fp64 copy of the logits) against `sample_reference` (the whole row in fp64, sorted when a row truncates;
the engine's sampler before commit 206462f, draw for draw), side by side in one process.

Cases: rows of 64 (CPU) or 64 and 256 (--gpu) sequences, each row's logits N(0, scale^2): scale 6 is a
peaked distribution (a top-p 0.95 nucleus of ~10-80 tokens, as a trained model's usually is), scale 1 a
flat one (a nucleus of most of the vocabulary: top-p falls back to the sort). Settings as the engine runs
them (flags from its Python lists): T = 1 (RL rollouts' default), top-p 0.95, top-k 50 at T = 0.7, greedy.
Each case checks that both draw the same tokens. Reports median ms per call, the two timed in turns (each round
times each once, the order turned every round, after a warm-up round).

Then the cost of a repetition penalty: the engine's `sample_sequences` at T = 1 over the same rows, each
sequence holding 1,024 distinct tokens, with the penalty off and at 1.1 (the seen-token rows gathered, the
logits penalized, the policy's log-probs taken from the unpenalized logits, the drawn tokens marked), the two
timed in turns too.
Writes benchmarks/results/sampler_cpu.json (sampler_cuda.json with --gpu).
"""
import datetime, statistics, sys  # noqa: E401
from pathlib import Path

import torch

from common import arg_parser, check_gpu, cli, git_commit, machine, out_path, positive_int, save_json, time_alternating
from rpo_engine.rollout.penalty import SeenTokens
from rpo_engine.rollout.sampler import sample, sample_reference, sample_sequences
from rpo_engine.rollout.sequence import SamplingParams, Sequence

VOCAB = 151_936
SETTINGS = {"T=1": (1.0, 0, 1.0), "top_p=0.95": (1.0, 0, 0.95), "top_k=50,T=0.7": (0.7, 50, 1.0),
            "greedy": (0.0, 0, 1.0)}


def timed(calls: dict, repeats: int, device) -> dict:
    """Median ms a call of each of `calls`, timed in turns after a warm-up round (time_alternating)."""
    timings = time_alternating(calls, repeats, sync=torch.cuda.synchronize if device.type == "cuda" else None)
    return {name: statistics.median(t["wall"]) * 1e3 for name, t in timings.items()}


def main(argv=None):
    parser = arg_parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpu", action="store_true", help="run on CUDA (64 and 256 rows)")
    parser.add_argument("--rows", type=positive_int, nargs="+", help="rows per call (default 64; with --gpu 64 256)")
    parser.add_argument("--vocab", type=positive_int, default=VOCAB)
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--out", type=out_path, default=None)
    args = parser.parse_args(argv)
    check_gpu(args.gpu)
    device = torch.device("cuda" if args.gpu else "cpu")
    rows_list = args.rows or ([64, 256] if args.gpu else [64])
    g = torch.Generator().manual_seed(0)
    results = []
    for rows in rows_list:
        for scale in (6.0, 1.0):
            logits = (torch.randn(rows, args.vocab, generator=g) * scale).to(device)
            u = torch.rand(rows, generator=g, dtype=torch.float64).to(device)
            for name, (t, k, p) in SETTINGS.items():
                inputs = (logits, torch.full((rows,), t, device=device), torch.full((rows,), k, device=device),
                          torch.full((rows,), p, device=device), u)
                flags = dict(truncate=t > 0 and (k > 0 or p < 1), any_greedy=t == 0, all_greedy=t == 0)
                fast_tokens = sample(*inputs, **flags)[0]
                same = bool(torch.equal(fast_tokens, sample_reference(*inputs)[0]))
                ms = timed({"fast": lambda: sample(*inputs, **flags), "reference": lambda: sample_reference(*inputs)},
                           args.repeats, device)
                fast, reference = ms["fast"], ms["reference"]
                row = dict(rows=rows, logit_scale=scale, setting=name, fast_ms=round(fast, 3),
                           reference_ms=round(reference, 3), speedup=round(reference / fast, 2), same_tokens=same)
                results.append(row)
                print(f"{rows} rows, scale {scale}, {name}: {fast:.2f} ms vs reference {reference:.2f} ms "
                      f"({reference / fast:.1f}x), same tokens: {same}", flush=True)
    penalty = []
    for rows in rows_list:
        logits = (torch.randn(rows, args.vocab, generator=g) * 6.0).to(device)
        calls = {}
        for value in (1.0, 1.1):
            params = SamplingParams(temperature=1.0, repetition_penalty=value, seed=0)
            seqs = [Sequence(torch.randperm(args.vocab, generator=g)[:1024].tolist(), params, 16, [], i, i)
                    for i in range(rows)]
            calls[value] = lambda seqs=seqs, seen=SeenTokens(args.vocab, device): sample_sequences(logits, seqs, seen)
        ms = timed(calls, args.repeats, device)
        penalty.append(dict(rows=rows, off_ms=round(ms[1.0], 3), penalty_ms=round(ms[1.1], 3),
                            added_ms=round(ms[1.1] - ms[1.0], 3)))
        print(f"{rows} rows, sample_sequences T=1: {ms[1.0]:.2f} ms, with repetition_penalty 1.1: {ms[1.1]:.2f} ms",
              flush=True)
    record = dict(benchmark="sampler", machine=machine(device), date=datetime.date.today().isoformat(),
                  git_commit=git_commit(), torch=torch.__version__, vocab=args.vocab, repeats=args.repeats,
                  results=results, repetition_penalty=penalty)
    default = f"sampler_{'cuda' if args.gpu else 'cpu'}.json"
    save_json(args.out or Path(__file__).resolve().parent / "results" / default, record)
    if not all(r["same_tokens"] for r in results):
        sys.exit("the fast sampler drew other tokens than the reference")


if __name__ == "__main__":
    cli(main)
