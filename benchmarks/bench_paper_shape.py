"""RPO vs full-path GRPO at the paper's lengths: one rollout + update step on a random-weight model.

The RPO paper (arXiv 2601.19404) trains on reasoning paths of 1-2k tokens and regenerates only a
suffix (its code cuts U{1..299} tokens). The built-in task's paths are a few hundred tokens, so this
benchmark reads the token and step-time reduction at paper lengths directly:
  full path: B prompts, G samples of `--full-len` new tokens each (no stop tokens: fixed lengths);
  RPO:       B prefixes = prompt + (full_len - suffix_len) cached tokens, G suffixes of `--suffix-len`.
The update is one forward+backward over each sample with the fused LM-head log-prob kernel and the
clipped-ratio loss on the generated tokens only (the suffix for RPO, as the trainer does), then the
trainer's AdamW step (rpo_engine.optim.make_adamw: fp32 master weights for bf16; the JSON's settings.optimizer
names it), through the trainer's own path: a group's prefix runs once in forward and backward
(shared-prefix layout) where that costs fewer FLOPs, which is every RPO group here; full-path groups
(short prompt, long completions) run padded. `--no-prefix-sharing` pads every group, to compare.
Medians over --repeats, full and RPO interleaved in one process. With --gpu (or --cascade-variant) RPO
also runs on a second engine with triton_cascade=True, each prefix's K/V read once for its G suffixes
(on the CPU through the Triton interpreter: run with TRITON_INTERPRET=1).

    python benchmarks/bench_paper_shape.py                 # CPU: small model, 1 x 8 samples of 1536 tokens
    python benchmarks/bench_paper_shape.py --gpu           # CUDA: Qwen2.5-1.5B shape, bf16, 8 x 8 samples
Writes benchmarks/results/paper_shape_<cpu|cuda>.json (or --out PATH); until the last step has run,
paper_shape_<...>.partial.json (what a time limit leaves).
"""
import argparse, datetime, json, os, random, statistics, time  # noqa: E401
from pathlib import Path

import torch

from common import arg_parser, check_gpu, cli, git_commit, machine, out_path, positive_int, random_model, save_json
from rpo_engine.errors import UserError
from rpo_engine.kernels import policy_loss
from rpo_engine.kernels.fused_logprobs import _triton_interpreted
from rpo_engine.model.config import ModelConfig
from rpo_engine.model.shared_prefix import PrefixGroup, group_logprobs, plan_micro_batches
from rpo_engine.optim import make_adamw, params_with_gradients
from rpo_engine.rollout import RolloutEngine, SamplingParams

CPU_SHAPE = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, max_position_embeddings=4096, rope_theta=1e6)
QWEN25_15B = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768, rope_theta=1e6)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def update(model, optimizer, groups, micro_batch_tokens, norm_length, prefix_sharing):
    """One optimizer step over the groups, as Trainer.update does it: groups are the micro-batch unit, a
    group runs its prefix once (shared layout) where `sharing_pays`, else one padded row per sample."""
    optimizer.zero_grad(set_to_none=True)
    total = sum(len(g.suffix_ids) for g in groups)
    for batch, shared in plan_micro_batches(groups, model.config, micro_batch_tokens, prefix_sharing):
        logp, mask = group_logprobs(model, batch, shared=shared)  # [S, span]
        adv = torch.tensor([a for g in batch for a in g.advantages], device=model.device)
        loss, _ = policy_loss(logp, logp.detach(), adv, mask, norm_length=norm_length)
        (loss * len(adv) / total).backward()
    torch.nn.utils.clip_grad_norm_(params_with_gradients(optimizer), 1.0)
    optimizer.step()


