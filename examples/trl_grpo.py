"""TRL's GRPOTrainer with rpo_engine as its rollout: RPO (RPORollout) or plain GRPO sampled by our engine
(TRLRollout), on the built-in arithmetic task, in SharedPrefixGRPOTrainer (GRPOTrainer whose log-prob passes
run each group's prompt and kept path once). Everything else is TRL's: rewards, advantages, loss, optimizer,
logging. Needs `pip install -e ".[bench]"` (TRL and datasets).

    python examples/trl_grpo.py                      # RPO on the starter model (built once, ~3 min on CPU)
    python examples/trl_grpo.py --no-rpo             # full-path GRPO, sampled by our engine
    python examples/trl_grpo.py --no-shared-prefix   # TRL's own update over every row's prompt and kept path
    python examples/trl_grpo.py --tiny --steps 2     # a tiny random model: seconds, for a smoke test

Writes OUTPUT/log.jsonl (TRL's log entries, one a step) and OUTPUT/rpo_state.pt (the experience cache at
the end; with checkpoints on, each holds one too).
"""
import argparse
import json
import os
from pathlib import Path

import torch

from rpo_engine.data.arithmetic import make_split
from rpo_engine.integrations.trl import RPORollout, SharedPrefixGRPOTrainer, TRLRollout
from rpo_engine.rewards import exact_answer_reward


def model_directory(tiny: bool, output: Path) -> Path:
    """The starter model's directory, or a 2-layer random Qwen2-shaped model with the task tokenizer."""
    if not tiny:
        from rpo_engine.data.starter import ensure_starter_model

        return ensure_starter_model()
    from rpo_engine.data.starter import tiny_task_model

    model, tokenizer = tiny_task_model()
    model.save_pretrained(output / "tiny-model", tokenizer=tokenizer)
    return output / "tiny-model"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rpo", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--shared-prefix", action=argparse.BooleanOptionalAction, default=True,
                    help="SharedPrefixGRPOTrainer: each group's prompt and kept path run once in the update")
    ap.add_argument("--tiny", action="store_true", help="a tiny random model instead of the starter")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--prompts-per-step", type=int, default=4)
    ap.add_argument("--num-generations", type=int, default=8)
    ap.add_argument("--max-completion-length", type=int, default=320)
    ap.add_argument("--learning-rate", type=float, default=1e-4)
    ap.add_argument("--output", type=Path, default=Path("runs/trl-grpo"))
    args = ap.parse_args(argv)
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # rollout_func is experimental in TRL 1.16
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    args.output.mkdir(parents=True, exist_ok=True)
    directory = model_directory(args.tiny, args.output)
    rows = make_split("train", 2 * args.prompts_per_step, seed=0)  # each prompt comes back every other step
    dataset = Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in rows])
    rollout = RPORollout(seed=0) if args.rpo else TRLRollout()

    def accuracy(completions, answer, **kwargs):  # TRL's reward-function signature
        return [exact_answer_reward(c, a) for c, a in zip(completions, answer)]

    config = GRPOConfig(output_dir=str(args.output), max_steps=args.steps, learning_rate=args.learning_rate,
                        num_generations=args.num_generations,
                        per_device_train_batch_size=args.prompts_per_step * args.num_generations,
                        max_completion_length=args.max_completion_length, use_cpu=not torch.cuda.is_available(),
                        bf16=torch.cuda.is_available(), logging_steps=1, save_strategy="no", report_to="none")
    dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32  # the rollout computes in this dtype
    trainer_class = SharedPrefixGRPOTrainer if args.shared_prefix else GRPOTrainer
    trainer = trainer_class(model=AutoModelForCausalLM.from_pretrained(directory, dtype=dtype),
                            reward_funcs=rollout.tracked(accuracy) if args.rpo else accuracy, args=config,
                            train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(directory),
                            rollout_func=rollout)
    trainer.train()
    with open(args.output / "log.jsonl", "w") as f:
        for entry in trainer.state.log_history:
            f.write(json.dumps(entry) + "\n")
    if args.rpo:
        torch.save(rollout.state_dict(), args.output / "rpo_state.pt")
        print(f"RPO: {rollout.counters['generated_tokens']} tokens generated ({rollout.counters['cold_starts']} cold "
              f"starts), {rollout.counters['kept_tokens']} kept from cached paths")


if __name__ == "__main__":
    main()
