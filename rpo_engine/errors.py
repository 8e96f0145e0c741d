"""User-facing errors: a bad path, config, dataset line or option value.

Raised anywhere in the package; the command-line entry points catch `UserError`, print its one-line
message and exit with code 2, so a user mistake never shows a traceback.
"""
import re
import sys


class UserError(Exception):
    """A mistake in what the user gave us (not a bug). The message names the file/option and what was expected."""


def refused_write(e: BaseException) -> OSError | None:
    """The operating system's refusal behind a failed write (a full disk, a quota, a file-size limit, a read-only
    filesystem): `e` itself, the OSError that torch.save's RuntimeError ("unexpected pos 51136 vs 51024") hides as
    its context when it writes to a Python file object, or the one safetensors names in its message ("I/O error:
    No space left on device (os error 28)"); None for any other error."""
    for error in (e, e.__context__, e.__cause__):
        if isinstance(error, OSError):
            return error
    found = re.search(r"I/O error: (.*) \(os error (\d+)\)", str(e))
    return OSError(int(found[2]), found[1]) if found else None


def run_cli(main_fn, argv=None) -> int:
    """Run `main_fn(argv)` and turn a UserError into `error: <message>` on stderr with exit code 2."""
    try:
        return main_fn(argv) or 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
