"""`python -m rpo_engine.train`: GRPO/DAPO with RPO from the command line.

With no arguments it trains the built-in starter model (built on first use, ~3 minutes on 2 CPU
cores) on the built-in arithmetic task. Writes OUTPUT/metrics.jsonl (one JSON object per step, plus a
step-0 record with the starting model's eval accuracy), OUTPUT/checkpoints/step-N/, OUTPUT/final/
(a Hugging Face model directory with its tokenizer) and OUTPUT/curves.png.

Under torchrun (`torchrun --nproc-per-node N -m rpo_engine.train ...`) the ranks train one model
(--parallel ddp or fsdp, rpo_engine/distributed.py) and rank 0 writes every output.
"""
from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import socket
import sys
import threading
import zipfile
from functools import cache, partial
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from rpo_engine.config import (TrainConfig, boolean_scale_rewards_named, config_to_dict, parse_args, reward_names,
                                warmup_length)
from rpo_engine.distributed import Dist, RankErrorHandler, check_divisible, leave_process, write_torchrun_error
from rpo_engine.errors import UserError, clear_frames, refusals_named, run_cli
from rpo_engine.reporting import Reporter, report_targets


def resolve_device(config: TrainConfig) -> tuple[torch.device, torch.dtype]:
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            hidden = "" if visible is None else f" (CUDA_VISIBLE_DEVICES is {visible!r}, which may hide the GPUs)"
            raise UserError(f"--device {config.device}: no CUDA device is available{hidden}")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {config.device}: there are {torch.cuda.device_count()} CUDA devices (0 to "
                            f"{torch.cuda.device_count() - 1})")
        if device.type == "cuda" and device.index is not None and "RANK" not in os.environ:
            # Triton launches and CUDA graph captures run on the current device, not the one their tensors are on
            # (under torchrun a rank's is its LOCAL_RANK's, made current by Dist.from_env; build_trainer puts it there)
            torch.cuda.set_device(device)
    if config.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[config.dtype]
    return device, dtype


def load_rows(config: TrainConfig) -> tuple[list[dict], list[dict]]:
    from rpo_engine.data.arithmetic import make_split
    from rpo_engine.data.datasets import load_dataset_rows

    columns = dict(prompt_column=config.dataset_prompt_column, answer_column=config.dataset_answer_column,
                   config_name=config.dataset_config, progress=config.progress)
    if config.dataset is None:
        train = make_split("train", config.train_size, config.seed)
    else:
        train = load_dataset_rows(config.dataset, split=config.dataset_train_split, **columns)
    # Eval: the given file, else the built-in task's held-out split (only when training on it), else none; none
    # read at all with --eval-steps 0 (a Hub eval set is not downloaded for nothing).
    if not config.eval_steps:
        eval_rows = []
    elif config.eval_dataset:
        eval_rows = load_dataset_rows(config.eval_dataset, split=config.dataset_test_split, **columns)[:config.eval_size]
    elif config.dataset is None:
        eval_rows = make_split("eval", config.eval_size, config.seed)
    else:
        eval_rows = []
    if config.system_prompt is not None:
        train, eval_rows = (with_system_prompt(rows, config.system_prompt) for rows in (train, eval_rows))
    return train, eval_rows


def with_system_prompt(rows: list[dict], text: str) -> list[dict]:
    """Each row's prompt as a conversation that opens with the system message `text`: a string prompt becomes
    the user's turn after it; a conversation gets it first unless it opens with a system message of its own."""
    system = {"role": "system", "content": text}
    out = []
    for row in rows:
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [system, {"role": "user", "content": prompt}]
        elif prompt[0]["role"] != "system":
            prompt = [system, *prompt]
        out.append({**row, "prompt": prompt})
    return out


def resolve_rewards(config: TrainConfig, device: torch.device | None = None, first_only: bool = False) -> list:
    """The --reward functions, in order: the first is the accuracy (what counts as a right answer). A reward
    model directory (TRL's reward_funcs given a model) is loaded on `device`; it scores, so it cannot be the
    first, which must say right or wrong."""
    from rpo_engine.hub import is_hub_id
    from rpo_engine.rewards.model import RewardModel, reward_model_directory
    from rpo_engine.rewards.pool import reward_function

    functions = []
    for i, name in enumerate(reward_specs(config)):
        if name in ("exact", "math"):
            function = reward_function(name)
        elif i > 0 and first_only and is_hub_id(name):
            continue  # the first alone grades: a Hub reward model is not looked up (downloaded) for nothing
        elif (directory := reward_model_directory(name)) is not None:
            if i == 0:
                raise UserError(f"--reward {config.reward}: the first reward decides right answers (eval accuracy, "
                                f"RPO's verified paths), so it cannot be the reward model {name!r}; put an answer "
                                f"check first (exact, math or module:function)")
            if first_only:  # named right, but not loaded: it would take memory for nothing
                continue
            device = device or torch.device("cpu")
            function = RewardModel(name, device, torch.bfloat16 if device.type == "cuda" else torch.float32,
                                   progress=config.progress, directory=directory)
        elif ":" in name:
            function = reward_function(name)  # imported: a later entry's mistake is named with first_only too
        else:
            raise UserError(f"--reward must be exact, math, module:function or a reward model directory or Hub id "
                            f"(or a comma-separated list), got {name!r}")
        if i == 0 or not first_only:
            functions.append(function)
    return functions


def check_reward_models_read(config: TrainConfig, functions: list, rows: list[dict]) -> None:
    """A reward model reads a conversation prompt through its own chat template: without one, step 1's scoring
    raised transformers' ValueError, a traceback after minutes of loading."""
    from rpo_engine.rewards.model import RewardModel

    if all(isinstance(row["prompt"], str) for row in rows):
        return
    for name, function in zip(reward_specs(config), functions):
        if isinstance(function, RewardModel) and not getattr(function.tokenizer, "chat_template", None):
            why = "--system-prompt makes every prompt one" if config.system_prompt else "the dataset's messages"
            raise UserError(f"--reward {config.reward}: the reward model {name} has no chat template to read the "
                            f"conversation prompts ({why}); give it one, or use string prompts")


