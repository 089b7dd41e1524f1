"""``bs-unlearn``: a dispatcher over the subcommand modules in bs_unlearn.commands.

Each module exposes ``register(subparsers)``, which adds its parser and sets ``handler``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .commands.base import EXIT_BAD_INPUT, PROG, run_handler

SUBCOMMAND_MODULES = ("finetune", "unlearn", "evaluate", "compare", "demo", "tofu")


class _OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the full usage stays available with --help)."""

    def error(self, message: str):
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineErrorParser(prog=PROG, description="BS-T / BS-S unlearning on top of bs_kernels.")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(f"bs_unlearn.commands.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return run_handler(args.handler, args)


if __name__ == "__main__":
    sys.exit(main())
