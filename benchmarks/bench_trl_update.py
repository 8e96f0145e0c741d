"""TRL's update on an RPO batch: GRPOTrainer's loss pass vs SharedPrefixGRPOTrainer's, time and activation memory.

One pass = TRL's `_compute_loss` (every completion token's log-prob, the clipped loss, TRL's metrics) and its
backward, on the `inputs` TRL builds for one RPO group: a prompt of 64 tokens; a completion of kept path (prefix
- prompt) + a suffix of 64-128 tokens for each of G samples; `tool_mask` (RPORollout's env_mask) 0 over the kept
path, so the loss covers the suffixes; random nonzero advantages (every row trains). The two trainers run on two
identical random-weight transformers Qwen2 models (seed 0), side by side in one process, alternating (each round
times each once, the order turned every round); median of --repeats after one warm-up round. Activation memory:
bytes of the distinct tensors autograd saves for backward (parameters excluded); on CUDA also the peak allocated.
The losses and the largest gradient difference are recorded: the same computation. CPU: a small Qwen2 shape in fp32; --gpu (default on CUDA): Qwen2.5-1.5B's in bf16.
Writes benchmarks/results/trl_update_<cpu|cuda>.json; until every load has run, trl_update_<...>.partial.json.
Needs TRL (`pip install -e ".[bench]"`). Usage: python benchmarks/bench_trl_update.py
"""
import datetime, os, platform, random, sys, tempfile  # noqa: E401

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
from common import (arg_parser, check_gpu, cli, git_commit, machine, out_path, positive_int,  # noqa: E402
                    compare_steps, saved_activation_bytes, save_json, step_columns, time_steps)
from bench_shared_prefix import LOADS, QWEN25_15B, SMALL  # noqa: E402  (our update's benchmark: the same shapes)
from rpo_engine.errors import UserError  # noqa: E402

PROMPT = 64  # of each LOADS prefix: the rest is the kept path