def reward_specs(config: TrainConfig) -> list[str]:
    """The --reward names, with auto made exact (the built-in task) or math (a dataset)."""
    auto = "exact" if config.dataset is None and config.eval_dataset is None else "math"
    return [auto if name == "auto" else name for name in reward_names(config)]


def reward_pool(config: TrainConfig, functions: list):
    """--reward-workers N: a RewardPool for those of `functions` (resolved from --reward, in order; the first
    alone for `resolve_reward`'s) that score one completion a call; None when N is 0; an error when none does."""
    from rpo_engine.rewards import TRLStyleReward
    from rpo_engine.rewards.model import RewardModel
    from rpo_engine.rewards.pool import RewardPool

    if not config.reward_workers:
        return None
    pooled = {i: name for i, (name, fn) in enumerate(zip(reward_specs(config), functions))
              if not isinstance(fn, (TRLStyleReward, RewardModel))}
    if not pooled:  # else the workers were asked for and silently never started
        scored = config.reward if len(functions) > 1 else reward_specs(config)[0]
        raise UserError(f"--reward-workers does nothing with --reward {scored}: the workers score functions that take "
                        f"one completion a call, and a TRL-style function or a reward model scores a batch a call")
    return RewardPool(pooled, config.reward_workers)


def resolve_reward(config: TrainConfig):
    """The accuracy reward: the first --reward function."""
    return resolve_rewards(config, first_only=True)[0]


def check_output_dir(output: Path, option: str | None = None) -> None:
    """Fail before minutes of loading when `output` cannot become a directory we write to; `option` names the
    flag that gave it (default: --output OUTPUT)."""
    option = option or f"--output {output}"
    existing = output
    try:
        while not existing.exists() and existing != existing.parent:
            if existing.is_symlink():  # mkdir would fail on it after the model loaded
                raise UserError(f"{existing}: a broken symbolic link (to {os.readlink(existing)}) ({option})")
            existing = existing.parent
    except OSError as e:  # a name too long, a directory we may not search
        raise UserError(f"{option}: {e.strerror or e}") from None
    if not existing.is_dir():
        raise UserError(f"{existing}: is a file, not a directory ({option})")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{existing}: not writable ({option})")


def lock_output(output: Path):
    """Hold an exclusive lock on --output (flock on OUTPUT/.rpo_engine.lock) for the life of this process, released
    however it ends: two runs writing one directory at once (a requeued job started while the first still runs)
    truncated and interleaved each other's metrics.jsonl, set each other's checkpoints aside, and both exited 0.
    -> the open lock file, to keep open; None where the filesystem takes no locks (then unlocked, as before)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        return None
    path = output / ".rpo_engine.lock"
    try:
        output.mkdir(parents=True, exist_ok=True)
        held = open(path, "a+")
    except OSError as e:
        raise UserError(f"{e.filename or path}: {e.strerror or e}") from None
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.seek(0)
        holder = held.read().strip()
        held.close()
        raise UserError(f"{output}: another run is writing it{f' ({holder})' if holder else ''}; wait for it to end "
                        f"or pass another --output") from None
    except OSError:  # a filesystem without locks
        held.close()
        return None
    held.seek(0)
    held.truncate()
    held.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    held.flush()
    return held


def run_written(output: Path) -> tuple:
    """What a run writing `output` changes: its latest checkpoint, metrics.jsonl (size, time) and final/."""
    try:
        log = (output / "metrics.jsonl").stat()
        log = (log.st_size, log.st_mtime_ns)
    except OSError:
        log = None
    return latest_checkpoint(output), log, (output / "final").exists()


# what a run writes at the top of --output: finding one of them without metrics.jsonl means the directory is
# something else (a model's: its config.json would be overwritten by the run's options)
RUN_FILES = ("config.json", "curves.png", "completions.jsonl", "final", "final-adapter", "checkpoints")


def check_not_foreign(output: Path) -> None:
    """--output, not a run's directory, is new or holds none of what a run writes: never a model directory or
    other data that the run would overwrite."""
    clashes = [name for name in RUN_FILES if (output / name).exists()]
    if clashes:
        raise UserError(f"{output}: holds {', '.join(clashes)} but no run of rpo_engine (metrics.jsonl, a "
                        f"checkpoint), so a run would overwrite them (is it a model directory?); pass another --output")


def load_error_reason(e: Exception) -> str:
    """Why torch.load failed, in a line. Its weights-only refusal suggests loading with weights_only=False, which
    is no advice for a corrupt or foreign file (and would run whatever it holds): keep only the unpickler's reason."""
    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        reason = text.split("WeightsUnpickler error:", 1)[-1].strip().splitlines() if "WeightsUnpickler error:" in text else []
        return "unreadable as a weights-only torch file" + (f": {reason[0].split('. ')[0]}" if reason else "")
    return f"{type(e).__name__}: {next(iter(text.splitlines()), '')}"  # torch's load errors run to many lines


@contextlib.contextmanager
def not_resumable(checkpoint: Path):
    """What reading or restoring `checkpoint`'s trainer_state.pt raises, as one line naming the file."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as e:
        raise UserError(f"{checkpoint / 'trainer_state.pt'}: not a checkpoint this rpo_engine can resume "
                        f"({load_error_reason(e)})") from None


def read_trainer_state(checkpoint: Path) -> dict:
    """`checkpoint`'s trainer_state.pt, loaded weights-only, its step and rows_drawn checked (what can be without a
    model: the cached paths' token ids are checked against the vocabulary as the trainer restores them)."""
    from rpo_engine.trainer import check_state_counts

    state_file = checkpoint / "trainer_state.pt"
    with not_resumable(checkpoint):
        # Mapped, not read into every rank's memory: its pages are the page cache's, shared by the ranks of a
        # machine, and a rank keeps only what it loads from them (its shards under fsdp). Onto the CPU, not onto
        # the GPU rank 0 saved its tensors from (every rank would load them there). torch.save writes a zip;
        # any other file (legacy format, broken) is read as before, for torch's own error.
        state = torch.load(state_file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(state_file))
        if not isinstance(state, dict):
            raise TypeError(f"it holds a {type(state).__name__}, not a trainer state")
        check_state_counts(state)
    if state["step"] != checkpoint_step(checkpoint):  # copied under another step's name: which one is it?
        raise UserError(f"{state_file}: holds step {state['step']}, not its directory's "
                        f"{checkpoint_step(checkpoint)}; not a checkpoint this rpo_engine can resume")
    return state


