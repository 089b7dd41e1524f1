"""The files a comparison leaves: results.json (every number, written after every run and at the end) and table.md
(the table of the protocol with its caption, also shown on the terminal). Nothing else writes either file."""

from __future__ import annotations

import pathlib
from collections.abc import Callable

from ..outputs import write_json_atomic
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
    path = pathlib.Path(output) / TABLE_FILE
    path.write_text(table_caption(results, settings) + "\n\n" + table(results, markdown=True) + "\n", encoding="utf-8")
    show("")
    show(table(results, markdown=False))
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
    return (
        f"{common} Matched forgetting: each run stops at the first step whose forget target lp is <= "
        f"{settings.target_lp:g} (cap {settings.max_steps} steps; values at that step), at the lr of "
        f"{{{', '.join(f'{lr:g}' for lr in settings.lr_grid)}}} (or the run's own lr_grid) that reaches it with the "
        f"least retain damage. {leak}Mem, Util, Agg: the paper's metrics as open-unlearning computes them; *Util and "
        "Agg without fluency (no offline gibberish classifier). Forget quality: KS-test p-value of forget-set truth "
        "ratios against the retain-only model."
    )
