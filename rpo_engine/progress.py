"""Progress bars (tqdm's, on stderr) that suit a log file as well as a terminal."""
from __future__ import annotations

import sys
import time

# Where stderr is no terminal, the most often a bar writes a line: a day's run logs a few thousand lines, not one
# redraw per step.
LOG_INTERVAL_S = 30.0


class LogLines:
    """A stream for a tqdm bar that writes a log rather than a terminal: each redraw a line of its own, at most one
    every `interval` seconds and the bar's last state when it closes. tqdm redraws in place with carriage returns
    (and moves the cursor between nested bars), which a log file keeps as one endless line: a 40-step run's bar
    in a SLURM log was 40 redraws joined by \\r."""

    def __init__(self, stream, interval: float = LOG_INTERVAL_S):
        self.stream, self.interval = stream, interval
        self.written_at, self.pending = None, None

    def write(self, text: str) -> None:
        line = text.replace("\x1b[A", "").strip()
        if line:
            now = time.monotonic()
            if self.written_at is None or now - self.written_at >= self.interval:
                self.stream.write(line + "\n")
                self.written_at, self.pending = now, None
            else:
                self.pending = line
        elif "\n" in text and self.pending is not None:  # the bar closing (or moving to its row): its latest state
            self.stream.write(self.pending + "\n")
            self.pending = None

    def flush(self) -> None:
        self.stream.flush()


def progress_bar(*args, **kwargs):
    """tqdm.auto's bar; written as log lines (LogLines) where stderr is no terminal and no notebook shows it."""
    from tqdm.auto import tqdm
    from tqdm.notebook import tqdm as notebook_tqdm

    stream = sys.stderr
    if (not kwargs.get("disable") and "file" not in kwargs and stream is not None
            and not issubclass(tqdm, notebook_tqdm) and not is_terminal(stream)):
        kwargs["file"] = LogLines(stream)
    return tqdm(*args, **kwargs)


def is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # not a file, or closed
        return False