def checkpoint_step(checkpoint: Path) -> int:
    return int(checkpoint.name.split("-")[1])  # step-N


def complete_checkpoints(output: Path) -> list[Path]:
    """OUTPUT/checkpoints/step-N directories that were fully written, oldest first (other names, a user's
    step-4.bak, are not ours)."""
    ckpts = [p for p in (output / "checkpoints").glob("step-*") if re.fullmatch(r"step-\d+", p.name)]
    ckpts.sort(key=checkpoint_step)
    return [p for p in ckpts if (p / "trainer_state.pt").is_file()]


def check_checkpoint_kind(checkpoint: Path, config: TrainConfig) -> None:
    """A LoRA run resumes from an adapter, a full fine-tuning run from a model: the other is a user error."""
    if not (checkpoint / "adapter").is_dir() and not (checkpoint / "model").is_dir():
        raise UserError(f"{checkpoint}: has lost its weights (no model/ directory, nor a LoRA run's adapter/); "
                        f"remove it to resume from an earlier checkpoint")
    if config.use_peft and not (checkpoint / "adapter").is_dir():
        raise UserError(f"{checkpoint}: holds full weights, not a LoRA adapter; resume without --use-peft")
    if not config.use_peft and not (checkpoint / "model").is_dir():
        raise UserError(f"{checkpoint}: holds a LoRA adapter; resume with --use-peft and the same --model")


def check_adapter_options(checkpoint: Path, config: TrainConfig) -> None:
    """A LoRA run resumes its adapter with the options that shaped it: other ones were refused only after the
    model loaded, in load_adapter's words, which named no option to give."""
    from rpo_engine.model.lora import TARGETS, LoRASettings, parse_targets, read_adapter_settings

    saved = read_adapter_settings(checkpoint / "adapter")
    given = LoRASettings(config.lora_r, float(config.lora_alpha), parse_targets(config.lora_target_modules),
                         config.use_rslora)
    if saved != given:
        targets = "all-linear" if saved.target_modules == TARGETS else ",".join(saved.target_modules)
        flags = (f"--lora-r {saved.r} --lora-alpha {saved.alpha:g} --lora-target-modules {targets}"
                 + (" --use-rslora" if saved.use_rslora else " and without --use-rslora" if config.use_rslora else ""))
        raise UserError(f"{checkpoint / 'adapter'}: the run's adapter has {saved.describe()}, these options "
                        f"{given.describe()}; a resumed run keeps its adapter: resume with {flags}")


def latest_checkpoint(output: Path) -> Path | None:
    complete = complete_checkpoints(output)
    return complete[-1] if complete else None


def chosen_checkpoint(output: Path, given: str) -> Path:
    """--resume-from-checkpoint's directory, checked before anything loads: a complete OUTPUT/checkpoints/step-N
    of the run in --output (a resume continues that run's logs)."""
    path, option = Path(given), f"--resume-from-checkpoint {given}"
    if not path.exists():
        raise UserError(f"{option}: no such directory")
    if not path.is_dir() or not re.fullmatch(r"step-\d+", path.name) or path.parent.name != "checkpoints":
        raise UserError(f"{option}: not a checkpoint (a run's OUTPUT/checkpoints/step-N directory)")
    run = path.parent.parent
    if run.resolve() != output.resolve():
        raise UserError(f"{option}: a checkpoint of the run in {run}, not of --output {output}; to branch a run "
                        f"off, copy its directory and resume the copy")
    if not (path / "trainer_state.pt").is_file():
        raise UserError(f"{option}: an incomplete checkpoint (no trainer_state.pt: its save was cut short); name an "
                        f"earlier one")
    return output / "checkpoints" / path.name


def set_aside_later(output: Path, checkpoint: Path) -> list[Path]:
    """A resume from a checkpoint older than the newest: rename what the run wrote after it, its later
    checkpoints and the final/ (and final-adapter/) the newest one's run ended with, NAME.superseded (-2, -3
    where taken): kept, never deleted, and no longer taken for this run's (by a later --resume, or by this
    run's saves, which replace a step-N directory they meet). -> the new paths."""
    later = [p for p in complete_checkpoints(output) if checkpoint_step(p) > checkpoint_step(checkpoint)]
    if later:
        later += [output / name for name in ("final", "final-adapter") if (output / name).exists()]
    moved = []
    for path in later:
        target, n = path.with_name(f"{path.name}.superseded"), 2
        while target.exists() or target.is_symlink():
            target, n = path.with_name(f"{path.name}.superseded-{n}"), n + 1
        path.rename(target)
        moved.append(target)
    return moved


