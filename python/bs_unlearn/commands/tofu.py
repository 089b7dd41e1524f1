"""``bs-unlearn tofu``: the matched-forgetting comparison on a TOFU forget split, with the paper's metrics.

    bs-unlearn tofu --tofu-dir ../shared/data/tofu --split forget01 --output runs/tofu-forget01

The same pipeline as ``bs-unlearn demo`` (bs_unlearn.experiment.run_comparison) on TOFU data: fine-tune on the
forget split plus a seeded subset of the matching retain split, a retain-only model on that subset alone (forget
quality), the belief band, then each method from the same start, stopped at the same forgetting target; metrics on
the forget split and seeded subsets of TOFU's retain / real-authors / world-facts sets. TOFU records carry no key
fact strings, so there is no leak rate here.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import subprocess
import time

from ..experiment import ComparisonSettings, UnlearnSettings
from ..models import check_model_path, model_input_path
from ..outputs import check_output_dir, is_main_process, prepare_output_dir, write_json_atomic
from .base import positive_int, require_modules
from .demo import DEMO_MODULES, PARTIAL_RESULTS

TOFU_SPLITS = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}
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


def run_tofu(args: argparse.Namespace) -> dict:
    from .. import experiment as ex
    from ..data import read_qa_records, write_qa_records
    from ..models import load_model_and_tokenizer

    tofu = pathlib.Path(args.tofu_dir).expanduser()
    # --overwrite writes into an earlier TOFU output (never into a folder bs-unlearn did not write).
    output = prepare_output_dir(args.output, overwrite=args.overwrite, inputs=tofu_inputs(args), replace=False)
    started = time.perf_counter()
    forget_path = tofu / f"{args.split}.jsonl"
    forget = ex.QASplit(args.split, read_qa_records(forget_path), forget_path)
    retain_records = read_qa_records(
        tofu / f"{TOFU_SPLITS[args.split]}.jsonl", max_examples=args.retain_examples, seed=args.seed
    )
    retain_path = write_qa_records(retain_records, output / "retain_subset.jsonl")
    retain = ex.QASplit("retain", retain_records, retain_path)
    eval_sets = ex.tofu_eval_sets(tofu, args.split, max_examples=args.eval_examples, seed=args.seed)

    def say(message: str) -> None:
        load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.split("load average:")[-1].strip()
        print(f"[tofu {time.strftime('%H:%M:%S')}] {message}  (load {load})", flush=True)

    settings = dataclasses.replace(
        TOFU_SETTINGS,
        **{name: getattr(args, name) for name in ("target_lp", "max_steps") if getattr(args, name) is not None},
    )
    if args.lr_grid is not None:
        settings = dataclasses.replace(settings, lr_grid=tuple(args.lr_grid))
    say(f"loading {args.model}")
    base_model, tokenizer = load_model_and_tokenizer(args.model)
    model_name = "SmolLM2-135M-Instruct" if args.model == "default" else args.model
    results = ex.run_comparison(
        args.model,
        base_model,
        tokenizer,
        forget=forget,
        retain=retain,
        eval_sets=eval_sets,
        specs=[ex.parse_run(spec) for spec in args.runs],
        protocol="matched",
        settings=settings,
        output=output,
        names=(model_name, f"TOFU {args.split} (+{len(retain_records)} {TOFU_SPLITS[args.split]})"),
        seed=args.seed,
        say=say,
        tag="tofu",
    )
    results["seed"] = args.seed
    results["timings_seconds"]["total"] = round(time.perf_counter() - started, 1)
    write_json_atomic(results, output / "results.json")
    (output / "table.md").write_text(ex.matched_table(results, markdown=True) + "\n")
    print(ex.matched_table(results, markdown=False))
    print(f"wrote {output}; total {results['timings_seconds']['total']:.0f} s")
    return results


def handle(args: argparse.Namespace) -> int:
    if not is_main_process():
        raise ValueError("bs-unlearn tofu runs in one process; start it without torchrun / accelerate launch")
    if args.split not in TOFU_SPLITS:
        raise ValueError(f"--split must be one of {sorted(TOFU_SPLITS)}, got {args.split!r}")
    if not (pathlib.Path(args.tofu_dir).expanduser() / f"{args.split}.jsonl").is_file():
        raise FileNotFoundError(f"--tofu-dir has no {args.split}.jsonl: {args.tofu_dir}")
    check_model_path(args.model)
    check_output_dir(args.output, overwrite=args.overwrite, inputs=tofu_inputs(args))
    require_modules("bs-unlearn tofu", *DEMO_MODULES)  # before an hour of work, not at the plots
    run_tofu(args)
    return 0


def tofu_inputs(args: argparse.Namespace) -> list:
    """What the run reads, which the output may not be or contain: the TOFU folder and the model."""
    return [pathlib.Path(args.tofu_dir).expanduser(), model_input_path(args.model)]


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
    parser.add_argument("--model", default="default", help="HF model directory, .gguf file, or 'default' (SmolLM2)")
    parser.add_argument("--retain-examples", type=positive_int, default=80, help="seeded retain subset for fine-tuning")
    parser.add_argument("--eval-examples", type=positive_int, default=20, help="seeded subset of each evaluation set")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=list(TOFU_RUNS),
        help="runs as METHOD[:opt=value,...] (options as in bs-unlearn demo; lr_grid=A/B gives a run its own grid)",
    )
    parser.add_argument("--target-lp", type=float, default=None, help="forget target mean log-prob to reach")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="step cap per run")
    parser.add_argument(
        "--lr-grid",
        type=float,
        nargs="+",
        default=None,
        help="learning rates to try per method (a run's lr_grid= replaces it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=handle, on_interrupt=PARTIAL_RESULTS)
