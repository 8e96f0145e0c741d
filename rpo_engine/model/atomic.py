"""Directories written whole or not at all: model and adapter saves never leave a broken one behind, and
never take with them what else the directory held."""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import tempfile
from pathlib import Path


@contextlib.contextmanager
def replacing_directory(directory, supersedes=()):
    """Yield a fresh temporary directory beside `directory`; when the block ends without an error it takes
    `directory`'s place (renamed in, the old one renamed out), else it is deleted and `directory` stays as it
    was. Entries of the old directory that the new one lacks are moved into it (a run's metrics, a
    checkpoints/ folder: a save never deletes them) unless they match a `supersedes` pattern (the stale shards
    of an earlier save). A symlink is followed: the directory it points to is replaced."""
    directory = Path(directory)
    if directory.is_symlink():
        directory = directory.resolve()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory}: exists and is not a directory")
    directory.parent.mkdir(parents=True, exist_ok=True)
    _finish_interrupted(directory, supersedes)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        directory.rename(old)
    tmp.rename(directory)  # between the two renames `directory` is missing: _finish_interrupted restores it
    if old is not None:
        _carry_over(old, directory, supersedes)


def _carry_over(old: Path, new: Path, supersedes) -> None:
    """Move what `old` holds and `new` lacks into `new` (but not superseded files), then delete `old`."""
    for entry in old.iterdir():
        if not (new / entry.name).exists() and not any(fnmatch.fnmatch(entry.name, p) for p in supersedes):
            entry.rename(new / entry.name)
    shutil.rmtree(old)


def _finish_interrupted(directory: Path, supersedes) -> None:
    """What a save killed midway left beside `directory`: its old copy renamed out but the new one not yet in
    (put back), an old copy whose entries were not all carried over (carried now), temporary directories
    (deleted: they never hold anything but the new save's own files)."""
    prefix = f".{directory.name}."
    leftovers = sorted(p for p in directory.parent.iterdir() if p.name.startswith(prefix) and p.is_dir())
    olds = [p for p in leftovers if p.name.startswith(prefix + "old-")]
    for tmp in leftovers:
        if tmp.name.startswith(prefix + "tmp-"):
            shutil.rmtree(tmp, ignore_errors=True)
    if olds and not directory.exists():
        olds.pop().rename(directory)
    for old in olds:
        _carry_over(old, directory, supersedes)