def nothing_to_keep(output: Path, checkpoint: Path | None) -> bool:
    """A run's directory whose run stopped before its first step ended (interrupted, or a user error in the
    step-0 eval or step 1): no checkpoint, no final/, and in metrics.jsonl at most the step-0 eval of the
    starting model, which a new run redoes. Starting again there loses nothing. `checkpoint`: its latest."""
    if checkpoint is not None or (output / "final").exists():
        return False
    try:
        lines = [line for line in (output / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError):  # unreadable: not ours to overwrite
        return False
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number < len(lines):  # only the last line may be cut short (truncate_log's rule)
                return False
    return all(isinstance(r, dict) and r.get("step") == 0 for r in records)


_NO_RECORD = object()


def started_model(output: Path, checkpoint: Path):
    """The --model the run in `output` started from (None: the starter model), as its config.json records
    it, else the checkpoint's; _NO_RECORD when neither is readable."""
    for saved in (output / "config.json", checkpoint / "config.json"):
        try:
            model = json.loads(saved.read_text())["model"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if model is None or isinstance(model, str):
            return model
    return _NO_RECORD


def where_model_is(name: str) -> Path:
    """The directory a --model names (a Hub id: its snapshot already in the cache, never downloaded to compare),
    resolved; as written where there is none."""
    from rpo_engine.model.checkpoint import model_directory

    try:
        return model_directory(name, cached_only=True).resolve()
    except UserError:  # a full fine-tune resumes from its checkpoint without it
        return Path(name).resolve()


def default_repo_name(output: Path) -> str:
    """--push-to-hub's repository without --hub-model-id: --output's last part, checked as a Hub name here (the
    check of a given id names --hub-model-id, which this user never gave)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = output.resolve().name
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserError(f"--push-to-hub: --output's last part {name!r}, the repository's default name, is not a Hub "
                        f"repository name (letters, digits, '-', '_' and '.'); name the repository with "
                        f"--hub-model-id") from None
    return name


def check_resume(output: Path, checkpoint: Path, config: TrainConfig) -> None:
    """What resuming from `checkpoint` cannot do, said before minutes of loading and before anything is written."""
    from rpo_engine.data.starter import starter_model_dir

    started = started_model(output, checkpoint)
    if started is not _NO_RECORD and started != config.model:
        # the checkpoint holds the policy (under LoRA its adapter), --model the KL reference (under LoRA the base):
        # another model than the run's own would pair the policy with an unrelated one
        given, recorded = (starter_model_dir() if m is None else where_model_is(m) for m in (config.model, started))
        if given != recorded:
            raise UserError(f"{f'--model {config.model}' if config.model else 'no --model (the starter model)'}: the run "
                            f"in {output} started from {started or 'the starter model'}, and a resumed run keeps its "
                            f"model; resume with {f'--model {started}' if started else 'no --model'}")
    if config.use_peft and (checkpoint / "adapter").is_dir():
        check_adapter_options(checkpoint, config)
    at = checkpoint_step(checkpoint)
    if config.steps < at:
        raise UserError(f"--steps {config.steps} is below step {at}, where the run in {output} was checkpointed; a "
                        f"resumed run cannot go back: pass --steps {at} or more")
    for log in ("metrics.jsonl", "completions.jsonl"):  # cut back to `at` later
        truncate_log(output / log, at, check_only=True)


def prune_checkpoints(output: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (HF Trainer's save_total_limit): a 7B run's
    checkpoint holds weights and AdamW state, ~14 bytes per parameter (bf16 weights, their fp32 masters, two fp32
    moments). Each is renamed .step-N.pruned first: a run killed mid-delete left a step-N missing its
    trainer_state.pt, which no later prune counted (kept for good) or one missing its weights, still counted as
    complete."""
    import shutil

    for old in complete_checkpoints(output)[:-keep]:
        gone = old.with_name(f".{old.name}.pruned")
        old.rename(gone)
        shutil.rmtree(gone)


def remove_save_leftovers(output: Path) -> None:
    """What a run killed while it saved or pruned left in OUTPUT/checkpoints: a .step-N.tmp (a checkpoint's size;
    only a later save of the same step removed it, never made where the run goes on with other --save-steps or
    was saving at a stop signal's step) and a .step-N.pruned. Rank 0 of the one run writing --output calls it."""
    import shutil

    for path in (output / "checkpoints").glob(".step-*"):
        if re.fullmatch(r"\.step-\d+\.(tmp|pruned)", path.name) and path.is_dir():
            shutil.rmtree(path)


def eval_label(config: TrainConfig) -> str:
    """What eval_accuracy measures under `config`: greedy, or avg@K of sampled answers."""
    if config.eval_temperature == 0:
        return "greedy eval accuracy"
    return f"eval accuracy, {sampled_eval(config)}"


def sampled_eval(config: TrainConfig) -> str:
    return f"avg@{config.num_generations_eval} at T={config.eval_temperature:g}"


def eval_note(config: TrainConfig) -> str:
    """What a printed eval accuracy is, after it: " (avg@K at T=t)" for a sampled eval, nothing for a greedy one."""
    return f" ({sampled_eval(config)})" if config.eval_temperature else ""


# what write_plot and the closing summary read of each step's record
PLOTTED = ("step", "reward_mean", "rollout_generated_tokens", "eval_accuracy", "eval_pass_at_k")


def plotted(record: dict) -> dict:
    """The part of a metrics record the run keeps until its end (for curves.png): all of each step's ~40 metrics
    grew the process by ~1.3 KiB a step (130 MiB over 100k steps)."""
    return {key: record[key] for key in PLOTTED if key in record}


def write_plot(metrics: list[dict], path: Path, title: str, eval_title: str = "greedy eval accuracy") -> None:
    # a Figure of its own, not pyplot's: matplotlib.use("Agg") switched a notebook's backend, and pyplot's figures
    # are the caller's global state (its GUI backends refuse a worker thread)
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    steps = [m for m in metrics if "reward_mean" in m]
    evals = [m for m in metrics if "eval_accuracy" in m]
    marker = "o" if len(steps) == 1 else None  # a line through one point draws nothing
    fig = Figure(figsize=(14, 3.8))
    axes = fig.subplots(1, 3)
    axes[0].plot([m["step"] for m in steps], [m["reward_mean"] for m in steps], marker=marker)
    axes[0].set(title="reward (mean over samples)", xlabel="step")
    axes[1].plot([m["step"] for m in evals], [m["eval_accuracy"] for m in evals], marker="o")
    passes = [m for m in evals if "eval_pass_at_k" in m]  # a sampled eval's pass@K beside its avg@K
    if passes:
        axes[1].plot([m["step"] for m in passes], [m["eval_pass_at_k"] for m in passes], marker="o")
        axes[1].legend(["avg@K", "pass@K"], loc="lower right")
    axes[1].set(title=eval_title, xlabel="step", ylim=(0, 1))
    axes[2].plot([m["step"] for m in steps], [m["rollout_generated_tokens"] for m in steps], marker=marker)
    axes[2].set(title="generated tokens per step", xlabel="step", ylim=(0, None))
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # steps, not 1.25
    fig.suptitle(title)
    fig.tight_layout()
    with replaced_whole(path) as tmp:
        fig.savefig(tmp, dpi=100, format=path.suffix[1:] or "png")


@contextlib.contextmanager
def replaced_whole(path: Path):
    """A temporary name beside `path` to write, renamed over `path` once written: a write cut short (a full disk,
    named in one line) leaves the file before, not half of a new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with refusals_named(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_model_is_no_adapter(model: Path) -> None:
    """--model given a LoRA adapter's directory (a run's final-adapter/, a PEFT save), or a model's holding one."""
    from rpo_engine.model.lora import ADAPTER_CONFIG, adapter_in

    kind = adapter_in(model)
    if kind == "alone":
        raise UserError(f"--model {model}: a LoRA adapter, not a model; train from its base model (--use-peft for a "
                        f"new adapter), or from a merged model (a LoRA run's final/)")
    if kind == "beside":
        raise UserError(f"--model {model}: holds a LoRA adapter ({ADAPTER_CONFIG}) beside the model, which transformers "
                        f"applies when it loads the directory and training would leave out; pass a merged model (a "
                        f"LoRA run's final/) or a copy without {ADAPTER_CONFIG}")


def build_trainer(config: TrainConfig, checkpoint: Path | None = None, dist: Dist | None = None):
    """A Trainer for `config`, its weights from `checkpoint` (a step-N directory) when resuming."""
    import rpo_engine
    from rpo_engine.model.checkpoint import model_directory
    from rpo_engine.model.lora import apply_lora, load_adapter
    from rpo_engine.trainer import Trainer

    dist = dist or Dist()
    device, dtype = resolve_device(config)
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)

    @cache  # one lookup of a Hub id: the model, its tokenizer and the KL reference read the same snapshot
    def initial_model_dir() -> Path:
        if config.model is not None:
            return model_directory(config.model)
        from rpo_engine.data.starter import ensure_starter_model

        if dist.local_rank == 0:  # one builder per machine; the others wait, then load it
            ensure_starter_model(progress=config.progress)
        dist.barrier()
        return ensure_starter_model(progress=config.progress)

    resuming = checkpoint is not None
    if resuming:
        check_checkpoint_kind(checkpoint, config)
    elif config.model is not None:
        check_model_is_no_adapter(initial_model_dir())
    # Under LoRA the checkpoint holds the adapter only: the base is --model, as when the run started.
    model_dir = checkpoint / "model" if resuming and not config.use_peft else initial_model_dir()
    model = rpo_engine.load_model(model_dir, dtype=dtype, device=device)
    tokenizer = rpo_engine.load_tokenizer(model_dir)
    if config.use_peft:
        apply_lora(model, config.lora_r, config.lora_alpha, config.lora_target_modules, seed=config.seed,
                   use_rslora=config.use_rslora)
        if resuming:
            load_adapter(model, checkpoint / "adapter")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    train_rows, eval_rows = load_rows(config)
    reference = None
    # the KL reference is the starting model, not the checkpoint's (under LoRA: the base, adapters off), or
    # with --sync-ref-model the checkpoint's reference/ (a checkpoint of a run without it has none)
    if resuming and config.algo.beta > 0 and not config.use_peft:
        synced = checkpoint / "reference"
        reference = rpo_engine.load_model(synced if config.algo.sync_ref_model and synced.is_dir()
                                          else initial_model_dir(), dtype=dtype, device=device)
    functions = resolve_rewards(config, device)
    check_reward_models_read(config, functions, train_rows)
    pool = reward_pool(config, functions)
    accuracy, *extra_rewards = functions if pool is None else pool.functions(functions)
    return Trainer(config, model, tokenizer, train_rows, eval_rows, accuracy, device, dist, reference=reference,
                   extra_rewards=extra_rewards)


