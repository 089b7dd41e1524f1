"""Helpers shared by the CLI subcommands: one-line errors, exit codes, interruption by Ctrl-C or SIGTERM.

A subcommand handler raises ``CLIError`` (or ValueError / FileNotFoundError / TypeError for bad input); ``run_handler``
turns that into one line on stderr and exit status 2. A missing optional package gives one line naming it. Ctrl-C
(status 130) and SIGTERM (status 143, turned into the ``Terminated`` exception so that every ``finally`` and
cleanup handler runs, as for Ctrl-C) print one line saying what is left. Output folders and their checks live in
``bs_unlearn.outputs`` (the library uses them too).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from ..outputs import is_main_process

PROG = "bs-unlearn"
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, the shell's convention
EXIT_TERMINATED = 128 + signal.SIGTERM
INSTALL_HINT = "pip install -e '.[train]' in the repository installs the driver's dependencies"
NOTHING_SAVED = "nothing was saved"


class CLIError(Exception):
    """Bad input detected by a subcommand; its message is printed as one line."""


class Terminated(BaseException):
    """The process got SIGTERM (a BaseException, like KeyboardInterrupt, so ``except Exception`` does not stop it)."""


def error_line(error: BaseException) -> str:
    """The error as one line: a message of several lines (transformers writes such) is joined, not cut."""
    message = " ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__
    if isinstance(error, FileNotFoundError) and error.filename and str(error.filename) not in message:
        message = f"{message}: {error.filename}"
    return f"{PROG}: error: {message}"


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def require_modules(command: str, *modules: str) -> None:
    """Refuse, before any work, a command whose optional packages are not installed."""
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise CLIError(f"{command} needs {', '.join(missing)}, not installed ({INSTALL_HINT})")


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """While inside, SIGTERM raises ``Terminated`` in the main thread; later SIGTERMs are ignored so the cleanup
    that the first one starts can finish. The previous handler is restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def raise_terminated(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_handler(handler: Callable[[object], int | None], args) -> int:
    """Call a subcommand handler; bad input -> one stderr line and status 2; Ctrl-C / SIGTERM -> one line saying what
    is left (``args.on_interrupt``, default: nothing was saved) and status 130 / 143."""
    left = getattr(args, "on_interrupt", NOTHING_SAVED)
    try:
        with sigterm_raises():
            return int(handler(args) or 0)
    except (CLIError, ValueError, TypeError, FileNotFoundError, IsADirectoryError, PermissionError) as error:
        print(error_line(error), file=sys.stderr)
        return EXIT_BAD_INPUT
    except ModuleNotFoundError as error:
        if error.name is None or error.name.split(".")[0] in ("bs_unlearn", "bs_kernels"):
            raise  # a module of this project is missing: a broken install, worth its traceback
        print(
            f"{PROG}: error: the {error.name.split('.')[0]} package is not installed ({INSTALL_HINT})", file=sys.stderr
        )
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (Ctrl-C); {left}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print(f"{PROG}: terminated (SIGTERM); {left}", file=sys.stderr)
        return EXIT_TERMINATED


def print_run_summary(result) -> None:
    """The summary line of a training run (``trainer.RunResult``: steps, seconds, first -> last of each logged
    quantity) and where it was saved; printed by the main process only."""
    if not is_main_process():
        return
    s = result.summary
    parts = [f"{s['command']}: {s['steps']} steps in {s['seconds']} s"]
    for key in ("loss", "forget_logprob", "belief_logprob", "retain_loss", "answer_logprob"):
        if f"{key}_first" in s:
            parts.append(f"{key} {s[f'{key}_first']:.4g} -> {s[f'{key}_last']:.4g}")
    print("; ".join(parts))
    if result.output_dir is not None:
        print(f"saved model and run.json to {result.output_dir}")
