"""User-facing errors: a bad path, config, dataset line or option value.

Raised anywhere in the package; the command-line entry points catch `UserError`, print its one-line
message and exit with code 2, so a user mistake never shows a traceback.
"""
import sys


class UserError(Exception):
    """A mistake in what the user gave us (not a bug). The message names the file/option and what was expected."""


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
