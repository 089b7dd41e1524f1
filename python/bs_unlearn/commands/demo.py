"""``bs-unlearn demo``: do BS-T / BS-S forget more thoroughly than GA, at the same amount of forgetting? On a CPU.

1. Fine-tune the model (default SmolLM2-135M-Instruct) on the embedded demo data (12 invented people, 3 facts each,
   TOFU format, with key fact strings) until it has memorised the answers; fine-tune a second copy on the retain
   facts only (the reference for forget quality).
2. Collect the belief band: the fine-tuned model's beam-search answers to the forget questions other than the target.
3. From that same start, unlearn the forget third (4 people) with each method. ``--protocol matched`` (default):
   every run stops when the forget answers' mean per-token log-prob reaches ``--target-lp`` (step cap
   ``--max-steps``), each method at the first lr of a small grid, smallest first, that gets there.
   ``--protocol steps``: every run takes the same steps at the same lr (the equal-steps view).
4. Print one table (matched: steps, band, paraphrase, leak rate, retain, Mem / Util / Agg, forget quality; steps:
   the probe's changes over the run) and write the plots, the JSONs and a Markdown copy of the table.

``--quick`` swaps in a tiny random model and a few steps: every stage runs, in seconds, and the numbers mean nothing.
"""

from __future__ import annotations

import argparse

from ..experiment.settings import ComparisonSettings, UnlearnSettings
from ..models import check_model_path, model_input_path
from ..outputs import prepare_output_dir
from .compare_methods import (
    PARTIAL_RESULTS,
    add_comparison_arguments,
    check_can_start,
    compare_and_report,
    model_name_of,
    settings_from_args,
)

# The equal-steps view: GA (with the same retain NLL term as the others), BS-T at lambda = 1 (at the authors' 0.2 BS-T
# behaves like GA while the memorised label dominates the top-k belief, docs/demo.md), BS-S.
STEPS_RUNS = ("graddiff", "bs-t:lam=1.0", "bs-s")
# Matched forgetting: the methods of the paper's comparison; BS-S on BS-T (the paper's best). BS-S on GA (the authors'
# trainer) does not fit the 15-minute budget beside them: add "bs-s" to --runs.
MATCHED_RUNS = (
    "graddiff",
    "npo",
    "bs-t:lam=0.2",
    "bs-t:lam=0.5",
    "bs-t:lam=1.0",
    "bs-s:bs_s_base=bs_t,lam=1.0",
)
QUICK_MATCHED_RUNS = ("graddiff", "bs-t:lam=1.0", "bs-s:bs_s_base=bs_t,lam=1.0")


DEMO_SETTINGS = ComparisonSettings()
# The equal-steps view as recorded before the matched protocol existed (longer answers; the table it prints is
# unchanged).
STEPS_SETTINGS = ComparisonSettings(
    eval_max_new_tokens=40, unlearn=UnlearnSettings(probe_every=4, bs_s_max_new_tokens=40)
)
QUICK_SETTINGS = ComparisonSettings(
    finetune_epochs=2.0,
    finetune_lr=5e-3,
    unlearn_steps=3,
    unlearn_lr=1e-3,
    band_beams=2,
    band_max_new_tokens=6,
    eval_max_new_tokens=6,
    unlearn=UnlearnSettings(probe_every=1, top_k=5, bs_s_max_new_tokens=6),
    target_lp=-6.0,
    max_steps=4,
    lr_grid=(1e-3, 3e-3),
    leak_samples=1,
)

FORGET_NAME = "forget"
QUICK_MODEL_NAME = "tiny random Llama (--quick)"


