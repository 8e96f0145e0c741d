"""`python -m rpo_engine.eval --model DIR --dataset FILE`: greedy accuracy of a model on a dataset.

Without --dataset it uses the built-in task's held-out split of --seed (0, the default run's: a training run with
--seed N holds out seed N's); without --model, the starter model.
`--output FILE.jsonl` also writes each row's greedy completion, reward and verdict. `--adapter DIR` applies a
LoRA adapter (a run's final-adapter/, or one PEFT saved; or its Hub id) to --model.
`--num-samples K --temperature T` samples K completions a row instead (one prefill each, shared by its
samples) and reports their mean accuracy (avg@K) and the fraction of rows with a right one (pass@K).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path

from rpo_engine.errors import UserError, clear_frames, run_cli
from rpo_engine.hub import download_bars_hidden


def build_parser():
    """The eval's options: main's flags, and (with underscores) evaluate's keyword arguments."""
    from rpo_engine.config import OneLineParser

    parser = OneLineParser(prog="python -m rpo_engine.eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model directory, or a Hub id (org/name) in the local cache or to "
                                         "download (default: the built-in starter model)")
    parser.add_argument("--adapter", help="a LoRA adapter directory (PEFT's layout, e.g. a run's final-adapter/), or "
                                           "its Hub id, applied to --model, the base it was trained on; a run's final/ "
                                           "has its adapter merged in already (default: none)")
    parser.add_argument("--dataset", help="JSONL/Parquet rows with prompt and answer, a `datasets` save_to_disk directory, "
                                           "a Hugging Face Hub dataset id (org/name; needs `datasets`) or such a "
                                           "repository's directory (default: the "
                                           "built-in task's eval split of --seed, a training run's of that seed)")
    # as in training: how to read --dataset (a Hub one's configuration and split; the fields of prompt and answer)
    parser.add_argument("--dataset-config", help="a Hub (or repository directory) dataset's configuration, e.g. main for openai/gsm8k")
    parser.add_argument("--dataset-test-split", help="the split of a --dataset with splits (a Hub id, a repository directory, a DatasetDict) to evaluate (default: test)")
    parser.add_argument("--dataset-prompt-column", help="the field read as the prompt, e.g. question (default: prompt)")
    parser.add_argument("--dataset-answer-column", help="the field read as the reference answer (default: answer; a "
                                                        "dotted path reads a nested one: reward_model.ground_truth "
                                                        "in verl's Parquet)")
    parser.add_argument("--eval-size", type=int, default=512,
                        help="most rows to evaluate, the first of --dataset or of the built-in split; a run's evals "
                             "read its --eval-size, 128 by default (default: 512)")
    parser.add_argument("--max-prompt-length", type=int, default=512,
                        help="longest prompt in tokens, as in training; longer is an error (default: 512)")
    parser.add_argument("--max-completion-length", type=int, default=320, help="token budget of each completion (default: 320)")
    parser.add_argument("--filter-overlong-prompts", action="store_true",
                        help="leave out the rows whose prompts are longer than --max-prompt-length allows, saying how "
                             "many, as in training (default: such a prompt is an error)")
    parser.add_argument("--reward", default="auto", help="exact | math | module:function (default: auto: exact for the built-in task, math otherwise)")
    parser.add_argument("--reward-workers", type=int, default=0,
                        help="score the reward in this many worker processes, as in training (default: 0, here)")
    parser.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    parser.add_argument("--dtype", default="auto", help="float32 | bfloat16 | auto (bf16 on CUDA, fp32 on CPU), as in "
                                                        "training: a run's eval decoded in its --dtype (default: auto)")
    parser.add_argument("--num-samples", type=int, default=1,
                        help="completions a row (K > 1 needs --temperature > 0): avg@K and pass@K (default: 1)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default: 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling (default: 1.0)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k sampling, 0: off (default: 0)")
    parser.add_argument("--min-p", type=float, default=0.0, help="min-p sampling, 0: off (default: 0)")
    parser.add_argument("--stop", help="end a completion at the token that completes this string in its text; several: "
                                        "a JSON list, '[\"</answer>\", \"\\n\\n\"]', as in training (default: none)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="divide a seen token's positive logit by this, multiply a negative one, greedy "
                             "decoding included (transformers' rule; default: 1, off)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed, row i drawing from seed + i; without "
                                                            "--dataset also the built-in task's eval split, as "
                                                            "training's --seed picks it (default: 0)")
    parser.add_argument("--chat-template-kwargs", help="a JSON object of extra arguments for the chat template, "
                                                       "as in training (default: none)")
    parser.add_argument("--system-prompt", help="a system message before every prompt, as in training (default: none)")
    parser.add_argument("--no-chat-template", action="store_true",
                        help="encode string prompts as they are, not through the tokenizer's chat template, as in "
                             "training (default: the template, when the tokenizer has one)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                        help="CUDA: the share of the GPU's memory the weights and the K/V cache may fill (vLLM's name "
                             "and default: nothing trains here; training's default is 0.5) (default: 0.9)")
    parser.add_argument("--max-num-seqs", type=int, default=256,
                        help="the most sequences decoded together (vLLM's name): rows, and a row's samples beyond it, wait for "
                             "room (default: 256)")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="CUDA: decode without CUDA graphs, for debugging (vLLM's name) (default: with them)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: one, on stderr)")
    parser.add_argument("--output", help="JSONL file for each row's completion, reward and verdict (must not exist)")
    return parser


