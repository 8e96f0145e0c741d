"""A GRPO training loop with RPO, written by hand from rpo_engine's pieces (no Trainer).

Each step, top to bottom: pick prompts -> build prefixes (prompt + the kept part of the cached path)
-> RolloutEngine.generate on the live model -> rewards on kept path + suffix -> group advantages ->
experience-cache update -> fused log-probs of the suffix tokens -> clipped-ratio loss -> AdamW step.

Where this departs from rpo_engine.trainer (to stay short): a prompt without a cached path gets a
full-path group (G complete samples) instead of one cold-start completion followed by suffixes; one
forward per step (no micro-batching); no checkpoints or KL. `--eval-every N` evaluates the live model in memory
(rpo_engine.eval.evaluate, no save) on the built-in task's held-out rows.

    python examples/custom_loop.py                   # the built-in starter model (built once, ~3 min on CPU)
    python examples/custom_loop.py --tiny --steps 3  # a tiny random model: seconds, for a smoke test
    python examples/custom_loop.py --tiny --reward tests.reward_fns:hash_reward   # a reward that varies
    python examples/custom_loop.py --lora-r 8 --learning-rate 1.5e-4   # LoRA adapters on a frozen base
    python examples/custom_loop.py --eval-every 5    # greedy accuracy on held-out rows every 5 steps and at the end
"""
import argparse
import json
import random
import time
from pathlib import Path

import torch

import rpo_engine
from rpo_engine.algos import group_advantages
from rpo_engine.data.arithmetic import make_split
from rpo_engine.eval import evaluate
from rpo_engine.kernels import policy_loss
from rpo_engine.model import apply_lora, save_adapter
from rpo_engine.model.shared_prefix import PrefixGroup, group_logprobs
from rpo_engine.rewards import exact_answer_reward, load_reward_fn, score_completions
from rpo_engine.rollout import RolloutEngine, SamplingParams
from rpo_engine.rpo import ExperienceCache, cut_cached_path
from rpo_engine.trainer import encode_prompt, stop_ids


