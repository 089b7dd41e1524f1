"""``bs-unlearn finetune``: make a target model that has memorised QA data (e.g. TOFU ``full``)."""

from __future__ import annotations

import argparse

from ..outputs import is_main_process
from .config_args import add_config_arguments, config_from_args


def print_summary(result) -> None:
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


def handle(args: argparse.Namespace) -> int:
    from ..config import FinetuneConfig, check_run_paths

    check_run_paths(FinetuneConfig, vars(args))  # a bad path is refused before torch and transformers are imported
    from ..trainer import finetune

    print_summary(finetune(config_from_args(FinetuneConfig, args)))
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