def main(argv=None) -> int:
    return run_eval(build_parser().parse_args(argv))


def run_eval(args) -> int:
    """The eval `args` (main's parsed options) asks for: prints its metrics; -> 0."""
    print_metrics(evaluated(args), args)
    return 0


def evaluate(**options) -> dict:
    """The eval the command line runs, from Python (a notebook, a script, another trainer): `options` are its flags
    by name with underscores (`model=`, `dataset=`, `num_samples=`, `no_progress=True`; --help lists them), typed
    and checked as the flags are, a mistake a UserError naming it. -> the metrics it prints, at full precision:
    "accuracy" (greedy, or with num_samples K the mean over all K answers a row: avg@K), for K > 1 "pass@k" for
    each power of two k < K (the unbiased estimate) and for K, "reward_mean" (of every answer's reward),
    "rows" (how many were evaluated), and what the reward function logged (log_metric) as "eval_<name>".
    The global random generators, which --seed seeds, are the caller's again after it, as a trainer's own eval
    leaves them.

    `model=` may also be the model object being trained (a loop of your own, between steps): rpo_engine's
    CausalLM (LoRA adapters applied or not), a transformers causal LM, or a PEFT model of one, with
    `tokenizer=` its tokenizer (default: the one in the directory it was loaded from). It is evaluated where it is,
    in memory, with the metrics of saving it (save_pretrained) and evaluating that directory in its dtype on its
    device, and left as it was: its weights, their gradients and requires_grad, its train/eval mode; the K/V cache
    the eval decodes with is given back before it returns."""
    import torch

    from rpo_engine.trainer import global_rng_states, restore_global_rng_states

    model, tokenizer = in_memory_model(options), options.pop("tokenizer", None)
    if model is not None:
        options = {name: value for name, value in options.items() if name != "model"}
    elif tokenizer is not None:
        raise UserError("evaluate: tokenizer= goes with a model object; model= as a directory or Hub id is evaluated "
                        "with its own tokenizer")
    args = eval_options(options)
    if model is not None:
        check_in_memory_options(model, tokenizer, args)
    devices = {torch.cuda.current_device()} if torch.cuda.is_available() else set()
    if model is not None and model.device.type == "cuda":  # a reward may draw from the model's device's too
        devices.add(model.device.index if model.device.index is not None else torch.cuda.current_device())
    states = global_rng_states()
    try:  # Python's and numpy's too (fork_rng forks torch's alone); of CUDA's, the devices the eval runs on
        with torch.random.fork_rng(devices=sorted(devices)):
            return evaluated(args, model, tokenizer)
    except UserError as e:
        clear_frames(e)  # a notebook keeps the error: its frames held the model
        raise
    finally:
        restore_global_rng_states(states)


def in_memory_model(options: dict):
    """evaluate's model= when it is a model object -> our CausalLM on its weights (the object itself; for a
    transformers model, PEFT-wrapped or not, from_transformers' decoder on its own tensors, no copy); None when it
    is a directory, a Hub id or left out. Another object is a UserError naming its type."""
    import torch

    from rpo_engine.model import CausalLM, from_transformers

    model = options.get("model")
    if model is None or isinstance(model, (str, os.PathLike)):
        return None
    if isinstance(model, CausalLM):
        return model
    transformers, peft = sys.modules.get("transformers"), sys.modules.get("peft")  # loaded if the model is theirs
    if ((transformers is not None and isinstance(model, transformers.PreTrainedModel))
            or (peft is not None and isinstance(model, peft.PeftModel))):
        return from_transformers(model)
    inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)  # DDP's, torch.compile's
    wrapped = f"; pass the {type(inner).__name__} it wraps" if isinstance(inner, torch.nn.Module) else ""
    raise UserError(f"evaluate: model must be a directory, a Hub id, or a model object (rpo_engine's CausalLM, a "
                    f"transformers causal LM or a PEFT model of one), got {type(model).__name__}{wrapped}")


