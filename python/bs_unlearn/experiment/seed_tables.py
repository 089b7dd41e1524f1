"""The tables of a comparison over seeds: each method's mean and 95 % t interval over seeds, and each method's paired
difference from GradDiff with a bootstrap interval over questions and seeds (bs_unlearn.metrics.intervals), a
difference outside the noise (its interval excludes 0) marked with ``*``."""

from __future__ import annotations

import math

import numpy as np

from ..metrics.intervals import excludes_zero, paired_bootstrap, t_interval
from .tables import render_table

REFERENCE_METHOD = "graddiff"

# (column, set role, set-level key)
_SET_METRICS = (
    ("forget p", "forget", "prob"),
    ("paraphrase p", "forget", "paraphrase_prob"),
    ("forget ROUGE-L", "forget", "rouge_l"),
    ("retain p", "retain", "prob"),
    ("retain ROUGE-L", "retain", "rouge_l"),
)
_PAPER_METRICS = (("Mem", "mem"), ("Util*", "util"), ("Agg*", "agg"), ("forget quality", "forget_quality"))
# (column, set role, per_example key, transform): per question, the quantities whose mean is _SET_METRICS' value.
_QUESTION_METRICS = (
    ("forget p", "forget", "answer_mean_logprob", math.exp),
    ("paraphrase p", "forget", "paraphrase_mean_logprob", math.exp),
    ("forget ROUGE-L", "forget", "rouge_l", float),
    ("retain p", "retain", "answer_mean_logprob", math.exp),
    ("retain ROUGE-L", "retain", "rouge_l", float),
)


def _set(metrics: dict, role: str) -> dict:
    return next((s for s in metrics["sets"].values() if s["role"] == role), {})


def run_values(run: dict) -> dict[str, float | None]:
    """The per-run numbers the seed table averages (None where a run lacks one)."""
    metrics = run["metrics"]
    values = {name: _set(metrics, role).get(key) for name, role, key in _SET_METRICS}
    paper = _set(metrics, "forget").get("paper", {})
    values.update({name: paper.get(key) for name, key in _PAPER_METRICS})
    values["steps"] = run["steps"]
    return values


def question_values(run: dict, role: str, key: str, transform) -> list[float] | None:
    values = _set(run["metrics"], role).get("per_example", {}).get(key)
    if values is None or any(v is None for v in values):
        return None
    return [transform(v) for v in values]


def runs_by_label(results: dict) -> dict[str, dict[int, dict]]:
    """label -> seed -> run, in the order the runs were made."""
    grouped: dict[str, dict[int, dict]] = {}
    for run in results["runs"]:
        grouped.setdefault(run["label"], {})[run.get("seed", results.get("seed", 0))] = run
    return grouped


def _interval_cell(mean, low, high, digits: int = 3) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f} " + ("[n/a]" if low is None else f"[{low:.{digits}f}, {high:.{digits}f}]")


def seeds_table(results: dict, *, markdown: bool) -> str:
    """Per method: the mean over seeds of each metric with its 95 % t interval ("[n/a]" with one seed)."""
    names = [name for name, _, _ in _SET_METRICS] + [name for name, _ in _PAPER_METRICS] + ["steps"]
    rows = []
    for label, by_seed in runs_by_label(results).items():
        row = [label, str(len(by_seed))]
        per_run = [run_values(run) for run in by_seed.values()]
        for name in names:
            values = [v[name] for v in per_run if v[name] is not None]
            row.append(_interval_cell(*t_interval(values), digits=1 if name == "steps" else 3) if values else "-")
        rows.append(row)
    return render_table(["method", "seeds", *names], rows, markdown=markdown)


def paired_differences(results: dict, *, resamples: int = 2000) -> dict[str, dict[str, tuple]]:
    """label -> metric -> (mean difference from GradDiff, low, high, seeds) over the seeds both have; empty when no
    GradDiff run is there."""
    grouped = runs_by_label(results)
    reference = next(
        (by_seed for by_seed in grouped.values() if next(iter(by_seed.values()))["method"] == REFERENCE_METHOD), None
    )
    if reference is None:
        return {}
    out: dict[str, dict[str, tuple]] = {}
    for label, by_seed in grouped.items():
        if by_seed is reference:
            continue
        seeds = [seed for seed in by_seed if seed in reference]
        out[label] = {}
        for name, role, key, transform in _QUESTION_METRICS:
            mine = [question_values(by_seed[seed], role, key, transform) for seed in seeds]
            theirs = [question_values(reference[seed], role, key, transform) for seed in seeds]
            if not seeds or any(v is None for v in mine + theirs):
                continue
            out[label][name] = (*paired_bootstrap(np.array(mine), np.array(theirs), resamples=resamples), len(seeds))
    return out


def paired_table(results: dict, *, markdown: bool) -> str:
    """Per method: its paired difference from GradDiff per metric, "[low, high]" the 95 % bootstrap interval over
    questions and seeds, ``*`` when the interval excludes 0."""
    differences = paired_differences(results)
    names = [name for name, *_ in _QUESTION_METRICS]
    rows = []
    for label, by_metric in differences.items():
        row = [label]
        for name in names:
            if name not in by_metric:
                row.append("-")
                continue
            mean, low, high, _ = by_metric[name]
            row.append(f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]" + ("*" if excludes_zero(low, high) else ""))
        rows.append(row)
    if not rows:
        return ""
    return render_table(["method - GradDiff", *names], rows, markdown=markdown)


SEEDS_CAPTION = (
    "Over seeds (one start model; a seed sets the unlearning batches): each cell the mean over seeds and its 95 % "
    "Student-t interval ([n/a] with one seed). Paired differences from GA (+retain NLL) (GradDiff) at the same seeds: "
    "per question, mean and 95 % percentile bootstrap interval resampling questions and seeds (2000 resamples); * "
    "marks an interval that excludes 0 (a difference outside the noise). Mem, Util*, Agg* and forget quality are "
    "set-level (not per question): they get the seed interval only."
)
