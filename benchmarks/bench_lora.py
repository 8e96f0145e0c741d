"""LoRA (--use-peft) against full fine-tuning: memory held for training, update time, the adapters' decode cost.

Per model shape, side by side in one process on the same random weights and the same work (one draw of
the update's group and the decode's prompts for all of a shape's rows), what is compared timed in turns (each
round one call of each, the order turned every round; on CUDA each decode's engine built for its turn):
  update  one training update as the trainer runs it (shared-prefix group_logprobs + policy_loss + backward +
          AdamW step; fp32 masters for bf16 weights), full vs LoRA (r=16, alpha=32, all-linear): median time
          over --repeats after a warm-up, and the training state it leaves resident: the distinct storages of
          the parameters, their gradients and the optimizer's state (moments, fp32 masters), measured from the
          tensors. On CUDA also the step's peak allocation (torch.cuda.max_memory_allocated, less what the other
          model holds).
  decode  RolloutEngine.generate on the same prompts: new tokens/s of the plain model, and of the model with
          adapters read live (unmerged) and from merged rollout copies (RolloutEngine(merge_lora=True),
          --lora-merged-rollout in training): median of --repeats calls after a warm-up.
Both models of a shape are held at once (the 1.5B's full fine-tuning state is ~25 GB).
CPU: a small Qwen2-shaped model in fp32. --gpu: Qwen2.5-1.5B's shape (full and LoRA) and Qwen2.5-7B's (LoRA
only: its full fine-tuning state, ~16 bytes a parameter, is more than an 80 GB GPU holds) in bf16.
Writes benchmarks/results/lora_<cpu|cuda>.json; until every row has run, lora_<...>.partial.json (what a time
limit leaves). Usage: python benchmarks/bench_lora.py [--gpu]
"""
import datetime, gc, os, platform, random, statistics, sys  # noqa: E401

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from bench_shared_prefix import QWEN25_15B, SMALL, make_group, step  # noqa: E402
from common import (arg_parser, check_gpu, cli, git_commit, machine, out_path, positive_int, random_model,  # noqa: E402
                    save_json, time_alternating)
from rpo_engine.model import ModelConfig, apply_lora  # noqa: E402
from rpo_engine.optim import MasterWeightAdamW, make_adamw  # noqa: E402
from rpo_engine.rollout import RolloutEngine, SamplingParams  # noqa: E402

QWEN25_7B = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                 num_key_value_heads=4, vocab_size=152064, rope_theta=1e6, tie_word_embeddings=False)


def make_model(shape, device, dtype, lora):
    config = ModelConfig.from_hf_dict(dict(dict(model_type="qwen2", max_position_embeddings=32768,
                                                tie_word_embeddings=True), **shape))
    model = random_model(config, device, dtype).train()
    return apply_lora(model, r=16, alpha=32.0) if lora else model


def resident_bytes(model, optimizer) -> dict:
    """Bytes of the distinct storages held by parameters, gradients and optimizer state (moments, masters)."""
    def total(tensors):
        return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
    params = list(model.parameters())
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    masters = [m for _, m in optimizer.low_precision_pairs()] if isinstance(optimizer, MasterWeightAdamW) else []
    # a bf16 model's gradients sum on its fp32 masters, as the trainer's do (make_adamw below)
    return {"weights": total(params), "grads": total(t.grad for t in params + masters if t.grad is not None),
            "optimizer": total(state + masters)}


def measure_updates(models: dict, groups, repeats) -> dict:
    """One training update of each of `models` (name -> model, all held), timed in turns (time_alternating) after a
    warm-up round. -> name -> its row: median time, the training state it leaves resident and, on CUDA, the peak of
    its own allocations during its steps (the other models' memory left out)."""
    cuda = next(iter(models.values())).device.type == "cuda"
    # as the trainer's, in one process
    optimizers = {name: make_adamw(m, 1e-6, 0.0, fp32_grad_accumulation=True) for name, m in models.items()}
    others, peak = {}, dict.fromkeys(models, 0)

    def held(name):
        return sum(resident_bytes(models[name], optimizers[name]).values())

    def before(name):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            others[name] = torch.cuda.memory_allocated() - held(name)

    def after(name):
        if cuda:
            peak[name] = max(peak[name], torch.cuda.max_memory_allocated() - others[name])

    def update(name):
        def run():
            optimizers[name].zero_grad(set_to_none=False)
            step(models[name], groups, shared=True)  # the forward + loss + backward bench_shared_prefix times
            optimizers[name].step()
        return run

    timings = time_alternating({name: update(name) for name in models}, repeats,
                               sync=torch.cuda.synchronize if cuda else None, before=before, after=after)
    rows = {}
    for name, model in models.items():
        row = {"update_ms": 1e3 * statistics.median(timings[name]["wall"]),
               "update_suffix_tokens": sum(len(s) for g in groups for s in g.suffix_ids),
               "trained_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
               **{f"{k}_gib": v / 2**30 for k, v in resident_bytes(model, optimizers[name]).items()}}
        row["training_state_gib"] = row["weights_gib"] + row["grads_gib"] + row["optimizer_gib"]
        if cuda:
            row["cuda_peak_gib"] = peak[name] / 2**30
        rows[name] = row
    return rows