def one_step(model, engine, optimizer, prompts, cached, args, seed):
    """Rollout + update; `cached` is None for the full path, else each prompt's cached path (RPO)."""
    device, rng = model.device, random.Random(seed)
    prefixes = prompts if cached is None else [p + c for p, c in zip(prompts, cached)]
    new_tokens = args.full_len if cached is None else args.suffix_len
    params = SamplingParams(n=args.num_generations, max_new_tokens=new_tokens, temperature=1.0, top_p=1.0, top_k=0,
                            stop_token_ids=[], seed=seed)  # [] never stops early: fixed lengths
    sync(device)
    t0 = time.perf_counter()
    outs = engine.generate(prefixes, params)
    sync(device)
    t1 = time.perf_counter()
    groups = [PrefixGroup(prefix, [o.token_ids for o in group], len(prefix),
                          advantages=[rng.gauss(0, 1) for _ in group]) for prefix, group in zip(prefixes, outs)]
    update(model, optimizer, groups, args.micro_batch_tokens, args.full_len, args.prefix_sharing)
    sync(device)
    t2 = time.perf_counter()
    generated = sum(len(o.token_ids) for group in outs for o in group)
    return dict(generated_tokens=generated, prefill_tokens=engine.last_stats.prefill_tokens,
                trained_tokens=sum(len(x) for g in groups for x in g.suffix_ids),
                padded_forward_tokens=sum(len(g.prefix_ids) + len(x) - 1 for g in groups for x in g.suffix_ids),
                rollout_s=t1 - t0, update_s=t2 - t1, step_s=t2 - t0)