def build_model(tiny: bool, seed: int):
    """(model, tokenizer): the starter model, or a 2-layer random Qwen2-shaped model with the task tokenizer."""
    if not tiny:
        from rpo_engine.data.starter import ensure_starter_model

        path = ensure_starter_model()
        return rpo_engine.load_model(path), rpo_engine.load_tokenizer(path)
    from rpo_engine.data.starter import tiny_task_model

    return tiny_task_model(hidden_size=64, seed=seed)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="tiny random model instead of the starter model")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=320)
    ap.add_argument("--train-size", type=int, default=8, help="prompts recur every train_size/B steps")
    ap.add_argument("--learning-rate", type=float, default=1.5e-5)  # the trainer's default for the starter model
    ap.add_argument("--no-rpo", dest="rpo", action="store_false", help="full-path GRPO")
    ap.add_argument("--reward", default=None, help="module:function (default: exact answer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lora-r", type=int, default=0, help="train LoRA adapters of this rank (alpha 2r) on a frozen base")
    ap.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps and after the last (0: never)")
    ap.add_argument("--eval-size", type=int, default=64, help="held-out rows each eval decodes")
    ap.add_argument("--output", type=Path, default=None, help="writes metrics.jsonl and final/ here")
    args = ap.parse_args(argv)
    model, tokenizer = build_model(args.tiny, args.seed)
    if args.lora_r:  # before the engine and the optimizer: both then see the adapters
        apply_lora(model, r=args.lora_r, alpha=2.0 * args.lora_r, seed=args.seed)
    reward_fn = load_reward_fn(args.reward) if args.reward else exact_answer_reward
    rows = make_split("train", args.train_size, args.seed)
    # The trainer's encoding: the chat template when the tokenizer has one, else the text (with Llama's BOS).
    limit = model.config.max_model_len - args.max_completion_length
    prompt_ids = {r["id"]: encode_prompt(tokenizer, r, limit) for r in rows}
    eos = stop_ids(model, tokenizer)
    engine = RolloutEngine(model)  # reads the live weights: what the optimizer changes, the next rollout sees
    trained = [p for p in model.parameters() if p.requires_grad]  # with LoRA: the adapters only
    optimizer = torch.optim.AdamW(trained, lr=args.learning_rate, weight_decay=0.0)
    cache, rng, G = ExperienceCache("correct-only", epsilon=0.5), random.Random(args.seed), args.num_generations
    log = None
    if args.output:
        args.output.mkdir(parents=True, exist_ok=True)
        log = open(args.output / "metrics.jsonl", "w")
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        batch = [rows[((step - 1) * args.prompts_per_step + i) % len(rows)] for i in range(args.prompts_per_step)]
        # 1. prefixes: RPO keeps the cached path minus a sampled tail; a new prompt starts from scratch
        kept, kept_logprobs, params = [], [], []
        for i, row in enumerate(batch):
            path = cache.get(row["id"]) if args.rpo and row["id"] in cache else None
            # a path verified correct loses at most a quarter (<= 300 tokens); any other may be wrong anywhere, and
            # is cut at a uniform draw along it (the default RPOConfig's rule; rpo_unverified_cut="least-likely"
            # would cut it at its least likely token, by the log-probs passed here)
            cut = cut_cached_path(len(path.token_ids), path.correct, rng, args.max_completion_length,
                                  logprobs=path.logprobs) if path else None
            kept.append(path.token_ids[:cut.kept] if cut else [])
            kept_logprobs.append(path.logprobs[:cut.kept] if cut else [])
            params.append(SamplingParams(n=G, max_new_tokens=cut.budget if cut else args.max_completion_length,
                                         temperature=1.0, stop_token_ids=eos, seed=args.seed * 1000 + step * 10 + i))
        # 2. rollout: each prefix is prefilled once, its G samples share its K/V blocks
        with torch.no_grad():
            outs = engine.generate([prompt_ids[r["id"]] + k for r, k in zip(batch, kept)], params)
        # 3. rewards score the whole answer (kept path + suffix); 4. advantages per group
        answers = [[k + o.token_ids for o in group] for k, group in zip(kept, outs)]
        rewards = torch.tensor([score_completions(reward_fn, [tokenizer.decode(a, skip_special_tokens=True) for a in group],
                                                  [r] * len(group), group)  # ours or a TRL-style function
                                for r, group in zip(batch, answers)])  # [B, G]
        advantages = group_advantages(rewards)  # [B, G]: (r - mean) / (std + eps) within each group
        # 5. the cache keeps one whole answer per prompt (the best with probability epsilon, else a random one;
        #    a path verified correct is never replaced by a wrong answer)
        for r, group, rew, klp, out in zip(batch, answers, rewards.tolist(), kept_logprobs, outs):
            cache.update(r["id"], group, rew, step, rng, logprobs=[klp + o.logprobs for o in out])
        # 6. update: loss on the generated tokens only (on-policy: old_logp = logp.detach(), ratio 1); each
        #    group's prefix runs once in forward and backward, log-probs by the fused LM-head kernel
        groups = [PrefixGroup(prompt_ids[r["id"]] + k, [o.token_ids for o in group], len(prompt_ids[r["id"]]) + len(k))
                  for r, k, group in zip(batch, kept, outs)]
        logp, mask = group_logprobs(model, groups)  # [B * G, longest suffix]
        loss, stats = policy_loss(logp, logp.detach(), advantages.flatten(), mask, loss_agg="seq-mean-token-mean")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        record = {"step": step, "reward_mean": rewards.mean().item(), "loss": loss.item(),
                  "grad_norm": grad_norm.item(), "generated_tokens": sum(len(o.token_ids) for g in outs for o in g),
                  "cached_prompts": len(cache), "step_time_s": time.perf_counter() - start}
        if args.eval_every and (step % args.eval_every == 0 or step == args.steps):
            # the model as it is now, in memory: no save; its weights, gradients and mode, and the global random
            # generators, are as they were after the call
            record["eval_accuracy"] = evaluate(model=model, tokenizer=tokenizer, eval_size=args.eval_size,
                                               max_completion_length=args.max_completion_length,
                                               reward=args.reward or "exact", no_progress=True)["accuracy"]
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}), flush=True)
        if log:
            log.write(json.dumps(record) + "\n")
    if args.output:
        log.close()
        model.save_pretrained(args.output / "final", tokenizer=tokenizer)  # adapters merged in
        if args.lora_r:
            save_adapter(model, args.output / "final-adapter")  # PEFT's layout


if __name__ == "__main__":
    main()
