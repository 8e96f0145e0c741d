"""What every benchmark shares: its command line (one-line errors on bad input), what it records beside its
figures (the machine, the commit) and how it writes them."""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from rpo_engine.errors import UserError, run_cli

HERE = Path(__file__).resolve().parent


def arg_parser(**kwargs) -> argparse.ArgumentParser:
    """argparse whose mistakes are one line and exit 2 (rpo_engine.config.OneLineParser), named as it was run."""
    try:
        from rpo_engine.config import OneLineParser
    except ImportError:  # bench_host's baseline run on an older checkout's rpo_engine, given our own arguments
        return argparse.ArgumentParser(prog=sys.argv[0], **kwargs)
    return OneLineParser(prog=sys.argv[0], **kwargs)


def cli(main) -> None:
    """Run `main(argv)` as a command: a UserError (bad input) is `error: <message>` and exit code 2, no traceback."""
    sys.exit(run_cli(main))


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (a count of repeats, prompts, tokens, ...)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def out_path(text: str) -> Path:
    """argparse type of --out: a file we can write, checked before the run rather than found out after it."""
    from rpo_engine.train import check_output_dir

    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a directory; pass a file path")
    try:  # its directory: the one a training run's --output must be able to become
        check_output_dir(path.parent, f"--out {text}")
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def check_gpu(gpu: bool) -> None:
    if gpu and not torch.cuda.is_available():
        raise UserError("--gpu: torch sees no CUDA device")


def train_config(argv: list[str], option: str):
    """rpo_engine.train's config for `argv`, checked before any training starts: a flag it does not take, a bad
    value or a missing --model/--dataset is a one-line error naming `option`, the benchmark flag that passed it,
    not a failure minutes into the run (or in a worker process)."""
    from rpo_engine.config import parse_args

    try:
        config = parse_args(argv)
    except UserError as e:
        raise UserError(f"{option}: {e}") from None
    if config.model is not None and not Path(config.model).is_dir():
        raise UserError(f"{option}: --model {config.model}: model directory not found")
    for flag, path in (("--dataset", config.dataset), ("--eval-dataset", config.eval_dataset)):
        if path is not None and not Path(path).exists():
            raise UserError(f"{option}: {flag} {path}: not found")
    return config


def random_model(config, device, dtype):
    """A random-weight CausalLM (seed 0, transformers' initialisation) made on `device` in `dtype` as load_model
    makes a checkpoint's: Module.to(dtype) rounds RoPE's inv_freq buffer too (in bf16 a frequency is up to 0.4% off,
    radians of angle 4k positions in), so it is recomputed in fp32 after the cast, as load_model does."""
    # imported here: bench_host's baseline run imports this module with an older checkout's rpo_engine
    from rpo_engine.model import CausalLM
    from rpo_engine.model.config import rope_inv_freq

    torch.manual_seed(0)
    with torch.device(device):  # made and initialised on the device: a 7B model on the CPU first would take minutes
        model = CausalLM(config).init_weights().to(dtype)
    model.model.rotary_emb.inv_freq = rope_inv_freq(config).to(device)
    return model


def rotated(names: list, round_: int) -> list:
    """`names` in round `round_`'s order: A B C, then B C A, C A B, ... (each takes every place in turn)."""
    k = round_ % len(names)
    return names[k:] + names[:k]


def time_alternating(calls: dict, repeats: int, *, warmup: int = 1, sync=None, before=None, after=None,
                     errors: tuple = ()) -> dict:
    """Time each of `calls` (name -> function of no arguments) `repeats` times, one call of each a round, the
    order rotated every round (rotated), after `warmup` untimed rounds: drift on the machine (heat, another job,
    caches) falls on every variant alike, where timing all of A's repeats before B's would hand it to one of them.
    `sync` (torch.cuda.synchronize on CUDA) runs before and after each timed call, `before(name)` and
    `after(name)` untimed around every call. A call (or its `before`) that raises one of `errors` leaves its
    variant out of the rounds after it. -> name -> {"wall": [seconds a timed call], "cpu": [this process's CPU
    seconds a timed call], "results": [what each timed call returned]}, plus "error" (the exception) for a variant
    that failed."""
    sync = sync or (lambda: None)
    timings = {name: {"wall": [], "cpu": [], "results": []} for name in calls}
    for round_ in range(warmup + repeats):
        for name in rotated([n for n in calls if "error" not in timings[n]], round_):
            try:
                if before:
                    before(name)
                sync()
                t0, c0 = time.perf_counter(), time.process_time()
                result = calls[name]()
                sync()
                wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            except errors as e:
                timings[name]["error"] = e
                continue
            finally:
                if after:
                    after(name)
            if round_ >= warmup:
                timings[name]["wall"].append(wall)
                timings[name]["cpu"].append(cpu)
                timings[name]["results"].append(result)
    return timings


