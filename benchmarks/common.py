"""What every benchmark records beside its figures (the machine, the commit) and how it writes them."""
from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def machine(device=None) -> str:
    """The GPU's name, or the CPU model and torch's thread count."""
    if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cuda":
        return torch.cuda.get_device_name()
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    return f"{names[0] if names else platform.processor()} ({torch.get_num_threads()} threads)"


def git_commit() -> str:
    """HEAD of this checkout; $GIT_COMMIT where the copy has no .git (the GPU machine's copy may not)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    return head or os.environ.get("GIT_COMMIT", "unknown")


def save_json(path, record: dict) -> Path:
    """Write `record` to `path` (parents created) and say so, with the load that may have skewed the times."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path} (1-min load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)")
    return path
