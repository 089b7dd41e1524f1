"""``bs-unlearn tofu``: the matched-forgetting comparison on a TOFU forget split, with the paper's metrics.

    bs-unlearn tofu --tofu-dir ../shared/data/tofu --split forget01 --output runs/tofu-forget01

The same pipeline as ``bs-unlearn demo`` (bs_unlearn.experiment.comparison) on TOFU data: fine-tune on the
forget split plus a seeded subset of the matching retain split, a retain-only model on that subset alone (forget
quality), the belief band, then each method from the same start, stopped at the same forgetting target; metrics on
the forget split and seeded subsets of TOFU's retain / real-authors / world-facts sets. TOFU records carry no key
fact strings, so there is no leak rate here.
"""

from __future__ import annotations

import argparse
import pathlib

from ..experiment.settings import ComparisonSettings, UnlearnSettings
from ..models import check_model_path, model_input_path
from ..outputs import prepare_output_dir
from ..tofu_data import TOFU_SPLITS
from .base import positive_int
from .compare_methods import (
    PARTIAL_RESULTS,
    add_comparison_arguments,
    check_can_start,
    compare_and_report,
    model_name_of,
    settings_from_args,
)

# BS-T λ = 1 and BS-S on its base forget about 10x slower per lr than GA on TOFU (docs/tofu.md): their own grid.
TOFU_RUNS = (
    "graddiff",
    "npo",
    "bs-t:lam=1.0,lr_grid=5e-4/1.5e-3",
    "bs-s:bs_s_base=bs_t,lam=1.0,lr_grid=5e-4/1.5e-3",
)
# Sized for about an hour on a 2-core CPU with SmolLM2-135M (80 retain examples, 20 per evaluation set).
TOFU_SETTINGS = ComparisonSettings(
    finetune_epochs=4.0,
    finetune_lr=1e-4,
    unlearn=UnlearnSettings(batch_size=8, probe_every=5, probe_retain_records=20, bs_s_max_new_tokens=32),
    band_beams=3,
    band_max_new_tokens=32,
    eval_max_new_tokens=32,
    target_lp=-3.0,
    max_steps=25,
    lr_grid=(5e-5, 1.5e-4),
    lr_search="ascending",
    leak_samples=0,
)


def run_tofu(
    *,
    tofu_dir,
    output,
    split: str = "forget01",
    model: str = "default",
    overwrite: bool = False,
    retain_examples: int = 80,
    eval_examples: int = 20,
    runs: list[str] | None = None,
    settings: ComparisonSettings = TOFU_SETTINGS,
    seed: int = 0,
    **report,
) -> dict:
    """The matched-forgetting comparison on a TOFU forget split (see the module docstring); returns the results dict
    that is also written to results.json. ``report``: the ``say`` / ``show`` of
    :func:`compare_methods.compare_and_report`."""
    from ..experiment.comparison import check_comparison
    from ..experiment.run_specs import parse_run

    if split not in TOFU_SPLITS:
        raise ValueError(f"--split must be one of {sorted(TOFU_SPLITS)}, got {split!r}")
    tofu = pathlib.Path(tofu_dir).expanduser()
    if not (tofu / f"{split}.jsonl").is_file():
        raise FileNotFoundError(f"--tofu-dir has no {split}.jsonl: {tofu_dir}")
    specs = [parse_run(spec) for spec in (runs or TOFU_RUNS)]
    check_comparison(specs, "matched")
    check_model_path(model)
    # --overwrite writes into an earlier TOFU output (never into a folder bs-unlearn did not write).
    output = prepare_output_dir(output, overwrite=overwrite, inputs=[tofu, model_input_path(model)], replace=False)
    from ..data import read_qa_records, write_qa_records
    from ..experiment.comparison import ComparisonData
    from ..tofu_data import QASplit, tofu_eval_sets

    forget_path = tofu / f"{split}.jsonl"
    forget = QASplit(split, read_qa_records(forget_path), forget_path)
    retain_split = TOFU_SPLITS[split]
    retain_records = read_qa_records(tofu / f"{retain_split}.jsonl", max_examples=retain_examples, seed=seed)
    retain = QASplit("retain", retain_records, write_qa_records(retain_records, output / "retain_subset.jsonl"))
    eval_sets = tofu_eval_sets(tofu, split, max_examples=eval_examples, seed=seed)
    data = ComparisonData(f"TOFU {split} (+{len(retain_records)} {retain_split})", forget, retain, eval_sets)
    return compare_and_report(
        data,
        specs,
        model=model,
        model_name=model_name_of(model),
        protocol="matched",
        settings=settings,
        output=output,
        seed=seed,
        tag="tofu",
        **report,
    )


def handle(args: argparse.Namespace) -> int:
    check_can_start("bs-unlearn tofu")
    run_tofu(
        tofu_dir=args.tofu_dir,
        output=args.output,
        split=args.split,
        model=args.model,
        overwrite=args.overwrite,
        retain_examples=args.retain_examples,
        eval_examples=args.eval_examples,
        runs=args.runs,
        settings=settings_from_args(TOFU_SETTINGS, args),
        seed=args.seed,
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tofu",
        help="matched-forgetting comparison of methods on a TOFU forget split (the paper's metrics)",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--tofu-dir", required=True, help="folder with the TOFU JSON Lines splits")
    parser.add_argument("--split", default="forget01", choices=sorted(TOFU_SPLITS), help="forget split")
    parser.add_argument("--output", required=True, help="directory for the results, plots and probe JSONs")
    parser.add_argument(
        "--overwrite", action="store_true", help="write into an earlier bs-unlearn output there (never another folder)"
    )
    parser.add_argument("--retain-examples", type=positive_int, default=80, help="seeded retain subset for fine-tuning")
    parser.add_argument("--eval-examples", type=positive_int, default=20, help="seeded subset of each evaluation set")
    add_comparison_arguments(
        parser, runs_default=list(TOFU_RUNS), runs_help="runs as METHOD[:opt=value,...] (default: the four methods)"
    )
    parser.set_defaults(handler=handle, on_interrupt=PARTIAL_RESULTS)
