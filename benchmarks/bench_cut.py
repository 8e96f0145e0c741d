"""Where to cut a wrong reasoning path: suffixes regrown from a uniform cut vs from its least likely token.

RPO cuts a cached path that is not known to be right anywhere along it (`--rpo-unverified-cut uniform`,
as the paper's code cuts a cold start), or just before its least likely token (`least-likely`: the
token the policy found least probable when it sampled it, where a wrong path most often went wrong).
This measures the two rules on the same paths, without training: for each seed, one full completion
(a cold start) of each of N training prompts at the sampling temperature; each wrong one is cut by
each rule and G suffixes are regrown from the kept prefix. Reported per rule: the suffixes' success
rate (the whole answer right), the groups with both right and wrong answers (the ones GRPO learns
from), and the tokens generated per suffix. The right cold starts are cut the same two ways within a
verified path's bounds (`--max-cut-fraction`; the trainer draws those uniformly), to show whether the
rule would matter there. The bounds default to those the committed figures were measured with (a wrong
path cut anywhere, a right one by at most a quarter), not the trainer's defaults. The model runs where a
training run would put it (--device auto: CUDA when there is one, in bf16), and the file is named for
it: benchmarks/results/cut_<device>.json.

    python benchmarks/bench_cut.py                          # the starter model, 64 prompts x 3 seeds, G = 8
    python benchmarks/bench_cut.py --model DIR --prompts 16 --seeds 0
"""
from __future__ import annotations

import argparse
import datetime
import random
import statistics
from pathlib import Path

import torch

import rpo_engine
from common import arg_parser, cli, fraction, git_commit, machine, out_path, positive_int, save_json
from rpo_engine.config import RPOConfig, TrainConfig
from rpo_engine.data.arithmetic import make_split
from rpo_engine.rewards import is_correct, score_completions
from rpo_engine.rollout import RolloutEngine, SamplingParams
from rpo_engine.rpo.truncation import cut_cached_path, least_likely_truncation
from rpo_engine.train import resolve_device, resolve_reward
from rpo_engine.trainer import encode_prompt

RULES = ("uniform", "least-likely")


def measure(engine, tokenizer, reward_fn, seed: int, args) -> dict:
    rows = make_split("train", args.prompts, seed)
    prompts = [encode_prompt(tokenizer, r, 10**6) for r in rows]

    def right(row, ids) -> bool:
        return is_correct(score_completions(reward_fn, [tokenizer.decode(ids, skip_special_tokens=True)], [row], [ids])[0])

    def params(n, budget, salt):
        return SamplingParams(n=n, max_new_tokens=budget, temperature=args.temperature, seed=seed * 1009 + salt)

    cold = engine.generate(prompts, params(1, args.max_completion_length, 0))
    paths = {"wrong": [], "right": []}
    for row, prompt, out in zip(rows, prompts, cold):
        paths["right" if right(row, out[0].token_ids) else "wrong"].append((row, prompt, out[0]))
    wrong = paths["wrong"]
    result = {"seed": seed, "cold_right": len(paths["right"]), "wrong_paths": len(wrong),
              "mean_wrong_path_tokens": statistics.mean(len(c.token_ids) for _, _, c in wrong) if wrong else 0.0}

    def regrow(group, cuts, salt) -> dict:
        outs = engine.generate([p + c.token_ids[:cut.kept] for (_, p, c), cut in zip(group, cuts)],
                               [params(args.num_generations, cut.budget, salt + i) for i, cut in enumerate(cuts)])
        wins = [[right(row, c.token_ids[:cut.kept] + s.token_ids) for s in out]
                for (row, _, c), cut, out in zip(group, cuts, outs)]
        samples = max(1, len(group) * args.num_generations)
        return {"suffix_success": sum(map(sum, wins)) / samples,
                "mixed_groups": sum(0 < sum(w) < len(w) for w in wins),
                "groups_with_a_right_answer": sum(any(w) for w in wins),
                "tokens_per_suffix": sum(len(s.token_ids) for out in outs for s in out) / samples,
                "mean_cut": statistics.mean(cut.cut for cut in cuts) if cuts else 0.0}

    for rule in RULES:
        rng = random.Random(seed)
        rpo = RPOConfig(rpo_unverified_cut=rule, rpo_unverified_cut_fraction=args.unverified_cut_fraction,
                        rpo_max_cut_fraction=args.max_cut_fraction)
        cuts = [cut_cached_path(len(c.token_ids), False, rng, args.max_completion_length, rpo, c.logprobs)
                for _, _, c in wrong]
        result[rule] = regrow(wrong, cuts, 1)
        bounds = (rpo.rpo_min_cut, rpo.rpo_max_cut, rpo.rpo_max_cut_fraction, rpo.rpo_extra_budget,
                  args.max_completion_length)
        cuts = [cut_cached_path(len(c.token_ids), True, rng, args.max_completion_length, rpo) if rule == "uniform"
                else least_likely_truncation(c.logprobs, *bounds) for _, _, c in paths["right"]]
        result[f"verified {rule}"] = regrow(paths["right"], cuts, 100_003)
    return result