def main(argv=None):
    ap = arg_parser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpu", action="store_true", default=torch.cuda.is_available())
    ap.add_argument("--cpu", dest="gpu", action="store_false")
    ap.add_argument("--prompts", type=positive_int, default=None, help="prompts per step B (default: 1 CPU, 8 GPU)")
    ap.add_argument("--num-generations", type=positive_int, default=8, help="samples per prompt G")
    ap.add_argument("--prompt-len", type=positive_int, default=128)
    ap.add_argument("--full-len", type=positive_int, default=1536, help="full-path completion length")
    ap.add_argument("--suffix-len", type=positive_int, default=100,
                    help="RPO suffix length, at most --full-len (cached path = full-len - this)")
    ap.add_argument("--repeats", type=positive_int, default=3)
    ap.add_argument("--micro-batch-tokens", type=positive_int, default=None, help="default: 16384 CPU, 8192 GPU")
    ap.add_argument("--out", type=out_path, default=None)
    ap.add_argument("--no-prefix-sharing", dest="prefix_sharing", action="store_false",
                    help="update with one padded row per sample (the trainer's --no-prefix-sharing)")
    ap.add_argument("--cascade-variant", action=argparse.BooleanOptionalAction, default=None,
                    help="also run RPO with a second engine, Triton decode with triton_cascade=True (its own "
                         "small K/V budget); default on with --gpu (on the CPU it is the Triton interpreter, "
                         "TRITON_INTERPRET=1: slow)")
    args = ap.parse_args(argv)
    check_gpu(args.gpu)
    device = torch.device("cuda" if args.gpu else "cpu")
    dtype = torch.bfloat16 if args.gpu else torch.float32
    shape = QWEN25_15B if args.gpu else CPU_SHAPE
    if args.suffix_len > args.full_len:
        raise UserError(f"--suffix-len {args.suffix_len} is longer than --full-len {args.full_len}, the path it ends")
    if args.prompt_len + args.full_len > shape["max_position_embeddings"]:
        raise UserError(f"--prompt-len + --full-len ({args.prompt_len + args.full_len}) is more than the model's "
                        f"{shape['max_position_embeddings']} positions")
    cascade = args.gpu if args.cascade_variant is None else args.cascade_variant
    if cascade and not args.gpu and not _triton_interpreted():  # the engine's own check, before the model is made
        raise UserError("--cascade-variant on the CPU runs the Triton kernels through the interpreter: run with "
                        "TRITON_INTERPRET=1")
    args.prompts = args.prompts or (8 if args.gpu else 1)
    args.micro_batch_tokens = args.micro_batch_tokens or (8192 if args.gpu else 16384)
    config = ModelConfig.from_hf_dict(dict(model_type="qwen2", tie_word_embeddings=True, eos_token_id=2,
                                           bos_token_id=1, pad_token_id=0, **shape))
    model = random_model(config, device, dtype)
    if args.gpu:  # 1.5B at 8k tokens per micro-batch: keep only each layer's input, recompute the rest
        model.gradient_checkpointing_enable()
    model.train()
    # the trainer's: fp32 masters for bf16 weights, the micro-batches' gradients summed on them; their cost timed too
    optimizer = make_adamw(model, 1e-6, 0.0, fp32_grad_accumulation=True)
    engine = RolloutEngine(model)
    engines = {"full": engine, "rpo": engine}
    if cascade:
        # Room for every sample's whole path without sharing: the first engine holds its share of the GPU.
        blocks = args.prompts * args.num_generations * -(-(args.prompt_len + args.full_len) // 16)
        engines["rpo_cascade"] = RolloutEngine(model, attention_backend="triton", triton_cascade=True,
                                               num_blocks=blocks, max_num_seqs=args.prompts * args.num_generations)
    g = torch.Generator().manual_seed(0)
    V = shape["vocab_size"]
    prompts = torch.randint(3, V, (args.prompts, args.prompt_len), generator=g).tolist()
    # The cached paths stand in for each prompt's last full completion (random tokens: the model is random too).
    cached = torch.randint(3, V, (args.prompts, args.full_len - args.suffix_len), generator=g).tolist()

    # Warm-up: allocator, CUDA graphs, Triton compiles, on short lengths.
    warm = argparse.Namespace(**{**vars(args), "full_len": 16, "suffix_len": 8})
    for name, eng in engines.items():
        one_step(model, eng, optimizer, [p[:32] for p in prompts], None if name == "full" else [c[:8] for c in cached],
                 warm, seed=0)
    runs = {name: [] for name in engines}
    result = dict(benchmark="paper_shape", device=device.type, machine=machine(device),
                  date=datetime.datetime.now().isoformat(timespec="seconds"),
                  git_commit=git_commit(),
                  torch=torch.__version__, threads=torch.get_num_threads(), dtype=str(dtype), model=shape,
                  num_parameters=model.num_parameters(),
                  load_average_1_5_15=os.getloadavg() if device.type == "cpu" else None,
                  settings=dict(prompts=args.prompts, num_generations=args.num_generations, prompt_len=args.prompt_len,
                                full_len=args.full_len, suffix_len=args.suffix_len,
                                cached_len=args.full_len - args.suffix_len, repeats=args.repeats,
                                micro_batch_tokens=args.micro_batch_tokens,
                                gradient_checkpointing=bool(args.gpu), optimizer=type(optimizer).__name__,
                                prefix_sharing=args.prefix_sharing,
                                update=("the trainer's path: shared-prefix groups where sharing_pays, else padded"
                                        if args.prefix_sharing else "padded batch: every sample runs its whole prefix")
                                       + "; loss on generated tokens only"),
                  runs=runs)
    out = args.out or Path(__file__).parent / "results" / f"paper_shape_{device.type}.json"
    for r in range(args.repeats):  # interleaved, so drift on a shared box hits all alike
        for name, eng in engines.items():
            runs[name].append(one_step(model, eng, optimizer, prompts, None if name == "full" else cached, args,
                                       seed=1 + r))
            print(name, json.dumps({k: round(v, 3) for k, v in runs[name][-1].items()}), flush=True)
            save_json(out, result, partial=True)  # after every step: a time limit keeps what was measured
    med = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    full, rpo = med["full"], med["rpo"]
    reduction = {k: 1 - rpo[k] / full[k] for k in ("generated_tokens", "rollout_s", "update_s", "step_s")}
    if "rpo_cascade" in med:  # the same RPO step, its rollout reading each prefix's K/V once for the G suffixes
        print(f"RPO rollout with triton_cascade: {med['rpo_cascade']['rollout_s']:.3f} s vs {rpo['rollout_s']:.3f} s")
    print(f"RPO vs full path: generated tokens {-reduction['generated_tokens']:+.1%}, rollout time "
          f"{-reduction['rollout_s']:+.1%}, update time {-reduction['update_s']:+.1%}, step time {-reduction['step_s']:+.1%}"
          f" (paper: ~95% fewer tokens, 72-90% less training time)")
    result.update(median=med, reduction=reduction)
    save_json(out, result)


if __name__ == "__main__":
    cli(main)
