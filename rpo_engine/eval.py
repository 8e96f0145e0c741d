"""`python -m rpo_engine.eval --model DIR --dataset FILE`: greedy accuracy of a model on a dataset.

Without --dataset it uses the built-in task's held-out split; without --model, the starter model.
`--output FILE.jsonl` also writes each row's greedy completion, reward and verdict.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rpo_engine.errors import UserError, run_cli


def main(argv=None) -> int:
    import rpo_engine
    from rpo_engine.config import config_from_dict
    from rpo_engine.rollout import RolloutEngine
    from rpo_engine.train import load_rows, resolve_device, resolve_reward
    from rpo_engine.trainer import encode_prompt, greedy_graded, prompt_token_limit

    parser = argparse.ArgumentParser(prog="python -m rpo_engine.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model directory (default: the built-in starter model)")
    parser.add_argument("--dataset", help="JSONL/Parquet rows with prompt and answer, or a `datasets` save_to_disk directory (default: built-in eval split)")
    parser.add_argument("--eval-size", type=int, default=512, help="most rows to evaluate (default: 512)")
    parser.add_argument("--max-completion-length", type=int, default=320, help="greedy token budget (default: 320)")
    parser.add_argument("--reward", default="auto", help="exact | math | module:function (default: auto: exact for the built-in task, math otherwise)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: one, on stderr)")
    parser.add_argument("--output", help="JSONL file for each row's completion, reward and verdict (must not exist)")
    args = parser.parse_args(argv)
    output = Path(args.output) if args.output else None
    if output is not None and output.exists():
        raise UserError(f"{output}: already exists; pass another --output")
    if output is not None and not output.parent.is_dir():  # before minutes of decoding, not after
        raise UserError(f"{output.parent}: no such directory (--output {output})")

    # The same option checks and loaders as training: the dataset is the eval set here.
    config = config_from_dict({"model": args.model, "eval_dataset": args.dataset, "eval_size": args.eval_size,
                               "max_completion_length": args.max_completion_length, "reward": args.reward,
                               "device": args.device})
    device, dtype = resolve_device(config)
    if config.model is None:
        from rpo_engine.data.starter import ensure_starter_model

        config.model = str(ensure_starter_model())
    model = rpo_engine.load_model(config.model, dtype=dtype, device=device)
    tokenizer = rpo_engine.load_tokenizer(config.model)
    _, rows = load_rows(config)
    prompts = [encode_prompt(tokenizer, r, prompt_token_limit(config, model)) for r in rows]
    eos_ids = list(model.config.stop_token_ids) or [tokenizer.eos_token_id]
    graded = greedy_graded(RolloutEngine(model), tokenizer, rows, resolve_reward(config), prompts,
                           config.max_completion_length, eos_ids, progress=not args.no_progress)
    if output is not None:
        try:
            with open(output, "x") as f:
                for row, (text, reward, right) in zip(rows, graded):
                    f.write(json.dumps({"id": row["id"], "prompt": row["prompt"], "answer": row["answer"],
                                        "completion": text, "reward": reward, "correct": right}) + "\n")
        except OSError as e:
            raise UserError(f"{output}: cannot write ({e.strerror or e})") from None
    accuracy = sum(right for _, _, right in graded) / len(rows)
    print(f"accuracy {accuracy:.4f} on {len(rows)} rows ({args.dataset or 'built-in eval split'})")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
