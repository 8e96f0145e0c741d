"""Shared-prefix training vs the plain padded batch: forward+backward time and activation memory.

RPO-shaped load: one group per micro-batch, prefix (prompt + kept path) of 1024-2048 tokens, G = 8 and
16 suffixes of 64-128 tokens (~5%), the loss over the suffix tokens. One step = group_logprobs (fused
LM-head log-probs) + policy_loss + backward, both paths side by side in one process on the same
random-weight model, alternating (each round times each path once, the order turned every round). Time:
median of --repeats after one warm-up round, wall clock and (on CPU) this process's CPU time, which other
jobs on a shared machine disturb less. Activation memory: bytes of the
distinct tensors autograd saves for backward (a saved-tensors hook; parameters excluded), on every
device; on CUDA also torch.cuda.max_memory_allocated minus what was allocated before the step.
CPU: a small Qwen2-shaped model in fp32. --gpu (default on CUDA): Qwen2.5-1.5B's shape in bf16.
Writes benchmarks/results/shared_prefix_<cpu|cuda>.json; until every load has run, shared_prefix_<...>.partial.json
(what a time limit leaves). Usage: python benchmarks/bench_shared_prefix.py
"""
import argparse, datetime, os, platform, random, sys  # noqa: E401

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import (arg_parser, check_gpu, cli, git_commit, machine, out_path, positive_int, random_model,  # noqa: E402
                    compare_steps, saved_activation_bytes, save_json, step_columns, time_steps)
from rpo_engine.kernels import policy_loss  # noqa: E402
from rpo_engine.model import ModelConfig  # noqa: E402
from rpo_engine.model.shared_prefix import PrefixGroup, group_logprobs, layout_tokens  # noqa: E402

SMALL = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=8192)
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, rope_theta=1e6)
LOADS = [(1024, 8), (2048, 8), (2048, 16)]  # (prefix length, G)


def load(text: str) -> tuple[int, int]:
    """--loads "1024:8": a prefix length and a group size G, both at least 1."""
    prefix, _, group = text.partition(":")
    if not (prefix.isdigit() and group.isdigit() and int(prefix) > 0 and int(group) > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not PREFIX:G, two positive integers")
    return int(prefix), int(group)


def make_group(prefix_len, G, vocab, rng):
    tokens = lambda n: [rng.randrange(vocab) for _ in range(n)]  # noqa: E731
    return PrefixGroup(tokens(prefix_len), [tokens(rng.randint(64, 128)) for _ in range(G)], prefix_len,
                       advantages=[rng.gauss(0, 1) for _ in range(G)])


def step(model, groups, shared):
    logp, mask = group_logprobs(model, groups, shared=shared)
    adv = torch.tensor([a for g in groups for a in g.advantages], device=logp.device)
    loss, _ = policy_loss(logp, logp.detach(), adv, mask, loss_agg="seq-mean-token-mean")
    loss.backward()




def measure(model, groups, repeats):
    """The padded and the shared layout of `groups`, timed alternately (time_steps) -> (padded row, shared row)."""
    timed = time_steps({shared: (model, lambda shared=shared: step(model, groups, shared)) for shared in (False, True)},
                       repeats)
    rows = []
    for shared in (False, True):
        row = {"layout_tokens": layout_tokens(groups, shared), **timed[shared][0]}
        if not row.get("oom"):  # the padded batch of the 1.5B shape at G=16 may not fit
            try:
                saved = saved_activation_bytes(model.parameters(), lambda: step(model, groups, shared))
                row["saved_mib"] = saved / 2**20
            except torch.cuda.OutOfMemoryError:
                torch.cuda.empty_cache()
                row = {"layout_tokens": row["layout_tokens"], "oom": True}
            model.zero_grad(set_to_none=True)
        rows.append(row)
    return rows


def main(argv=None):
    p = arg_parser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", default=torch.cuda.is_available())
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--loads", type=load, nargs="+", default=LOADS, metavar="PREFIX:G",
                   help="prefix length and group size of each load (default: 1024:8 2048:8 2048:16)")
    p.add_argument("--out", type=out_path, default=None, help="JSON path (default: benchmarks/results/)")
    args = p.parse_args(argv)
    check_gpu(args.gpu)
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    shape = QWEN25_15B if args.gpu else SMALL
    config = ModelConfig.from_hf_dict(dict(model_type="qwen2", max_position_embeddings=32768, tie_word_embeddings=True,
                                           **shape))
    model = random_model(config, device, dtype).train()
    print(f"{machine('cuda' if args.gpu else 'cpu')}; {model.num_parameters() / 1e6:.1f}M params {dtype}; "
          f"fwd+bwd median of {args.repeats}; memory = bytes saved for backward")
    print(f"{'prefix':>6} {'G':>3} {'path':>7} {'tokens':>7} {'ms':>8} {'cpu ms':>8} {'saved MiB':>10} {'cuda MiB':>9} "
          f"{'speedup':>8} {'mem /':>6}")
    rows, rng = [], random.Random(0)
    result = {"machine": machine("cuda" if args.gpu else "cpu"), "platform": platform.platform(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(dtype), "model": shape,
              "suffix_tokens": "uniform 64..128", "repeats": args.repeats,
              "memory_method": "distinct storages saved for backward (saved_tensors_hooks), parameters excluded"
                               + ("; cuda max_memory_allocated delta" if args.gpu else ""),
              "results": rows}
    out = args.out or os.path.join(HERE, "results", f"shared_prefix_{'cuda' if args.gpu else 'cpu'}.json")
    for prefix_len, G in args.loads:
        groups = [make_group(prefix_len, G, config.vocab_size, rng)]
        plain, shared = measure(model, groups, args.repeats)
        plain.update(path="padded", prefix=prefix_len, G=G)
        shared.update(path="shared", prefix=prefix_len, G=G)
        compare_steps(plain, shared)
        for r in (plain, shared):
            print(f"{prefix_len:>6} {G:>3} {r['path']:>7} {r['layout_tokens']:>7} {step_columns(r)}")
        rows += [plain, shared]
        result["load_avg_1m"] = os.getloadavg()[0]  # other jobs skew the times, not memory
        save_json(out, result, partial=True)  # after every load: a time limit keeps what was measured
    save_json(out, result)


if __name__ == "__main__":
    cli(main)