def check_in_memory_options(model, tokenizer, args) -> None:
    """The options that load a model, which a model object evaluated as it is, where it is, cannot take."""
    if args.adapter is not None:  # applying it would change the caller's model
        raise UserError("evaluate: adapter= applies to a model loaded from a directory; a model object is evaluated "
                        "as it is (apply the adapter to it first: rpo_engine.model.lora.load_adapter)")
    if args.device != "auto":
        raise UserError(f"evaluate: device= with a model object, which is evaluated where it is ({model.device}): "
                        f"leave device out (move the model to evaluate it elsewhere)")
    if args.dtype != "auto":
        raise UserError(f"evaluate: dtype= with a model object, which is evaluated in its own dtype ({model.dtype}): "
                        f"leave dtype out (cast the model to evaluate it in another)")
    if tokenizer is None and model.source_dir is None:
        raise UserError(f"evaluate: pass tokenizer= with the {type(model).__name__} (it was not loaded from a "
                        f"directory to read one from)")
    if tokenizer is not None and not callable(getattr(tokenizer, "decode", None)):
        raise UserError(f"evaluate: tokenizer must be the model's tokenizer, got {type(tokenizer).__name__}")


def eval_options(options: dict):
    """`options` (evaluate's keyword arguments) as main's parsed options: the flags' defaults, with each given one
    typed as its flag reads it (a path object as its string)."""
    from rpo_engine.config import _typed, closest_names

    actions = {action.dest: action for action in build_parser()._actions if action.dest != "help"}
    unknown = sorted(set(options) - set(actions))
    if unknown:
        meant = closest_names(unknown[0], [*actions, "tokenizer"])  # evaluate's own, taken out before
        raise UserError(f"evaluate: unknown option {unknown[0]!r}" + (f"; did you mean {' or '.join(meant)}?" if meant
                                                                       else ""))
    args = argparse.Namespace(**{name: action.default for name, action in actions.items()})
    for name, value in options.items():
        action = actions[name]
        kind = "bool" if action.nargs == 0 else {int: "int", float: "float", None: "str"}[action.type]  # 0: store_true
        if kind == "str" and isinstance(value, os.PathLike):
            value = os.fspath(value)
        setattr(args, name, _typed(name, kind + (" | None" if action.default is None else ""), value, "evaluate"))
    return args


def print_metrics(metrics: dict, args) -> None:
    """What the command line prints of evaluated's `metrics`: accuracy (avg@K and pass@K), the unbiased pass@k,
    and the means of what the reward function logged."""
    source = args.dataset or "built-in eval split"
    rows = metrics["rows"]
    if args.num_samples == 1:  # a sampled answer's accuracy says so: it is not the greedy one
        sampled = f", temperature {args.temperature:g}" if args.temperature > 0 else ""
        print(f"accuracy {metrics['accuracy']:.4f} on {rows} rows{sampled} ({source})")
    else:
        K = args.num_samples
        print(f"avg@{K} {metrics['accuracy']:.4f}, pass@{K} {metrics[f'pass@{K}']:.4f} on {rows} rows, temperature "
              f"{args.temperature:g} ({source})")
        ks = unbiased_ks(K)
        if ks:
            print(", ".join(f"pass@{k} {metrics[f'pass@{k}']:.4f}" for k in ks)
                  + f" (unbiased, from the {K} answers a row)")
    logged = {name: value for name, value in metrics.items() if name.startswith("eval_")}
    if logged:
        print(", ".join(f"{name} {value:.4g}" for name, value in logged.items()))


def unbiased_ks(K: int) -> list[int]:
    """The k of the pass@k reported beside pass@K: the powers of two below K."""
    return [k for k in (2 ** i for i in range(1, K.bit_length())) if k < K]


def evaluated(args, model=None, tokenizer=None) -> dict:
    """The metrics of the eval `args` (main's parsed options) asks for (evaluate's), of --model or of `model`, a
    CausalLM in memory (in_memory_model's) with `tokenizer` (None: its source directory's); with --no-progress
    the Hub's download bars hidden too."""
    with download_bars_hidden() if args.no_progress else contextlib.nullcontext():
        return _evaluated(args, model, tokenizer)