def run_demo(
    *,
    model: str = "default",
    output="bs-unlearn-demo",
    overwrite: bool = False,
    quick: bool = False,
    runs: list[str] | None = None,
    protocol: str = "matched",
    settings: ComparisonSettings | None = None,
    seed: int = 0,
    **report,
) -> dict:
    """The whole demo (see the module docstring); returns the results dict that is also written to results.json.

    ``output`` is refused if it is or contains the current directory or the model, or is a folder bs-unlearn did not
    write; with ``overwrite`` an earlier demo's folder is replaced (no file of it is left behind). ``report``: the
    ``say`` / ``show`` of :func:`compare_methods.compare_and_report`."""
    from ..experiment.comparison import check_comparison
    from ..experiment.run_specs import parse_run

    settings = settings or default_settings(quick, protocol)
    default_runs = STEPS_RUNS if protocol == "steps" else (QUICK_MATCHED_RUNS if quick else MATCHED_RUNS)
    specs = [parse_run(spec) for spec in (runs or default_runs)]
    check_comparison(specs, protocol)
    if not quick:  # --quick builds its model inside the output
        check_model_path(model)
    inputs = [] if quick else [model_input_path(model)]
    output = prepare_output_dir(output, overwrite=overwrite, inputs=inputs)
    # The heavy imports (torch, transformers) come after the cheap checks above.
    from ..data import demo_data_path, read_qa_records
    from ..experiment.comparison import ComparisonData
    from ..tofu_data import EvalSet, QASplit

    forget_path, retain_path = demo_data_path("forget.jsonl"), demo_data_path("retain.jsonl")
    forget = QASplit(FORGET_NAME, read_qa_records(forget_path), forget_path)
    retain = QASplit("retain", read_qa_records(retain_path), retain_path)
    # Matched: model utility on every other retain fact (12 of 24, the size of the forget set) keeps each evaluation
    # within the time budget; the equal-steps view keeps its recorded 24.
    retain_eval = retain.records if protocol == "steps" else retain.records[::2]
    eval_sets = [EvalSet(FORGET_NAME, forget.records, "forget"), EvalSet("retain", retain_eval, "retain")]
    total = len(forget.records) + len(retain.records)
    data = ComparisonData(f"demo facts (forget {len(forget.records)} of {total})", forget, retain, eval_sets)
    if quick:
        from ..tiny_model import build_quick_model

        model = build_quick_model(output / "tiny-model", forget.records + retain.records)
    return compare_and_report(
        data,
        specs,
        model=model,
        model_name=QUICK_MODEL_NAME if quick else model_name_of(model),
        protocol=protocol,
        settings=settings,
        output=output,
        seed=seed,
        tag="demo",
        extras={"quick": quick},
        **report,
    )


def default_settings(quick: bool, protocol: str) -> ComparisonSettings:
    if quick:
        return QUICK_SETTINGS
    return STEPS_SETTINGS if protocol == "steps" else DEMO_SETTINGS


def handle(args: argparse.Namespace) -> int:
    check_can_start("bs-unlearn demo")
    run_demo(
        model=args.model,
        output=args.output,
        overwrite=args.overwrite,
        quick=args.quick,
        runs=args.runs,
        protocol=args.protocol,
        settings=settings_from_args(default_settings(args.quick, args.protocol), args),
        seed=args.seed,
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune, unlearn with GA / NPO / BS-T / BS-S at matched forgetting and compare (minutes on a CPU)",
        description=(
            "Fine-tune a model on the embedded demo facts, unlearn a third of them with each method from the same "
            "start until the same forgetting level, print a table and write plots to --output."
        ),
    )
    parser.add_argument("--output", default="bs-unlearn-demo", help="directory for the plots, table and JSONs")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an earlier bs-unlearn output there (never another folder)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few steps: a smoke test in seconds")
    parser.add_argument(
        "--protocol",
        default="matched",
        choices=["matched", "steps"],
        help="matched: every run stops at the same forgetting target; steps: same steps and lr for every run",
    )
    add_comparison_arguments(
        parser,
        runs_default=None,
        runs_help=f"unlearning runs as METHOD[:opt=value,...] (matched default: {' '.join(MATCHED_RUNS)}; steps "
        f"default: {' '.join(STEPS_RUNS)})",
    )
    parser.set_defaults(handler=handle, on_interrupt=PARTIAL_RESULTS)