# under torchrun, a rank's exception (a bug, not a user mistake) reaches torchrun's failure summary
@partial(record, error_handler=RankErrorHandler())
def main(argv=None) -> int:
    try:
        config = parse_args(argv)
        dist = Dist.from_env(config.parallel, resolve_device(config)[0].type, config.dist_timeout)
        code = train(config, dist)
    except UserError as e:
        if "RANK" not in os.environ:  # a single process: run_cli prints it
            raise
        # a rank's one line, naming the rank, and exit code 2 (torchrun then stops the others), without the
        # traceback @record would hand torchrun's summary; the line is that summary's root cause, not the lost
        # connection the other ranks' collectives then fail with
        which = f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", 1)) > 1 else ""
        line = f"error: {which}{e}"
        print(line, file=sys.stderr, flush=True)
        write_torchrun_error(line)
        return 2
    dist.close()  # not on an exception: torchrun stops the other ranks, a peer would hang in a collective
    if dist.enabled:
        leave_process(code)
    return code


def train(config: TrainConfig, dist: Dist | None = None) -> int:
    """The run `config` asks for, in this process (`dist`: under torchrun, the process group main() joins); -> its
    exit code (0, or 128 + the signal that stopped it after a step). A user mistake raises UserError. The lock on
    --output goes with it, however it ends (left to the frame's end, an error's traceback could hold it past the
    run, refusing the next run in this process)."""
    try:
        with contextlib.ExitStack() as held:
            return run_training(config, dist or Dist(), held)
    except UserError as e:
        clear_frames(e)  # a notebook keeps the error: its frames held the trainer, the model and the K/V cache
        raise