def load(text: str) -> tuple[int, int]:
    """argparse type of --loads: PREFIX:G, a prefix longer than the prompt's 64 tokens."""
    import argparse

    try:
        prefix, G = map(int, text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected PREFIX:G, e.g. 1024:8") from None
    if prefix <= PROMPT or G < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: the prefix must exceed the {PROMPT}-token prompt, G >= 1")
    return prefix, G


def trainers(shape, device, dtype, G, max_len, output):
    """GRPOTrainer and SharedPrefixGRPOTrainer, each on its own copy of the same random model."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from datasets import Dataset
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from rpo_engine.data.starter import tiny_task_model
    from rpo_engine.integrations.trl import SharedPrefixGRPOTrainer

    _, tokenizer = tiny_task_model()  # pad and eos ids only: the batch is made of ids, never decoded
    config = Qwen2Config(**shape, max_position_embeddings=32768, tie_word_embeddings=True)
    made = []
    for cls in (GRPOTrainer, SharedPrefixGRPOTrainer):
        torch.manual_seed(0)
        with torch.device(device):
            model = Qwen2ForCausalLM(config).to(dtype)
        args = GRPOConfig(output_dir=str(output), per_device_train_batch_size=G, num_generations=G,
                          max_completion_length=max_len, loss_type="grpo", beta=0.0, gradient_checkpointing=False,
                          use_cpu=device == "cpu", bf16=device == "cuda", report_to="none", disable_tqdm=True)
        trainer = cls(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                      train_dataset=Dataset.from_list([{"prompt": "1+1="}] * G), processing_class=tokenizer)
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # what TRL's training loop sets before a loss
        made.append(trainer)
    return made


def rpo_inputs(prefix_len, G, vocab, device, rng):
    """TRL's inputs for one RPO group: prompt, kept path + suffix per sample, tool_mask 0 over the kept path."""
    tokens = lambda n: [rng.randrange(3, vocab) for _ in range(n)]  # noqa: E731
    kept = tokens(prefix_len - PROMPT)
    completions = [kept + tokens(rng.randint(64, 128)) for _ in range(G)]
    width = max(map(len, completions))
    ids = torch.zeros(G, width, dtype=torch.long)
    mask, tool_mask = torch.zeros(G, width, dtype=torch.long), torch.zeros(G, width, dtype=torch.long)
    for r, c in enumerate(completions):
        ids[r, :len(c)], mask[r, :len(c)], tool_mask[r, len(kept):len(c)] = torch.tensor(c), 1, 1
    inputs = dict(prompt_ids=torch.tensor([tokens(PROMPT)] * G), prompt_mask=torch.ones(G, PROMPT, dtype=torch.long),
                  completion_ids=ids, completion_mask=mask, tool_mask=tool_mask,
                  advantages=torch.tensor([rng.choice((-1, 1)) * rng.uniform(0.5, 1.5) for _ in range(G)]),
                  num_items_in_batch=tool_mask.sum())
    return {k: v.to(device) for k, v in inputs.items()}


def loss_pass(trainer, inputs):
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    return loss.detach().float().item()


def measure(plain_trainer, shared_trainer, inputs, repeats):
    """Both trainers' loss passes on `inputs`, timed alternately (time_steps) -> for each, (time and memory row
    with the loss, the last timed pass's gradients; None on CUDA OOM)."""
    trainers = {"plain": plain_trainer, "shared": shared_trainer}
    timed = time_steps({name: (t.model, lambda t=t: loss_pass(t, inputs)) for name, t in trainers.items()}, repeats)
    measured = []
    for name, trainer in trainers.items():
        model, (row, loss) = trainer.model, timed[name]
        if row.get("oom"):  # the padded batch of the 1.5B shape at G=16 may not fit
            measured.append((row, None))
            continue
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        try:
            row.update(loss=loss, saved_mib=saved_activation_bytes(model.parameters(),
                                                                   lambda: loss_pass(trainer, inputs)) / 2**20)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            row, grads = {"oom": True}, None
        model.zero_grad(set_to_none=True)
        measured.append((row, grads))
    return measured


def main(argv=None):
    p = arg_parser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu", action="store_true", default=torch.cuda.is_available())
    p.add_argument("--repeats", type=positive_int, default=3)
    p.add_argument("--loads", type=load, nargs="+", default=LOADS, help="PREFIX:G each (default: 1024:8 2048:8 2048:16)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model of hidden size 64 (a smoke test)")
    p.add_argument("--out", type=out_path, default=None, help="JSON path (default: benchmarks/results/)")
    args = p.parse_args(argv)
    check_gpu(args.gpu)
    try:
        import datasets, trl  # noqa: E401, F401
    except ImportError as e:
        raise UserError(f"bench_trl_update needs the {e.name or 'trl'} package: pip install -e \".[bench]\"") from None
    device, dtype = ("cuda", torch.bfloat16) if args.gpu else ("cpu", torch.float32)
    shape = dict(SMALL, hidden_size=64, intermediate_size=128, num_hidden_layers=2) if args.tiny else (
        QWEN25_15B if args.gpu else SMALL)
    rows, rng = [], random.Random(0)
    result = {"machine": machine(device), "platform": platform.platform(),
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "git_commit": git_commit(),
              "torch": torch.__version__, "trl": trl.__version__, "threads": torch.get_num_threads(),
              "dtype": str(dtype), "model": shape, "prompt_tokens": PROMPT, "suffix_tokens": "uniform 64..128",
              "repeats": args.repeats, "results": rows,
              "memory_method": "distinct storages saved for backward (saved_tensors_hooks), parameters excluded"
                               + ("; cuda max_memory_allocated delta" if args.gpu else "")}
    out = args.out or os.path.join(HERE, "results", f"trl_update_{device}.json")
    print(f"{result['machine']}; TRL {trl.__version__}; {dtype}; loss pass + backward, median of {args.repeats}")
    print(f"{'prefix':>6} {'G':>3} {'trainer':>22} {'ms':>8} {'cpu ms':>8} {'saved MiB':>10} {'cuda MiB':>9} "
          f"{'speedup':>8} {'mem /':>6}")
    with tempfile.TemporaryDirectory() as tmp:
        for prefix_len, G in args.loads:
            plain_trainer, shared_trainer = trainers(shape, device, dtype, G, prefix_len - PROMPT + 128, tmp)
            inputs = rpo_inputs(prefix_len, G, shape["vocab_size"], device, rng)
            (plain, plain_grads), (shared, shared_grads) = measure(plain_trainer, shared_trainer, inputs, args.repeats)
            plain.update(trainer="GRPOTrainer", prefix=prefix_len, G=G)
            shared.update(trainer="SharedPrefixGRPOTrainer", prefix=prefix_len, G=G)
            compare_steps(plain, shared)
            if plain_grads is not None and shared_grads is not None:
                shared["max_grad_difference"] = max((plain_grads[n] - g).abs().max().item()
                                                    for n, g in shared_grads.items())
            for r in (plain, shared):
                print(f"{prefix_len:>6} {G:>3} {r['trainer']:>22} {step_columns(r)}")
            rows += [plain, shared]
            del plain_trainer, shared_trainer, plain_grads, shared_grads
            if args.gpu:
                torch.cuda.empty_cache()
            result["load_avg_1m"] = os.getloadavg()[0]
            save_json(out, result, partial=True)  # after every load: a time limit keeps what was measured
    save_json(out, result)


if __name__ == "__main__":
    cli(main)
