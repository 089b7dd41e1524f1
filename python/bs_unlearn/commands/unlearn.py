"""``bs-unlearn unlearn``: unlearn a forget set with GA, GradDiff, NPO, BS-T or BS-S."""

from __future__ import annotations

import argparse

from .config_args import add_config_arguments, config_from_args
from .finetune import print_summary


def handle(args: argparse.Namespace) -> int:
    from ..config import UnlearnConfig, check_run_paths

    check_run_paths(UnlearnConfig, vars(args))  # a bad path is refused before torch and transformers are imported
    from ..trainer import unlearn

    print_summary(unlearn(config_from_args(UnlearnConfig, args)))
    return 0


def register(subparsers) -> None:
    from ..config import UnlearnConfig

    parser = subparsers.add_parser(
        "unlearn",
        help="unlearn a forget set (ga, graddiff, npo, bs-t, bs-s)",
        description="Unlearn the forget set's answers from a model, optionally keeping a retain set.",
    )
    add_config_arguments(parser, UnlearnConfig, required=("method", "output"), skip=("logging_steps",))
    parser.set_defaults(handler=handle)