def run_training(config: TrainConfig, dist: Dist, held: contextlib.ExitStack) -> int:
    from rpo_engine.progress import progress_bar
    from rpo_engine.rewards.pool import PooledReward

    check_divisible(config.prompts_per_step, dist.world_size)
    main_rank = dist.is_main  # rank 0 writes every output; the others compute
    if not config.progress:
        from rpo_engine.hub import download_bars_hidden

        held.enter_context(download_bars_hidden())
    if not config.output:  # Path("") is the current directory: the run would fill it
        raise UserError("--output is empty; name the run's directory")
    output = Path(config.output)
    check_output_dir(output)
    metrics_path = output / "metrics.jsonl"
    found, seen = latest_checkpoint(output), run_written(output)
    chosen = chosen_checkpoint(output, config.resume_from_checkpoint) if config.resume_from_checkpoint else None
    resume = config.resume or chosen is not None
    if metrics_path.exists() and nothing_to_keep(output, found):  # resume-or-start, and a plain rerun likewise
        if main_rank:
            print(f"{output}: its run stopped before its first step ended (no checkpoint, no step in metrics.jsonl); "
                  f"starting it again")
    elif metrics_path.exists() or found:  # a run's directory
        if not resume:
            raise UserError(f"{output}: already holds a run; pass --resume or another --output" if found
                            else f"{output}: holds a run that stopped before its first checkpoint (metrics.jsonl, no "
                                 f"checkpoints/step-N); remove it or pass another --output")
        if found is None:
            raise UserError(f"{output}: --resume found no complete checkpoint (the run stopped before its first "
                            f"--save-steps); remove the directory to start again")
    else:
        check_not_foreign(output)
        if resume and dist.is_main:  # resume-or-start, as a preempted job's command reruns as it is
            print(f"--resume: {output} holds no run yet; starting a new one")
    checkpoint = (chosen or found) if resume else None
    if checkpoint is not None:
        check_resume(output, checkpoint, config)
        if config.steps == checkpoint_step(checkpoint) and main_rank:
            print(f"--resume: {checkpoint} is at --steps {config.steps}: nothing left to train; writing final/ from it")
    warmup = warmup_length(config)
    if main_rank and warmup >= config.steps > 1:  # accepted, as transformers does; likely a slip
        print(f"warning: the warmup ({warmup} steps) is not shorter than --steps {config.steps}: the "
              f"learning rate rises through the whole run, never reaching --learning-rate nor decaying", file=sys.stderr)
    if len(set(dist.gather(str(checkpoint)))) > 1:  # also: every rank has looked before rank 0 writes
        raise UserError(f"{output}: the ranks see different checkpoints; --output must be on a filesystem every node shares")
    # read before the model loads (a broken or copied trainer_state.pt said at once, not after a 7B model loaded) and
    # before --push-to-hub makes its repository (for a run that cannot resume)
    saved_state = read_trainer_state(checkpoint) if checkpoint is not None else None

    hub_repo = None
    if config.push_to_hub and main_rank:  # before the training: a missing token or network fails now, not in hours
        from rpo_engine.hub import create_push_repo

        hub_repo = create_push_repo(config.hub_model_id or default_repo_name(output), config.hub_private_repo)
    trainer = build_trainer(config, checkpoint, dist=dist)
    # after the checks above and the loading (a directory they refuse, a model's, or a run's --output a bad --model or
    # dataset stops, gets no lock file nor a directory made for it), before anything is written; held until train returns
    lock = lock_output(output) if main_rank else None
    if lock is not None:
        held.enter_context(lock)
        # a run that held it while this one loaded (and has ended) made the choices above stale: resuming from the
        # checkpoint chosen then would set its later ones and final/ aside
        if run_written(output) != seen:
            raise UserError(f"{output}: another run wrote it while this one loaded; run the command again")
    # What the run holds is let go on an error too (closed again at the normal end: no-ops then); left to the
    # error's traceback, an in-process caller kept its reward workers, log files and TensorBoard writer (a
    # thread) until a garbage collection. The pools, not the trainer: a push to the Hub frees it before its upload.
    for pool in {id(fn.pool): fn.pool for fn in (trainer.reward_fn, *trainer.extra_rewards)
                 if isinstance(fn, PooledReward)}.values():
        held.callback(pool.close)
    if main_rank and trainer.device.type == "cuda":  # what --gpu-memory-utilization gave the rollout
        print(f"rollout K/V cache: {trainer.engine.kv_cache_bytes / 2**30:.1f} GiB, "
              f"{trainer.engine.num_blocks * trainer.engine.block_size} tokens")
    records = []
    if checkpoint is not None:
        with not_resumable(checkpoint):
            trainer.load_state_dict(saved_state)
        del saved_state
        if main_rank:  # the log loses the steps after the checkpoint: this run writes them again
            set_aside = set_aside_later(output, checkpoint)
            records = [plotted(r) for r in truncate_log(metrics_path, trainer.step_num, keep=True)]
            print(f"resumed from {checkpoint} at step {trainer.step_num}" +
                  (f" on {dist.world_size} ranks" if dist.enabled else ""))
            if set_aside:
                print(f"kept aside what the run wrote after step {trainer.step_num}: "
                      f"{', '.join(str(p.relative_to(output)) for p in set_aside)}")
    reporter, log, completions_log = None, None, None
    if main_rank:
        output.mkdir(parents=True, exist_ok=True)
        remove_save_leftovers(output)
        # the log before config.json: a run killed between the two (TensorBoard's import takes seconds) must leave
        # a run's directory, which a rerun starts again, not a config.json that reads as another program's
        with refusals_named(metrics_path):
            log = open(metrics_path, "a" if checkpoint is not None else "w")  # "w": a run started again
        held.callback(log.close)
        if checkpoint is not None:  # against the options the checkpoint was made with (older ones: the run's record)
            made_with = checkpoint / "config.json"
            warn_changed_options(made_with if made_with.is_file() else output / "config.json", config)
        with replaced_whole(output / "config.json") as tmp:  # the record --config DIR/config.json --resume reads
            tmp.write_text(json.dumps(config_to_dict(config), indent=2) + "\n")
        reporter = Reporter(report_targets(config.report_to), output, config_to_dict(config),
                            resumed_at=trainer.step_num if checkpoint is not None else None)
        held.callback(reporter.close, finish_wandb=False)  # a W&B run an error ends is W&B's exit hook's to mark
        # also without --log-completions now: its records past the checkpoint describe steps this run undoes
        truncate_log(output / "completions.jsonl", trainer.step_num)
        if config.log_completions:
            with refusals_named(output / "completions.jsonl"):
                completions_log = open(output / "completions.jsonl", "a")
            held.callback(completions_log.close)
    if trainer.step_num == 0 and config.eval_steps and trainer.eval_rows:
        if main_rank:  # before the training bar: what the wait is for
            print(f"step 0: evaluating the starting model on {len(trainer.eval_rows)} prompts", flush=True)
        first_eval = {"step": 0, **trainer.evaluate_metrics()}
        records.append(plotted(first_eval))
        if main_rank:
            with refusals_named(metrics_path):
                log.write(json.dumps(first_eval) + "\n")
                log.flush()
            reporter.log(first_eval)
            pass_at_k = (f", pass@{config.num_generations_eval} {first_eval['eval_pass_at_k']:.3f}"
                         if "eval_pass_at_k" in first_eval else "")
            print(f"step 0: eval accuracy {first_eval['eval_accuracy']:.3f}{eval_note(config)}{pass_at_k}")

    algo_name = f"{'RPO-' if config.rpo.rpo else ''}{config.algo.algo.upper()}"
    bar = progress_bar(total=config.steps, initial=trainer.step_num, desc=algo_name,
                       disable=not (config.progress and main_rank), dynamic_ncols=True)
    held.callback(bar.close)  # an error's traceback, which a notebook keeps, held it open: the next bar went below it
    generated, seconds, stopped_by = 0, 0.0, 0
    fail_at = os.environ.get("RPO_ENGINE_TEST_FAIL_AT")  # tests only, "RANK:STEP": that rank raises there
    stop = StopSignals().install()
    try:
        while trainer.step_num < config.steps:
            if fail_at == f"{dist.rank}:{trainer.step_num + 1}":
                raise RuntimeError(f"RPO_ENGINE_TEST_FAIL_AT: rank {dist.rank} fails at step {trainer.step_num + 1}")
            m = step_or_explain(trainer, config)
            step = m["step"]
            if config.eval_steps and trainer.eval_rows and (step % config.eval_steps == 0 or step == config.steps):
                bar.set_postfix_str(f"step {step}: eval on {len(trainer.eval_rows)} prompts")  # its bar shows below
                m.update(trainer.evaluate_metrics())
            if main_rank:
                records.append(plotted(m))
                with refusals_named(metrics_path):
                    log.write(json.dumps(m) + "\n")
                    log.flush()
                reporter.log(m)
                if completions_log is not None:
                    with refusals_named(output / "completions.jsonl"):
                        completions_log.writelines(json.dumps(r) + "\n" for r in trainer.completions)
                        completions_log.flush()
                    reporter.log_completions(step, trainer.completions)
                generated += m["rollout_generated_tokens"]
                seconds += m["step_time_s"]
                # accuracy beside the reward: the reward also holds length shaping and any other functions
                postfix = {"reward": f"{m['reward_mean']:.3f}", "acc": f"{m['accuracy_mean']:.3f}",
                           "gen_tok/s": f"{generated / seconds:.0f}", "step_s": f"{m['step_time_s']:.1f}"}
                if "eval_accuracy" in m:
                    postfix["eval"] = f"{m['eval_accuracy']:.3f}"
                bar.set_postfix(postfix)
                bar.update(1)
            stopped_by = int(dist.max([stop.received])[0])  # a rank's signal stops every rank after the same step
            if (config.save_steps and step % config.save_steps == 0) or step == config.steps or stopped_by:
                trainer.save_checkpoint(output / "checkpoints" / f"step-{step}")  # every rank: a collective under fsdp
                if main_rank and config.save_total_limit:
                    prune_checkpoints(output, config.save_total_limit)
            if stopped_by:
                break
    finally:
        stop.restore()
    bar.close()
    trainer.close()
    stopped = trainer.step_num < config.steps
    if not stopped:
        trainer.save_model(output / "final")
    if not main_rank:
        return 128 + stopped_by if stopped else 0
    log.close()
    if completions_log is not None:
        completions_log.close()
    reporter.close()
    write_plot(records, output / "curves.png", f"{algo_name} on {config.dataset or 'the built-in arithmetic task'}",
               eval_label(config))
    if stopped:
        # the same command with --resume-from-checkpoint would go back to that checkpoint, not on from this one
        again = ("--resume in place of --resume-from-checkpoint" if config.resume_from_checkpoint
                 else "the same command with --resume")
        print(f"stopped by {signal.Signals(stopped_by).name} after step {trainer.step_num} of {config.steps}: "
              f"{output / 'checkpoints' / f'step-{trainer.step_num}'} written; {again} goes on from it", flush=True)
        return 128 + stopped_by
    evals = [r["eval_accuracy"] for r in records if "eval_accuracy" in r]
    summary = f"done: {output / 'final'}"
    if evals:
        summary += f"; eval accuracy {evals[0]:.3f} -> {evals[-1]:.3f}{eval_note(config)}"
    print(summary)
    if hub_repo is not None:  # a LoRA run pushes its adapter, as TRL pushes a PEFT model
        from rpo_engine.hub import push_folder

        # The ranks part first (main's close is then a no-op): the others wait there under --dist-timeout, and an
        # upload can outlast it (a large model, a slow link); their failed barrier made torchrun stop this one
        # mid-upload. The trainer goes first, so that close collects its FSDP cycles while the group is up.
        del trainer
        dist.close()
        folder = output / ("final-adapter" if config.use_peft else "final")
        url = push_folder(hub_repo, folder, f"rpo_engine: {algo_name}, {config.steps} steps")
        print(f"pushed {folder} to {url}")
    return 0