def _evaluated(args, model=None, tokenizer=None) -> dict:
    """evaluated's work: the options checked, the model (unless given) and the rows loaded, each row's answers
    decoded and graded, --output written; -> the metrics."""
    import rpo_engine
    from rpo_engine.config import config_from_dict, greedy_filter, stop_strings
    from rpo_engine.rollout import SamplingParams
    from rpo_engine.train import check_output_dir, load_rows, resolve_reward, reward_pool
    from rpo_engine.rewards.answers import RewardLog
    from rpo_engine.trainer import (add_columns, encode_run_prompts, right_answers, sampled_graded,
                                    seed_global_rngs, stop_ids)

    if args.num_samples < 1:
        raise UserError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.max_num_seqs < 1:
        raise UserError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    if not 0 < args.gpu_memory_utilization <= 1:  # NaN too
        raise UserError(f"--gpu-memory-utilization must be in (0, 1], got {args.gpu_memory_utilization}")
    if args.num_samples > 1 and args.temperature <= 0:
        raise UserError(f"--num-samples {args.num_samples} needs --temperature > 0 (greedy samples are all the same)")
    greedy = greedy_filter(args.top_k, args.min_p)
    if args.num_samples > 1 and greedy:  # one candidate token a step: greedy decoding, K times over
        raise UserError(f"--num-samples {args.num_samples} with {greedy} samples greedily: a row's {args.num_samples} "
                        f"completions are all alike (--top-k 0 or > 1, --min-p < 1)")
    if args.temperature == 0:  # greedy takes the most likely token, which every filter keeps: these changed nothing
        # (--seed too, with --dataset: without, it picks the built-in task's split)
        given = [flag for flag, value, default in (("--top-p", args.top_p, 1.0), ("--top-k", args.top_k, 0),
                                                   ("--min-p", args.min_p, 0.0), ("--seed", args.seed, 0))
                 if value != default and (flag != "--seed" or args.dataset is not None)]
        if given:
            listed = given[0] if len(given) == 1 else f"{', '.join(given[:-1])} and {given[-1]}"
            raise UserError(f"{listed} {'does' if len(given) == 1 else 'do'} nothing with --temperature 0 (greedy; "
                            f"give --temperature > 0 to sample)")
    stop = stop_strings(args.stop)
    try:  # before any loading: SamplingParams checks the sampling options
        SamplingParams(n=args.num_samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                       min_p=args.min_p, seed=args.seed, repetition_penalty=args.repetition_penalty)
    except ValueError as e:  # its message names the field: say the option
        raise UserError(re.sub(r"SamplingParams\.(\w+)", lambda m: "--" + m[1].replace("_", "-"), str(e))) from None
    if args.adapter is not None and args.model is not None:
        # a LoRA run saves DIR (the merged model) beside DIR-adapter: applying the one to the other adds it twice
        model_dir = Path(args.model).resolve()
        adapter = Path(args.adapter)
        if adapter.is_dir() and adapter.resolve() == model_dir.with_name(f"{model_dir.name}-adapter"):
            raise UserError(f"--adapter {args.adapter}: already merged into --model {args.model} (the same run's); pass "
                            f"that --model alone, or the base model the run trained with --adapter")
    output = Path(args.output) if args.output else None
    if output is not None and (output.exists() or output.is_symlink()):  # a dangling link too: open(, "x") refuses it
        link = " (a broken symbolic link)" if not output.exists() else ""
        raise UserError(f"{output}: already exists{link}; pass another --output")
    if output is not None:  # before minutes of decoding, not after
        if not output.parent.exists():  # the file alone is made: not its directories, as training's --output's
            raise UserError(f"{output.parent}: no such directory (--output {output})")
        check_output_dir(output.parent, f"--output {output}")  # a file, read-only, or another user's

    # The same option checks and loaders as training: the dataset is the eval set here.
    try:
        config = config_from_dict({"model": args.model, "eval_dataset": args.dataset, "eval_size": args.eval_size,
                                   "max_prompt_length": args.max_prompt_length,
                                   "max_completion_length": args.max_completion_length, "reward": args.reward,
                                   "device": args.device, "dtype": args.dtype,
                                   "chat_template": not args.no_chat_template,
                                   "chat_template_kwargs": args.chat_template_kwargs,
                                   "system_prompt": args.system_prompt,
                                   "filter_overlong_prompts": args.filter_overlong_prompts,
                                   "reward_workers": args.reward_workers, "progress": not args.no_progress,
                                   **{key: getattr(args, key) for key in ("dataset_config", "dataset_test_split",
                                                                         "dataset_prompt_column", "dataset_answer_column")
                                      if getattr(args, key) is not None}})
    except UserError as e:
        raise UserError(in_eval_words(str(e))) from None
    # without --dataset, the built-in task's split of a --seed N run; set past training's check of its --seed
    # (64 bits): the eval's is any integer, as the sampler's
    config.seed = args.seed
    seed_global_rngs(args.seed)  # a reward drawing from the global generators (a sampled judge) scores the same again
    if model is None:
        model, tokenizer = loaded_model(config, args.adapter)
    else:
        config.model = f"the {type(model).__name__} given"  # messages about its tokenizer name it
        if tokenizer is None:
            tokenizer = rpo_engine.load_tokenizer(model.source_dir)
    try:
        _, rows = load_rows(config)
    except UserError as e:
        raise UserError(in_eval_words(str(e))) from None
    rows, prompts = encode_run_prompts(tokenizer, rows, config, model, args.dataset or "built-in eval split")
    eos_ids = stop_ids(model, tokenizer)
    params = [SamplingParams(n=args.num_samples, max_new_tokens=config.max_completion_length,
                             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                             repetition_penalty=args.repetition_penalty, stop=stop,
                             stop_token_ids=eos_ids, seed=args.seed + i) for i in range(len(rows))]
    # an adapter is decoded merged: nothing trains it here
    with released_engine(model, args.gpu_memory_utilization, args.max_num_seqs, args.enforce_eager, prompts.longest(),
                         config.max_completion_length, merge_lora=True, tokenizer=tokenizer) as engine:
        reward = resolve_reward(config)
        pool = reward_pool(config, [reward])
        log = RewardLog()  # a TRL-style reward's log_metric / log_extra
        try:
            graded = sampled_graded(engine, tokenizer, rows, reward if pool is None else pool.functions([reward])[0],
                                    list(prompts), params, progress="eval" if not args.no_progress else False, log=log)
        finally:
            if pool is not None:
                pool.close()
    if output is not None:
        records = []  # all of them before the file: a record that cannot be made leaves no file behind
        for j, (row, samples) in enumerate(zip(rows, graded)):
            record = {"id": row["id"], "prompt": row["prompt"], "answer": row["answer"]}
            if args.num_samples == 1:
                (text, reward, right), = samples
                record.update(completion=text, reward=reward, correct=right)
            else:
                record.update(completions=[t for t, _, _ in samples], rewards=[r for _, r, _ in samples],
                              correct=[c for _, _, c in samples])
            add_columns(record, log.columns.get(j, {}), 0 if args.num_samples == 1 else None)
            records.append(record)
        created = False
        try:
            with open(output, "x") as f:
                created = True
                f.writelines(json.dumps(record) + "\n" for record in records)
        except OSError as e:
            if created:  # half of it (a full disk) would be refused by the rerun as "already exists"
                output.unlink(missing_ok=True)
            raise UserError(f"{output}: cannot write ({e.strerror or e})") from None
    K, rights = args.num_samples, right_answers(graded)
    metrics = {"accuracy": sum(rights) / (len(rows) * K)}
    if K > 1:  # each from all K answers a row: the unbiased estimator, not the first k answers (pass@K: any right)
        metrics.update({f"pass@{k}": sum(pass_at_k(K, c, k) for c in rights) / len(rows) for k in [*unbiased_ks(K), K]})
    metrics["reward_mean"] = sum(reward for samples in graded for _, reward, _ in samples) / (len(rows) * K)
    metrics["rows"] = len(rows)
    # what the reward function logged (log_metric), as the trainer's eval logs it
    return {**metrics, **RewardLog.metric_means([log.metrics], "eval_")}


