"""Directories written whole or not at all: model and adapter saves never leave a broken one behind, and
never take with them what else the directory held."""
from __future__ import annotations

import contextlib
import fnmatch
import os
import shutil
import socket
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
    tmp = private_to_umask(Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{_OWNER}-", dir=directory.parent)))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}.old-{_OWNER}")
        directory.rename(old)
    tmp.rename(directory)  # between the two renames `directory` is missing: _finish_interrupted restores it
    if old is not None:
        _carry_over(old, directory, supersedes)


def private_to_umask(path: Path) -> Path:
    """`path`, a mkdtemp directory (mode 0700) about to be renamed into place, given the mode a mkdir would, or a
    file safetensors wrote (0600: since 0.8 it writes a temporary file renamed into place) the mode an open()
    would: else final/, a checkpoint's model/ or the starter model in a cache shared by several users is their
    owner's alone."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)
    return path


def _carry_over(old: Path, new: Path, supersedes) -> None:
    """Move what `old` holds and `new` lacks into `new` (but not superseded files), then delete `old`."""
    for entry in old.iterdir():
        if not (new / entry.name).exists() and not any(fnmatch.fnmatch(entry.name, p) for p in supersedes):
            entry.rename(new / entry.name)
    shutil.rmtree(old)


_OWNER = f"{socket.gethostname()}-{os.getpid()}"  # in the names of a save's temporary and old directories


def _left_by_a_dead_save(owner: str) -> bool:
    """Whether a temporary or old directory whose name carries `owner` ("host-pid") was left by a save that is no
    longer running: one of this host's processes that has exited (or this process). Another host's, or a live
    process's (two saves of one directory at once, e.g. two runs building the starter model), is left alone."""
    host, _, pid = owner.rpartition("-")
    if not host or not pid.isdigit():  # an older version's name (no host): no save running now made it
        return True
    if host != socket.gethostname():
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _finish_interrupted(directory: Path, supersedes) -> None:
    """What a save killed midway left beside `directory`: its old copy renamed out but the new one not yet in
    (put back), an old copy whose entries were not all carried over (carried now), temporary directories
    (deleted: they never hold anything but the new save's own files). Only a dead save's: see
    _left_by_a_dead_save."""
    olds, prefix = [], f".{directory.name}."
    for path in sorted(directory.parent.iterdir()):
        if path.name.startswith(prefix + "old-") and path.is_dir():  # .NAME.old-HOST-PID
            if _left_by_a_dead_save(path.name[len(prefix) + 4:]):
                olds.append(path)
        elif path.name.startswith(prefix + "tmp-") and path.is_dir():  # .NAME.tmp-HOST-PID-RANDOM
            if _left_by_a_dead_save(path.name[len(prefix) + 4:].rpartition("-")[0]):
                shutil.rmtree(path, ignore_errors=True)
    if olds and not directory.exists():
        olds.pop().rename(directory)
    for old in olds:
        _carry_over(old, directory, supersedes)
