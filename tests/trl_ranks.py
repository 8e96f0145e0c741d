"""Run by tests/test_trl_rollout.py under torchrun: TRL's GRPOTrainer, or SharedPrefixGRPOTrainer (its loss pass
through DDP's wrapper), with RPORollout on 2 CPU processes (DDP, gloo), each group split over them
(per_device_train_batch_size 2 of num_generations 4). Each rank writes what it saw to OUT/rank<r>.json: per
rollout its share of the batch, the length-aware rewards it returned with their inputs, the cache at the end,
SharedPrefixGRPOTrainer's warnings, TRL's log and the trained weights' checksum.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/trl_ranks.py OUT MODEL_DIR TRAINER
"""
import json
import os
import sys
import warnings
from pathlib import Path

os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"

import torch.distributed  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from rpo_engine.integrations.trl import RPORollout, SharedPrefixGRPOTrainer, length_aware  # noqa: E402


def main(out: Path, model_dir: str, trainer_class):
    rpo, rollouts, scored = RPORollout(seed=2), [], []

    def rollout(prompts, trainer):
        result = rpo(prompts, trainer)
        rollouts.append({k: result[k] for k in ("completion_ids", "env_mask", "rpo_prompt_key")})
        return result

    def even(completions, **kwargs):  # right or wrong, varied within a group
        return [float(len(c) % 2 == 0) for c in completions]

    shaped = length_aware(even)

    def recorded(**kwargs):
        rewards = shaped(**kwargs)
        scored.append(dict(prompts=kwargs["prompts"], lengths=[len(c) for c in kwargs["completion_ids"]],
                           accuracy=even(**kwargs), rewards=rewards))
        return rewards

    recorded.__name__ = "length_aware_even"
    rows = [{"prompt": p} for p in ("12+34=", "7*8=", "5-3=", "9+9=")]
    config = GRPOConfig(output_dir=str(out / "trl"), max_steps=3, num_generations=4, per_device_train_batch_size=2,
                        max_completion_length=10, learning_rate=0.01, use_cpu=True, bf16=False, report_to="none",
                        disable_tqdm=True, logging_steps=1, save_strategy="no", seed=1)
    trainer = trainer_class(model=AutoModelForCausalLM.from_pretrained(model_dir), reward_funcs=rpo.tracked(recorded),
                            args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=AutoTokenizer.from_pretrained(model_dir), rollout_func=rollout)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    fallbacks = [str(w.message) for w in caught if "SharedPrefixGRPOTrainer" in str(w.message)]
    rank = trainer.accelerator.process_index
    cache = {key: path.token_ids for key, path in rpo.cache.paths.items()}
    weights = sum(p.detach().double().abs().sum().item() for p in trainer.model.parameters())
    (out / f"rank{rank}.json").write_text(json.dumps(dict(
        rollouts=rollouts, scored=scored, cache=cache, fallbacks=fallbacks, weights=weights,
        log=[{k: e[k] for k in ("loss", "grad_norm", "reward")} for e in trainer.state.log_history if "loss" in e])))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], {"grpo": GRPOTrainer, "shared": SharedPrefixGRPOTrainer}[sys.argv[3]])
    # Done and written: skip the interpreter's teardown, where on a busy machine one rank in ten aborted after
    # everything above had finished on both ("terminate called without an active exception": a native thread
    # of the libraries, not ours, destroyed while joinable)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

