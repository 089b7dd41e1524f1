"""``bs-unlearn unlearn``: unlearn a forget set with GA, GradDiff, NPO, BS-T or BS-S."""

from __future__ import annotations

import argparse

from ..objectives import METHODS, RETAIN_OBJECTIVES
from ._common import CLIError, check_output_dir, check_readable_file
from .finetune import add_training_arguments, print_summary, training_kwargs


def handle(args: argparse.Namespace) -> int:
    from ..trainer import UnlearnConfig, unlearn

    if args.method not in METHODS:  # argparse's choices already refuse it; kept for programmatic namespaces
        raise CLIError(f"unknown method {args.method!r} (choose from {', '.join(sorted(METHODS))})")
    check_readable_file(args.forget, "forget")
    if args.retain is not None:
        check_readable_file(args.retain, "retain")
    check_output_dir(args.output, overwrite=args.overwrite)
    retain_loss = None if args.retain_loss == "none" else args.retain_loss
    config = UnlearnConfig(
        forget=args.forget,
        retain=args.retain,
        method=args.method,
        retain_loss=retain_loss,
        forget_weight=args.forget_weight,
        retain_weight=args.retain_weight,
        lam=args.lam,
        top_k=args.top_k,
        belief_temperature=args.belief_temperature,
        beta=args.beta,
        lam_s=args.lam_s,
        bs_s_base=args.bs_s_base.replace("-", "_"),
        num_beliefs=args.num_beliefs,
        gen_temperature=args.gen_temperature,
        max_new_tokens=args.max_new_tokens,
        gen_batch_size=args.gen_batch_size,
        on_policy=args.on_policy,
        regen_every=args.regen_every,
        **training_kwargs(args),
    )
    print_summary(unlearn(config))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "unlearn",
        help="unlearn a forget set (ga, graddiff, npo, bs-t, bs-s)",
        description="Unlearn the forget set's answers from a model, optionally keeping a retain set.",
    )
    parser.add_argument("--method", required=True, choices=sorted(METHODS), help="unlearning method")
    parser.add_argument("--forget", required=True, help="forget set, QA JSON Lines")
    parser.add_argument("--retain", default=None, help="retain set, QA JSON Lines (needed by a retain term)")
    add_training_arguments(parser, epochs=5.0, lr=1e-5, batch_size=4)
    parser.add_argument(
        "--retain-loss",
        default="default",
        choices=["default", "none", *RETAIN_OBJECTIVES],
        help="retain term (default: none for ga, nll for the others)",
    )
    parser.add_argument("--forget-weight", type=float, default=1.0, help="gamma: weight of the forget term")
    parser.add_argument("--retain-weight", type=float, default=1.0, help="alpha: weight of the retain term")
    parser.add_argument("--lam", type=float, default=0.2, help="BS-T belief weight lambda (default 0.2)")
    parser.add_argument("--top-k", type=int, default=20, help="BS-T beliefs per position (default 20)")
    parser.add_argument("--belief-temperature", type=float, default=1.0, help="BS-T belief temperature")
    parser.add_argument("--beta", type=float, default=0.1, help="NPO beta (default 0.1)")
    parser.add_argument("--lam-s", type=float, default=0.5, help="BS-S belief-set weight (default 0.5)")
    parser.add_argument("--bs-s-base", default="ga", choices=["ga", "bs-t", "npo"], help="BS-S base forget loss")
    parser.add_argument("--num-beliefs", type=int, default=3, help="BS-S samples per forget prompt (default 3)")
    parser.add_argument("--gen-temperature", type=float, default=1.0, help="BS-S sampling temperature")
    parser.add_argument("--max-new-tokens", type=int, default=200, help="BS-S belief length limit")
    parser.add_argument("--gen-batch-size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--on-policy", action="store_true", help="BS-S: resample beliefs every --regen-every epochs")
    parser.add_argument("--regen-every", type=int, default=2, help="on-policy resampling period in epochs")
    parser.set_defaults(handler=handle)