def main(argv=None):
    parser = arg_parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="model directory (default: the starter model, built if missing)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompts", type=positive_int, default=64)
    parser.add_argument("--num-generations", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=320)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--unverified-cut-fraction", type=fraction, default=1.0,
                        help="a wrong path is cut within this last fraction of it (1.0: anywhere)")
    parser.add_argument("--max-cut-fraction", type=fraction, default=0.25, help="a right path's bound")
    parser.add_argument("--reward", default="exact", help="as the trainer's --reward: exact, math or module:function")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="as the trainer's --device (auto: CUDA when there is one)")
    parser.add_argument("--out", type=out_path, default=None, help="JSON path (default: results/cut_<device>.json)")
    args = parser.parse_args(argv)
    # the trainer's checks of the options it shares, and its device and dtype, before a model is loaded
    config = TrainConfig(reward=args.reward, device=args.device, num_generations=args.num_generations,
                         max_completion_length=args.max_completion_length, temperature=args.temperature)
    device, dtype = resolve_device(config)
    reward_fn = resolve_reward(config)
    if args.model is None:
        from rpo_engine.data.starter import ensure_starter_model
        args.model = str(ensure_starter_model())
    torch.manual_seed(0)
    model = rpo_engine.load_model(args.model, dtype=dtype, device=device)
    engine, tokenizer = RolloutEngine(model), rpo_engine.load_tokenizer(args.model)
    runs = []
    for seed in args.seeds:
        runs.append(measure(engine, tokenizer, reward_fn, seed, args))
        r = runs[-1]
        print(f"seed {seed}: {r['wrong_paths']} wrong cold paths of {args.prompts} (~{r['mean_wrong_path_tokens']:.0f} tokens); "
              + "; ".join(f"{rule}: suffixes right {r[rule]['suffix_success']:.3f}, mixed groups {r[rule]['mixed_groups']}, "
                          f"{r[rule]['tokens_per_suffix']:.1f} tokens a suffix" for rule in RULES)
              + f"; {r['cold_right']} right cold paths, " + "; ".join(
                  f"cut as verified, {rule}: suffixes right {r['verified ' + rule]['suffix_success']:.3f}, mixed groups "
                  f"{r['verified ' + rule]['mixed_groups']}" for rule in RULES))
    cases = [*RULES, *(f"verified {rule}" for rule in RULES)]
    summary = {case: {key: statistics.mean(r[case][key] for r in runs)
                      for key in ("suffix_success", "mixed_groups", "tokens_per_suffix", "mean_cut")} for case in cases}
    save_json(args.out or Path(__file__).parent / "results" / f"cut_{device.type}.json", {
        "benchmark": "bench_cut", "machine": machine(device), "date": datetime.date.today().isoformat(),
        "git_commit": git_commit(), "torch": torch.__version__, "model": args.model, "dtype": str(dtype),
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "model"},
        "summary": summary, "runs": runs})


if __name__ == "__main__":
    cli(main)
