"""Where a run's per-step metrics go besides metrics.jsonl (`--report-to`, TRL's name): TensorBoard event files
under OUTPUT/tensorboard/, and Weights & Biases. Only the main rank reports.

`auto` (the default) is TensorBoard where it is installed, as before this option existed; a sink named
outright must be installed (checked with the options, before any loading). A resumed run continues its
W&B run (the id is kept in OUTPUT/wandb_run_id); W&B plots against the metric `step`, so the steps a resume
redoes are logged again beside their first points rather than refused as earlier than W&B's own counter."""
from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

from rpo_engine.errors import UserError

SINKS = ("tensorboard", "wandb")


def installed(package: str) -> bool:
    # a directory of that name on sys.path (the working directory's tensorboard/ of event files, or wandb/ of
    # W&B's runs) is found as a namespace package (no origin), which is not the package
    spec = importlib.util.find_spec(package)
    return spec is not None and spec.origin is not None


def report_targets(report_to: str) -> list[str]:
    """The sinks `report_to` names ("auto": TensorBoard where installed; "none": none); a UserError for an
    unknown name or a named sink that is not installed."""
    names = [name.strip() for name in report_to.split(",")]
    if "" in names and names != [""]:  # "tensorboard," as --reward and --lora-target-modules refuse it
        raise UserError(f"--report-to {report_to}: an empty name in the list")
    names = [name for name in names if name]
    if names == ["none"]:
        return []
    if names == ["auto"]:
        return ["tensorboard"] if installed("tensorboard") else []
    unknown = [name for name in names if name not in SINKS]
    if not names or unknown:
        raise UserError(f"--report-to {report_to}: expected auto, none, or a comma-separated list of "
                        f"{', '.join(SINKS)}")
    for name in names:
        if not installed(name):
            raise UserError(f"--report-to {name}: {name} is not installed (pip install {name})")
    return list(dict.fromkeys(names))


def open_tensorboard(output: Path, purge_step: int):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(output / "tensorboard"), purge_step=purge_step)


class Reporter:
    """`log(record)`: a metrics.jsonl record's numbers at its step, to each sink; `close()` at the end."""

    def __init__(self, targets: list[str], output: Path, options: dict, resumed_at: int | None):
        """resumed_at: the checkpoint's step a resumed run goes on from (None: a new run)."""
        self.tensorboard = self.wandb = None
        if "tensorboard" in targets:
            # hides what an earlier run of this directory logged from this run's first step on, as metrics.jsonl
            # was cut back (a resume redoes the steps after its checkpoint)
            self.tensorboard = open_tensorboard(output, purge_step=0 if resumed_at is None else resumed_at + 1)
        if "wandb" in targets:
            import wandb

            id_file = output / "wandb_run_id"
            run_id = id_file.read_text().strip() if resumed_at is not None and id_file.is_file() else None
            if not run_id:  # a new run, or the file missing or empty (W&B refuses an empty id): a new W&B run
                run_id = secrets.token_hex(4)
                id_file.write_text(run_id + "\n")
            try:
                # resolved: --output . has no name of its own (W&B would make one up); --push-to-hub's repo does so too
                self.wandb = wandb.init(project=os.environ.get("WANDB_PROJECT", "rpo_engine"),
                                        name=output.resolve().name, id=run_id, resume="allow", config=options, dir=str(output))
            except wandb.errors.Error as e:  # no API key (never logged in), a project W&B refuses, no connection
                reason = next(iter(str(e).strip().splitlines()), "")
                raise UserError(f"--report-to wandb: W&B could not start a run ({type(e).__name__}: {reason})") from None
            self.wandb.define_metric("step")
            self.wandb.define_metric("*", step_metric="step")

    def log(self, record: dict) -> None:
        numbers = {key: value for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
        step = record["step"]
        if self.tensorboard is not None:
            for key, value in numbers.items():
                if key != "step":
                    self.tensorboard.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(numbers)

    def log_completions(self, step: int, records: list[dict]) -> None:
        """--log-completions: the step's completions (completions.jsonl's records) as a W&B table, as TRL logs
        them ("completions", a row each, one column per reward function's score)."""
        if self.wandb is None or not records:
            return
        import wandb

        flat = [{**{k: v for k, v in r.items() if k != "scores"},
                 **{f"score/{name}": score for name, score in r.get("scores", {}).items()}} for r in records]
        columns = list(dict.fromkeys(c for r in flat for c in r))  # a reward's log_extra column may miss some rows
        self.wandb.log({"completions": wandb.Table(columns=columns, data=[[r.get(c) for c in columns] for r in flat]),
                        "step": step})

    def close(self, finish_wandb: bool = True) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None and finish_wandb:
            self.wandb.finish()
