"""User-facing errors: a bad path, config, dataset line or option value.

Raised anywhere in the package; the command-line entry points catch `UserError`, print its one-line
message and exit with code 2, so a user mistake never shows a traceback.
"""
import contextlib
import errno
import functools
import os
import re
import select
import signal
import sys
import traceback
import warnings


class UserError(Exception):
    """A mistake in what the user gave us (not a bug). The message names the file/option and what was expected."""


# the system refusing a named file (no permission, a full disk or quota, a read-only filesystem, a size limit): the
# user's environment to fix, never our bug, wherever in a run it comes from
REFUSED = frozenset({errno.EACCES, errno.EPERM, errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


def refused_write(e: BaseException) -> OSError | None:
    """The operating system's refusal behind a failed write (a full disk, a quota, a file-size limit, a read-only
    filesystem: REFUSED): `e` itself, the OSError that torch.save's RuntimeError ("unexpected pos 51136 vs 51024")
    hides as its context when it writes to a Python file object, or the one safetensors names in its message ("I/O
    error: No space left on device (os error 28)"); None for any other error (another OSError may be a bug)."""
    if isinstance(e, OSError):
        found = e
    elif isinstance(e, RuntimeError) and isinstance(e.__context__, OSError):
        found = e.__context__
    else:
        named = (re.search(r"I/O error: (.*) \(os error (\d+)\)", str(e))
                 if type(e).__name__ == "SafetensorError" else None)
        found = OSError(int(named[2]), named[1]) if named else None
    return found if found is not None and found.errno in REFUSED else None


@contextlib.contextmanager
def refusals_named(path):
    """The operating system refusing a write under `path` (a full disk, a quota): a one-line UserError naming
    `path` and the system's reason, not a traceback in torch's or safetensors' words."""
    try:
        yield
    except Exception as e:
        refused = refused_write(e)
        if refused is None:
            raise
        raise UserError(f"{path}: could not be written ({refused.strerror or refused})") from None


def clear_frames(e: BaseException) -> None:
    """Let go of what a user mistake's traceback holds: a notebook keeps the last error, and its traceback's frames
    (and its context's, the out-of-memory error one explains) held the trainer, the model and the K/V cache, from
    the corrected second call. A user mistake's traceback is no one's to debug."""
    while e is not None:
        traceback.clear_frames(e.__traceback__)
        e = e.__context__


_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def one_line_warning(message, category, filename, lineno, line=None, others=warnings.formatwarning):
    """Our own UserWarnings (an ignored attention_dropout, a skipped update) as `warning: <message>`, the line the
    command line's other warnings print; Python's "FILE:LINE: UserWarning: ..." and its source line are for a bug's
    hunt. Everyone else's warnings keep the format `others` gives them."""
    if category is UserWarning and os.path.abspath(filename).startswith(_PACKAGE):
        return f"warning: {message}\n"
    return others(message, category, filename, lineno, line)


@contextlib.contextmanager
def stdout_escaping():
    """Text stdout's encoding cannot hold (a non-ASCII path or prompt where stdout is ASCII: PYTHONIOENCODING=ascii,
    LC_ALL=C with PYTHONUTF8=0, a Windows code page in a redirected log) printed as \\x escapes, as Python prints
    it to stderr, not a UnicodeEncodeError after the command's work is done (before train's --push-to-hub)."""
    stdout = sys.stdout
    errors = getattr(stdout, "errors", None)
    if errors != "strict" or not hasattr(stdout, "reconfigure"):  # closed (None), or not a text stream of ours
        yield
        return
    stdout.reconfigure(errors="backslashreplace")
    try:
        yield
    finally:  # an in-process caller's stdout is its own again
        stdout.reconfigure(errors=errors)


def readers_gone() -> list[int]:
    """The file descriptors of stdout and stderr that are pipes whose reader has exited (`| head -1` that has its
    line): poll reports POLLERR on such a pipe's end."""
    gone = []
    for stream in (sys.__stdout__, sys.__stderr__):
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # closed (None), or not a file
            continue
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        if any(events & select.POLLERR for _, events in poller.poll(0)):
            gone.append(fd)
    return gone


def run_cli(main_fn, argv=None) -> int:
    """Run `main_fn(argv)` and turn a UserError, or the system refusing a named file (REFUSED), into
    `error: <message>` on stderr with exit code 2; our warnings one line each (one_line_warning)."""
    python_format = warnings.formatwarning  # the caller's, which formats everyone else's warnings
    warnings.formatwarning = functools.partial(one_line_warning, others=python_format)
    try:
        with stdout_escaping():
            return main_fn(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        gone = readers_gone() if hasattr(select, "poll") else []
        if not gone:  # another pipe (a reward worker's): a bug's traceback
            raise
        # Our output's reader has exited: end as a program that SIGPIPE ends, its exit code and no traceback.
        # Those descriptors write to /dev/null from here, or Python's flush at exit says "Exception ignored".
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in gone:
            os.dup2(devnull, fd)
        os.close(devnull)
        return 128 + signal.SIGPIPE
    except OSError as e:
        if e.errno not in REFUSED or not e.filename:
            raise
        print(f"error: {e.filename}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:  # an in-process caller's warnings are its own again
        warnings.formatwarning = python_format
