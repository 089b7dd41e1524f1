"""Helpers shared by the CLI subcommands: one-line errors and exit codes.

A subcommand handler raises ``CLIError`` (or ValueError / FileNotFoundError / TypeError for bad input); ``run_handler``
turns that into one line on stderr and exit status 2, a Ctrl-C into exit status 130. Output folders and their checks
live in ``bs_unlearn.outputs`` (the library uses them too).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

PROG = "bs-unlearn"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130


class CLIError(Exception):
    """Bad input detected by a subcommand; its message is printed as one line."""


def error_line(error: BaseException) -> str:
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    return f"{PROG}: error: {message}"


def run_handler(handler: Callable[[object], int | None], args) -> int:
    """Call a subcommand handler; bad input -> one stderr line and status 2, Ctrl-C -> status 130."""
    try:
        return int(handler(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
        print(error_line(error), file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was saved", file=sys.stderr)
        return EXIT_INTERRUPTED