def time_steps(steps: dict, repeats: int) -> dict:
    """time_alternating over training steps: `steps` maps a name to (model, step), `step()` a forward and backward
    of `model`, each run from zeroed gradients, one warm-up round. -> name -> ({"ms": median wall ms, and on CUDA
    "cuda_peak_mib" (its last run's peak above what was allocated before it), on CPU "cpu_ms" (this process's CPU
    time, which other jobs on a shared machine disturb less)}, its last run's return value), or ({"oom": True},
    None) where a step ran out of CUDA memory. Each model keeps its last run's gradients."""
    cuda = next(next(iter(steps.values()))[0].parameters()).is_cuda
    base, peak = {}, {}

    def before(name):
        steps[name][0].zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base[name] = torch.cuda.memory_allocated()

    def after(name):
        if cuda:
            peak[name] = torch.cuda.max_memory_allocated() - base[name]

    timings = time_alternating({name: step for name, (_, step) in steps.items()}, repeats,
                               sync=torch.cuda.synchronize if cuda else None, before=before, after=after,
                               errors=(torch.cuda.OutOfMemoryError,))
    rows = {}
    for name, t in timings.items():
        if "error" in t:  # e.g. the padded batch of the 1.5B shape at G=16
            steps[name][0].zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            rows[name] = ({"oom": True}, None)
            continue
        row = {"cuda_peak_mib": peak[name] / 2**20} if cuda else {"cpu_ms": 1e3 * statistics.median(t["cpu"])}
        rows[name] = (dict(row, ms=1e3 * statistics.median(t["wall"])), t["results"][-1])
    return rows


def compare_steps(plain: dict, shared: dict) -> None:
    """shared's speedup and memory reduction over plain (time_steps + saved_mib rows), unless either ran out of
    memory."""
    if not plain.get("oom") and not shared.get("oom"):
        shared["speedup"] = plain["ms"] / shared["ms"]
        shared["memory_reduction"] = plain["saved_mib"] / shared["saved_mib"]


def step_columns(row: dict) -> str:
    """A compared row's ms, cpu ms, saved MiB, cuda MiB (nan where not measured), speedup and memory ratio, OOM."""
    nan = float("nan")
    return (f"{row.get('ms', nan):>8.0f} {row.get('cpu_ms', nan):>8.0f} {row.get('saved_mib', nan):>10.1f} "
            f"{row.get('cuda_peak_mib', nan):>9.0f}"
            + (f" {row['speedup']:>7.2f}x {row['memory_reduction']:>5.2f}x" if "speedup" in row else "")
            + ("  OOM" if row.get("oom") else ""))


def saved_activation_bytes(parameters, step) -> int:
    """Bytes of the distinct storages autograd keeps for backward while `step()` runs, `parameters` excluded."""
    params = {p.untyped_storage().data_ptr() for p in parameters}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def machine(device=None) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda":
        return torch.cuda.get_device_name()
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()} ({torch.get_num_threads()} threads)"


def git_head(directory) -> str | None:
    """HEAD of the checkout at `directory`, or None where there is no git binary or no .git."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=directory, check=True)
    except (OSError, subprocess.CalledProcessError):  # OSError: FileNotFoundError when git is not installed
        return None
    return proc.stdout.strip() or None


def git_commit() -> str:
    """$GIT_COMMIT (the GPU machine's copy may have no .git, or no git), else HEAD of this checkout, else
    "unknown": it is recorded beside the figures, so it must never fail the run."""
    return os.environ.get("GIT_COMMIT") or git_head(HERE) or "unknown"


def partial_path(path) -> Path:
    """Where a run that has not finished keeps what it measured: results/x.json -> results/x.partial.json."""
    path = Path(path)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def save_json(path, record: dict, partial: bool = False) -> Path:
    """Write `record` to `path` (parents created) and say so, with the load that may have skewed the times.

    partial=True (a run saving as it goes, so a time limit keeps what it measured, or one with failed cases)
    writes beside it, to partial_path(path): a complete file, e.g. a committed result, is only ever replaced
    by a complete one, which also removes the partial file. Each write goes to a temporary file renamed over
    the target, so an interrupted write leaves no torn file either."""
    path = Path(path)
    target = partial_path(path) if partial else path
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, target)
    except BaseException:  # e.g. a time limit's SIGINT mid-write: the target is intact, drop the torn copy
        tmp.unlink(missing_ok=True)
        raise
    if not partial:
        partial_path(path).unlink(missing_ok=True)
    print(f"wrote {target}{' (partial)' if partial else ''} (1-min load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} CPUs)")
    return target
