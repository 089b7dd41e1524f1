"""``bs-unlearn finetune``: make a target model that has memorised QA data (e.g. TOFU ``full``)."""

from __future__ import annotations

import argparse

from .base import print_run_summary
from .config_args import add_config_arguments, config_from_args


def handle(args: argparse.Namespace) -> int:
    from ..config import FinetuneConfig

    config = config_from_args(FinetuneConfig, args)
    config.validate()  # a bad path or setting is refused before torch and transformers are imported for the run
    from ..trainer import finetune

    print_run_summary(finetune(config))
    return 0


def register(subparsers) -> None:
    from ..config import FinetuneConfig

    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on QA data (answer NLL)",
        description="Fine-tune a causal LM on TOFU-format QA JSON Lines files (loss on answer tokens only).",
    )
    add_config_arguments(parser, FinetuneConfig, required=("data", "output"), skip=("logging_steps",))
    parser.set_defaults(handler=handle)
