"""What ``bs-unlearn demo`` and ``bs-unlearn tofu`` share: their common options, the checks before any work, the
progress lines, and every step after their data setup (load the model, run the comparison, write and show the
results). The two commands differ only in their data and their settings."""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..experiment.settings import ComparisonSettings
from ..outputs import is_main_process
from .base import positive_int, require_modules

if TYPE_CHECKING:  # the comparison imports torch and transformers: loaded when a command runs, not at start-up
    from ..experiment.comparison import ComparisonData
    from ..experiment.run_specs import RunSpec

# Optional packages a comparison needs: the figures, forget quality (KS test), ROUGE-L.
COMPARISON_MODULES = ("matplotlib", "scipy", "rouge_score")
PARTIAL_RESULTS = "what was finished is in the output folder (--overwrite replaces it)"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
RUN_OPTIONS_HELP = (
    "options: lam, top_k, lam_s, bs_s_base, num_beliefs, lr, lr_grid (matched: the run's own grid, e.g. "
    "bs-t:lam=1.0,lr_grid=3e-4/1e-3)"
)


def add_comparison_arguments(parser: argparse.ArgumentParser, *, runs_default, runs_help: str) -> None:
    """The options every comparison command has: the model, the runs, the matched protocol's target, cap and lr
    grid, the seed."""
    parser.add_argument("--model", default="default", help="HF model directory, .gguf file, or 'default' (SmolLM2)")
    parser.add_argument("--runs", nargs="+", default=runs_default, help=f"{runs_help}; {RUN_OPTIONS_HELP}")
    parser.add_argument("--target-lp", type=float, default=None, help="matched: forget target mean log-prob to reach")
    parser.add_argument("--max-steps", type=positive_int, default=None, help="matched: step cap per run")
    parser.add_argument(
        "--lr-grid", type=float, nargs="+", default=None, help="matched: learning rates to try (a run's lr_grid= wins)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-fused-linear",
        dest="fused_linear",
        action="store_false",
        help="train and run the squeezing probe through materialised [B, T, V] logits (default: from hidden states "
        "and the lm_head weight in row chunks, wherever the model's architecture allows; the same numbers within "
        "float tolerance)",
    )


def check_can_start(command: str) -> None:
    """One process, and every optional package present: refused before minutes of work, not at the plots."""
    if not is_main_process():
        raise ValueError(f"{command} runs in one process; start it without torchrun / accelerate launch")
    require_modules(command, *COMPARISON_MODULES)


def settings_from_args(settings: ComparisonSettings, args: argparse.Namespace) -> ComparisonSettings:
    """``settings`` with what the command line gives of --target-lp, --max-steps, --lr-grid and --no-fused-linear."""
    overrides = {name: getattr(args, name) for name in ("target_lp", "max_steps") if getattr(args, name) is not None}
    if args.lr_grid is not None:
        overrides["lr_grid"] = tuple(args.lr_grid)
    if not getattr(args, "fused_linear", True):
        overrides["fused_linear"] = False
    return dataclasses.replace(settings, **overrides)


def model_name_of(model: str) -> str:
    """How tables and figures name a model given as --model."""
    return DEFAULT_MODEL_NAME if model == "default" else model


def print_progress(message: str) -> None:
    """A progress line with the clock and the machine's load (long runs share machines; the load explains speed)."""
    try:
        load = f"  (load {pathlib.Path('/proc/loadavg').read_text().split()[0]})"
    except (OSError, IndexError):
        load = ""
    print(f"{time.strftime('%H:%M:%S')} {message}{load}", flush=True)


def compare_and_report(
    data: ComparisonData,
    specs: Sequence[RunSpec],
    *,
    model: str,
    model_name: str,
    protocol: str,
    settings: ComparisonSettings,
    output: pathlib.Path,
    seed: int,
    tag: str,
    extras: dict | None = None,
    prepare: Callable | None = None,
    say: Callable[[str], None] = print_progress,
    show: Callable[[str], None] = print,
) -> dict:
    """Everything after a command's data setup: load ``model``, run the comparison on ``data`` with ``specs``, write
    results.json and table.md to ``output`` and show the table and the stage profile; returns the results.

    ``prepare(laps, say)``, where the command brings its models itself (TOFU's cached start and retain-only models),
    returns (model spec, base model or None, tokenizer, more keywords of run_comparison) in place of the loading."""
    from ..experiment.comparison import run_comparison
    from ..experiment.profile import Profile, show_profile
    from ..experiment.results import write_table
    from ..models import load_model_and_tokenizer

    laps = Profile()
    more: dict = {}
    if prepare is None:
        say(f"[{tag}] loading {model_name}")
        base_model, tokenizer = load_model_and_tokenizer(model)
        laps("load")
    else:
        model, base_model, tokenizer, more = prepare(laps, say)
    more["extras"] = {**(extras or {}), **more.get("extras", {})}
    results = run_comparison(
        model,
        base_model,
        tokenizer,
        data,
        specs,
        protocol=protocol,
        settings=settings,
        output=output,
        model_name=model_name,
        seed=seed,
        say=say,
        tag=tag,
        laps=laps,
        **more,
    )
    write_table(results, settings, output, show=show)
    figures = ", ".join(path.name for path in sorted(output.glob("*.png")))
    show(f"[{tag}] wrote {figures}, results.json, table.md in {output}")
    show(f"[{tag}] stage profile (also in results.json):")
    show_profile(results["profile"], show)
    show(f"[{tag}] total {results['timings_seconds']['total']:.0f} s")
    return results