def measure_decodes(variants: dict, prompts, new_tokens, n, repeats) -> dict:
    """RolloutEngine.generate on `prompts` by each of `variants` (name -> (model, merge_lora)), one call of each a
    round in turns (time_alternating), after each engine's warm-up. On CUDA each engine is built for its turn and
    freed after it (each takes half the GPU's memory); on the CPU all are held. -> name -> (median seconds, tokens)."""
    cuda = next(iter(variants.values()))[0].device.type == "cuda"
    params = SamplingParams(n=n, max_new_tokens=new_tokens, temperature=1.0, stop_token_ids=[], seed=0)  # full budget
    engines = {}

    def open_engine(name):
        if name not in engines:
            model, merge_lora = variants[name]
            engines[name] = RolloutEngine(model, merge_lora=merge_lora)
            warm_up = SamplingParams(n=1, max_new_tokens=4, seed=0)
            engines[name].generate(prompts[:1], warm_up)  # graphs captured, kernels compiled

    def close_engine(name):
        del engines[name]
        torch.cuda.empty_cache()

    if not cuda:
        for name in variants:
            open_engine(name)
    calls = {name: lambda name=name: engines[name].generate(prompts, params) for name in variants}
    timings = time_alternating(calls, repeats, warmup=0, sync=torch.cuda.synchronize if cuda else None,
                               before=open_engine if cuda else None, after=close_engine if cuda else None)
    engines.clear()
    return {name: (statistics.median(t["wall"]), sum(len(c.token_ids) for group in t["results"][-1] for c in group))
            for name, t in timings.items()}


def main(argv=None):
    p = arg_parser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", default=torch.cuda.is_available())
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--out", type=out_path, default=None, help="JSON path (default: benchmarks/results/)")
    args = p.parse_args(argv)
    check_gpu(args.gpu)
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    # (name, shape, run full fine-tuning too?), prefix length, G, prompts x samples x (prompt, new) tokens of the decode
    shapes = [("qwen2.5-1.5b", QWEN25_15B, True), ("qwen2.5-7b", QWEN25_7B, False)] if args.gpu else [("small", SMALL, True)]
    prefix_len, G = (1024, 8) if args.gpu else (512, 8)
    num_prompts, n, prompt_len, new_tokens = (16, 8, 512, 128) if args.gpu else (4, 4, 64, 64)
    rng = random.Random(0)
    print(f"{machine(device)}; {dtype}; update = one group, prefix {prefix_len} + G={G} suffixes of 64-128 tokens, "
          f"median of {args.repeats}; decode = {num_prompts} prompts x {n}, {prompt_len} + {new_tokens} tokens")
    rows = []
    result = {"benchmark": "lora", "machine": machine(device), "platform": platform.platform(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": str(dtype),
              "update_load": {"prefix": prefix_len, "G": G, "suffix_tokens": "uniform 64..128"},
              "decode_load": {"prompts": num_prompts, "n": n, "prompt_tokens": prompt_len, "new_tokens": new_tokens},
              "repeats": args.repeats, "results": rows}
    out = args.out or os.path.join(HERE, "results", f"lora_{'cuda' if args.gpu else 'cpu'}.json")
    for name, shape, with_full in shapes:
        # drawn once for the shape: full fine-tuning and LoRA train and decode the same tokens
        groups = [make_group(prefix_len, G, shape["vocab_size"], rng)]
        prompts = [[rng.randrange(shape["vocab_size"]) for _ in range(prompt_len)] for _ in range(num_prompts)]
        methods = ["full", "lora"] if with_full else ["lora"]
        models = {method: make_model(shape, device, dtype, method == "lora") for method in methods}
        updates = measure_updates(models, groups, args.repeats)
        for model in models.values():
            model.zero_grad(set_to_none=True)
            model.eval()
        decodes = measure_decodes({**{method: (model, False) for method, model in models.items()},
                                   "lora merged": (models["lora"], True)}, prompts, new_tokens, n, args.repeats)
        for method, model in models.items():
            lora = method == "lora"
            row = {"model": name, "params": model.num_parameters(), "method": "lora r=16 all-linear" if lora else "full",
                   **updates[method]}
            seconds, tokens = decodes[method]
            row.update(decode_s=seconds, new_tokens=tokens, tokens_per_s=tokens / seconds)
            if lora:
                seconds, tokens = decodes["lora merged"]
                row.update(merged_decode_s=seconds, merged_tokens_per_s=tokens / seconds)
            rows.append(row)
            print(f"{name:>13} {row['method']:>20}: update {row['update_ms']:8.0f} ms, training state "
                  f"{row['training_state_gib']:6.2f} GiB (weights {row['weights_gib']:.2f}, grads {row['grads_gib']:.2f}, "
                  f"optimizer {row['optimizer_gib']:.2f})" + (f", peak {row['cuda_peak_gib']:.1f} GiB" if args.gpu else "")
                  + f"; decode {row['tokens_per_s']:6.0f} tokens/s"
                  + (f" ({row['merged_tokens_per_s']:.0f} merged)" if lora else ""))
            result["load_avg_1m"] = os.getloadavg()[0]  # other jobs skew the times, not memory
            save_json(out, result, partial=True)  # after every row: a time limit keeps what was measured
        del models, updates
        gc.collect()
        if args.gpu:
            torch.cuda.empty_cache()
    save_json(out, result)


if __name__ == "__main__":
    cli(main)