def loaded_model(config, adapter):
    """(model, tokenizer) of --model (a directory, a Hub id; None: the starter model) on --device in --dtype, with
    --adapter applied."""
    import rpo_engine
    from rpo_engine.model.checkpoint import model_directory
    from rpo_engine.model.lora import load_adapter, read_adapter_settings
    from rpo_engine.train import resolve_device

    device, dtype = resolve_device(config)
    if config.model is None:
        from rpo_engine.data.starter import ensure_starter_model

        config.model = str(ensure_starter_model())
    model_dir = model_directory(config.model)  # a Hub id looked up once, for the model and its tokenizer
    check_not_a_run(model_dir)
    check_not_an_adapter(model_dir, adapter)
    adapter_dir = None
    if adapter is not None:  # a Hub id too (a LoRA run's --push-to-hub uploads its adapter), as --model
        adapter_dir = model_directory(adapter)
        with warnings.catch_warnings():  # read now, not after minutes of loading; load_adapter warns again
            warnings.simplefilter("ignore")
            read_adapter_settings(adapter_dir)
    model = rpo_engine.load_model(model_dir, dtype=dtype, device=device)
    if adapter_dir is not None:
        load_adapter(model, adapter_dir)
    return model, rpo_engine.load_tokenizer(model_dir)


