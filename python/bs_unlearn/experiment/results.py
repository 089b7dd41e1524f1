"""The files a comparison leaves: results.json (every number, written after every run and at the end) and table.md
(the table of the protocol with its caption, also shown on the terminal). Nothing else writes either file."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from ..outputs import write_json_atomic
from .seed_tables import SEEDS_CAPTION, paired_table, seeds_table
from .settings import ComparisonSettings
from .tables import matched_table, steps_table

RESULTS_FILE = "results.json"
TABLE_FILE = "table.md"


def save_results(results: dict, output: pathlib.Path) -> pathlib.Path:
    """Write ``results`` to ``output``/results.json (atomically: an interrupted write leaves the previous one)."""
    return write_json_atomic(results, pathlib.Path(output) / RESULTS_FILE)


def write_table(
    results: dict, settings: ComparisonSettings, output: pathlib.Path, *, show: Callable[[str], None] = print
) -> pathlib.Path:
    """Write the protocol's table with its caption to ``output``/table.md and show it as plain text."""
    table = matched_table if results["protocol"] == "matched" else steps_table
    tables = [table]
    if len(results.get("seeds", ())) > 1 or results.get("seeds_table"):
        tables += [seeds_table, paired_table]
    text = table_caption(results, settings) + "\n\n" + table(results, markdown=True) + "\n"
    if len(tables) > 1:
        text += "\n" + SEEDS_CAPTION + "\n\n" + seeds_table(results, markdown=True) + "\n"
        paired = paired_table(results, markdown=True)
        text += (
            f"\n{paired}\n"
            if paired
            else "\n(no paired differences: they need a GradDiff run and another method at the same seeds)\n"
        )
    path = pathlib.Path(output) / TABLE_FILE
    path.write_text(text, encoding="utf-8")
    for warning in results.get("start_warnings", []):
        show(f"warning: {warning}")
    for render in tables:
        shown = render(results, markdown=False)
        if shown:
            show("")
            show(shown)
    show("")
    return path


def table_caption(results: dict, settings: ComparisonSettings) -> str:
    """What the table's columns mean and how the runs were made (model, data, batch, protocol)."""
    batch = settings.unlearn.batch_size
    common = (
        f"Model: {results['model']}. Data: {results['data']}; batch {batch} forget + {batch} retain. "
        "p = exp(mean per-token log-prob), averaged over answers; Δlp = change of the mean per-token log-prob over "
        "the run."
    )
    if results["protocol"] == "steps":
        return (
            f"{common} {settings.unlearn_steps} unlearning steps at lr {settings.unlearn_lr:g}; p(label) / alt mass = "
            "token level, at the forget answers' positions."
        )
    leak = (
        "Leak rate: fraction of answers (greedy + samples, original and paraphrased question) containing a key fact. "
        if settings.leak_samples
        else ""
    )
    grid = f"{{{', '.join(f'{lr:g}' for lr in settings.lr_grid)}}} (or the run's own lr_grid)"
    if settings.lr_search == "ascending":
        chosen = f"at the first lr of {grid}, smallest first, that reaches it"
    else:
        chosen = f"at the lr of {grid} that reaches it with the least retain damage"
    warnings = "".join(f" WARNING: {warning}." for warning in results.get("start_warnings", []))
    sizes = results.get("eval_sizes")
    sizes_text = (
        " Evaluation sets: "
        + ", ".join(f"{name} {n}" for name, n in sizes.items())
        + (" (subsets asked for: not TOFU's full sets)." if results.get("eval_subsets") else " (TOFU's full sets).")
        if sizes
        else ""
    )
    return (
        f"{common} Matched forgetting: each run stops at the first step whose forget target lp is <= "
        f"{settings.target_lp:g} (cap {settings.max_steps} steps; values at that step), {chosen} (if none does, "
        f"the run that came closest). {leak}Mem, Util, Agg: the paper's metrics as open-unlearning computes them; "
        "*Util and Agg without fluency (no offline gibberish classifier). Forget quality: KS-test p-value of "
        f"forget-set truth ratios against the retain-only model.{sizes_text}{warnings}"
    )
