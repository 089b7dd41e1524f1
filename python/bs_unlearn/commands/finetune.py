"""``bs-unlearn finetune``: make a target model that has memorised QA data (e.g. TOFU ``full``)."""

from __future__ import annotations

import argparse

from ._common import check_output_dir, check_readable_file, is_main_process


def add_training_arguments(parser: argparse.ArgumentParser, *, epochs: float, lr: float, batch_size: int) -> None:
    """Options shared by finetune and unlearn (also usable by other subcommands)."""
    parser.add_argument("--model", default="default", help="HF model directory, .gguf file, or 'default' (SmolLM2)")
    parser.add_argument("--output", required=True, help="directory to write the model and run.json to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--epochs", type=float, default=epochs, help=f"training epochs (default {epochs})")
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimiser steps (> 0)")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"per-device batch (default {batch_size})")
    parser.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    parser.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr})")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=256, help="tokens per example (prompt + answer)")
    parser.add_argument(
        "--max-examples-per-file", type=int, default=None, help="use a seeded random subset of each data file"
    )
    parser.add_argument("--impl", default="auto", help="bs_kernels backend: auto, torch, native, triton, reference")
    parser.add_argument(
        "--fused-linear",
        action="store_true",
        help="compute the losses from hidden states and the lm_head weight in row chunks (no [B, T, V] logits)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def training_kwargs(args: argparse.Namespace) -> dict:
    return dict(
        model=args.model,
        output=args.output,
        overwrite=args.overwrite,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        max_length=args.max_length,
        max_examples_per_file=args.max_examples_per_file,
        impl=args.impl,
        fused_linear=args.fused_linear,
        progress=not args.no_progress,
    )


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
    from ..trainer import FinetuneConfig, finetune

    for path in args.data:
        check_readable_file(path, "data")
    check_output_dir(args.output, overwrite=args.overwrite)
    print_summary(finetune(FinetuneConfig(data=list(args.data), **training_kwargs(args))))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="fine-tune a model on QA data (answer NLL)",
        description="Fine-tune a causal LM on TOFU-format QA JSON Lines files (loss on answer tokens only).",
    )
    parser.add_argument("--data", nargs="+", required=True, help="QA JSON Lines files (question, answer)")
    add_training_arguments(parser, epochs=3.0, lr=1e-4, batch_size=8)
    parser.set_defaults(handler=handle)
