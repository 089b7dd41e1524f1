"""``bs-unlearn unlearn``: unlearn a forget set with GA, GradDiff, NPO, BS-T or BS-S."""

from __future__ import annotations

import argparse

from .base import print_run_summary
from .config_args import add_config_arguments, config_from_args


def handle(args: argparse.Namespace) -> int:
    from ..config import UnlearnConfig

    config = config_from_args(UnlearnConfig, args)
    config.validate()  # a bad path or setting is refused before torch and transformers are imported for the run
    from ..trainer import unlearn

    print_run_summary(unlearn(config))
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