@contextlib.contextmanager
def released_engine(model, *args, **options):
    """rollout_engine's engine on `model` for the block, its K/V cache given back when the block ends, however it
    ends (a traceback a notebook keeps would hold the engine), and the merged LoRA copies it made on the model
    dropped: a model passed in lives on and trains in that memory. Copies there before (the caller's own
    engine's, merge_lora) stay, brought up to date in place, where that engine's CUDA graphs read them."""
    from rpo_engine.model.lora import free_rollout_weights, lora_modules
    from rpo_engine.trainer import rollout_engine

    copies_before = any(m.rollout_weight is not None for m in lora_modules(model).values())
    engine = None
    try:
        engine = rollout_engine(model, *args, **options)
        yield engine
    finally:
        if engine is not None:
            engine.runner.sleep()  # not engine.sleep(): that frees the merged copies, the caller's too
        if not copies_before:
            free_rollout_weights(model)


def in_eval_words(message: str) -> str:
    """A message of training's checks and loaders in the eval's options: training's --eval-dataset is --dataset here,
    and a DatasetDict's split is chosen by --dataset-test-split alone (the eval has no --dataset-train-split)."""
    message = message.replace("--dataset-train-split and --dataset-test-split choose", "--dataset-test-split chooses")
    return re.sub(r"(--dataset or )?--eval-dataset", "--dataset", message)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The chance that k of a row's n answers drawn without replacement hold one of its c right ones:
    1 - C(n - c, k) / C(n, k) (Chen et al. 2021's unbiased estimator of pass@k)."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def check_not_a_run(model: Path) -> None:
    """--model given a training run's directory, or one of its checkpoints: their config.json holds the run's
    options, not a model's, so loading would fail on a field it lacks; name the directory that is the model."""
    if not (model / "config.json").is_file() or "model_type" in _json_keys(model / "config.json"):
        return
    if (model / "final").is_dir():
        raise UserError(f"--model {model}: a training run's directory; pass its final model, --model {model / 'final'}")
    if (model / "model").is_dir():
        raise UserError(f"--model {model}: a training checkpoint; pass its model, --model {model / 'model'}")
    if (model / "adapter").is_dir():
        raise UserError(f"--model {model}: a LoRA run's checkpoint; pass the run's base --model and --adapter "
                        f"{model / 'adapter'}")


def check_not_an_adapter(model: Path, adapter) -> None:
    """--model given a LoRA adapter's directory (PEFT's adapter_config.json: a run's final-adapter/, a PEFT save):
    alone it has no model to load; beside a model's config.json, transformers' from_pretrained applies it to that
    model, and loading the weights alone would evaluate another model. Either way say which command does what."""
    from rpo_engine.model.lora import ADAPTER_CONFIG, adapter_in

    kind = adapter_in(model)
    if kind == "alone":
        base = _json_keys(model / ADAPTER_CONFIG).get("base_model_name_or_path") or "BASE"
        raise UserError(f"--model {model}: a LoRA adapter, not a model; pass its base model and the adapter: "
                        f"--model {base} --adapter {model}")
    if kind == "beside" and adapter is None:  # an --adapter given is the user's choice of adapter
        raise UserError(f"--model {model}: holds a LoRA adapter ({ADAPTER_CONFIG}) beside the model, which "
                        f"transformers applies when it loads the directory; pass --adapter {model} to evaluate it "
                        f"applied, or a copy without {ADAPTER_CONFIG} for the model alone")


def _json_keys(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # the loader says what is wrong with it
    return data if isinstance(data, dict) else {}


if __name__ == "__main__":
    sys.exit(run_cli(main))