class StopSignals:
    """SIGTERM (`kill`, Kubernetes, a torchrun stopping its ranks), SIGUSR1 (SLURM's --signal=USR1@SECONDS,
    sent ahead of a time limit) or SIGINT (Ctrl-C) asks a run to stop after the step it is in: it writes a
    checkpoint and exits with 128 + the signal's number, as a process the signal ended, for --resume to go on
    from. A second one stops it at once, as without this (Ctrl-C: a KeyboardInterrupt). `received`: the first
    signal's number (0: none)."""
    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.received, self.previous = 0, {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            # a Ctrl-C the process was started ignoring (a script's `cmd &`, nohup-like wrappers) stays ignored
            self.previous = {signum: signal.signal(signum, self.handle) for signum in self.SIGNALS
                             if not (signum == signal.SIGINT and signal.getsignal(signum) == signal.SIG_IGN)}
        return self

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def handle(self, signum, frame) -> None:
        if self.received:
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step, with a checkpoint (send it again to stop "
              f"at once)", file=sys.stderr, flush=True)


def step_or_explain(trainer, config: TrainConfig) -> dict:
    """trainer.step(); running out of GPU memory is a setting too large for this GPU: a one-line error
    that names the settings to change, not a traceback."""
    try:
        return trainer.step()
    except torch.cuda.OutOfMemoryError as e:
        kv_gib = trainer.engine.kv_cache_bytes / 2**30
        first = next(iter(str(e).strip().splitlines()), "")
        raise UserError(f"out of GPU memory in step {trainer.step_num + 1} ({first[:200]}); the rollout's K/V cache "
                        f"holds {kv_gib:.1f} GiB: lower --gpu-memory-utilization (now {config.gpu_memory_utilization}) "
                        f"or --micro-batch-tokens (now {config.micro_batch_tokens}), or add --gradient-checkpointing"
                        + ("" if config.use_peft else " or --use-peft")) from None


# Options a resumed run may change without changing what it trains (more --steps extends the run; a --model
# that check_resume let through names the same model, e.g. a Hub id's snapshot directory); from
# async_scheduling on, how, not what, is computed (step_or_explain tells a run out of GPU memory to change
# micro_batch_tokens or gradient_checkpointing: resuming with them is no changed run).
_RESUME_FREE = {"resume", "resume_from_checkpoint", "steps", "output", "config", "progress", "report_to", "log_completions", "eval_steps",
                "eval_size", "model", "save_steps", "save_total_limit", "dist_timeout", "async_scheduling",
                "gpu_memory_utilization", "max_num_seqs", "enforce_eager", "lora_merged_rollout", "parallel", "reward_workers", "micro_batch_tokens",
                "gradient_checkpointing", "prefix_sharing", "push_to_hub", "hub_model_id", "hub_private_repo", "enable_sleep_mode",
                "eval_temperature", "eval_top_p", "eval_top_k", "num_generations_eval"}


def warn_changed_options(saved: Path, config: TrainConfig) -> None:
    """A resumed run that changes a training option (the learning rate, G, the algorithm, ...) is no longer
    the run it continues: say which, once, on stderr (it goes on; changing them can be deliberate)."""
    try:
        before = _flat(json.loads(saved.read_text()))
    except (OSError, ValueError):
        return  # no readable record of the options: nothing to compare
    before = boolean_scale_rewards_named(before)  # an older run's record: the same option, named now
    now = _flat(config_to_dict(config))
    changed = [f"{k} {before[k]!r} -> {now[k]!r}" for k in now if k in before and k not in _RESUME_FREE
               and before[k] != now[k]]
    if changed:
        print(f"warning: resuming with changed options: {'; '.join(changed)}", file=sys.stderr)


def _flat(options: dict) -> dict:
    return {k2: v2 for k, v in options.items() for k2, v2 in (v.items() if isinstance(v, dict) else [(k, v)])}


def truncate_log(path: Path, step: int, keep: bool = False, check_only: bool = False) -> list[dict]:
    """Drop the records of a JSONL log past `step`; -> the kept records if `keep`. A last line cut short (the
    run was killed while writing it) is dropped; any other line that does not parse is a UserError, as is a log
    that cannot be read. `check_only`: read it for those errors, write nothing. Where the kept lines are the
    log's first (a log written in step order) it is cut after them in place: a long run's --log-completions log
    holds gigabytes, and a rewrite at every resume took as much free disk again and the time to copy it. Else it
    is rewritten into a temporary file renamed over it (a crash here loses nothing either way)."""
    if not path.exists():
        return []
    kept, kept_bytes, in_place, dropped = [], 0, True, False
    for raw, record_step, entry in _log_lines(path):
        if record_step is not None and record_step <= step:
            in_place = in_place and not dropped and raw.endswith(b"\n")
            kept_bytes += len(raw)
            if keep:
                kept.append(entry)
        else:
            dropped = True
    if check_only:
        return kept
    try:
        if in_place:
            if kept_bytes < path.stat().st_size:
                with open(path, "r+b") as f:
                    f.truncate(kept_bytes)
            return kept
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as dst:
                for raw, record_step, _ in _log_lines(path):
                    if record_step is not None and record_step <= step:
                        dst.write(raw if raw.endswith(b"\n") else raw + b"\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:  # no permission, a full disk
        raise UserError(f"{e.filename or path}: {e.strerror or e}") from None
    return kept


def _log_lines(path: Path):
    """truncate_log's reading of a JSONL log: each line as (its bytes, its record's step, the record), step and
    record None for a blank line; a last line that does not parse is left out, any other is a UserError, as is a
    log that cannot be read."""
    broken = None
    try:
        with open(path, "rb") as src:
            for number, raw in enumerate(src, 1):
                if broken is not None:  # the bad line was not the last
                    raise UserError(f"{path}:{broken}: not a JSON record with a step; fix or remove the line")
                line = raw.decode()
                try:
                    entry = json.loads(line) if line.strip() else None
                    record_step = None if entry is None else int(entry["step"])
                except (ValueError, TypeError, KeyError):
                    broken = number
                    continue
                yield raw, record_step, entry
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text (a line holds the byte 0x{e.object[e.start]:02x}); fix or remove "
                        f"that line") from None
    except OSError as e:  # a directory in its place, no permission
        raise UserError(f"{e.filename or path}: {e.strerror or e}") from None


if __name__ == "__main__":
    sys.exit(run_cli(main))
