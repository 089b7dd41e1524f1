"""The tables of a comparison: the equal-steps view (the probe's changes over each run) and the matched-forgetting
view (every run at the step where it reached the target), as Markdown or aligned plain text."""

from __future__ import annotations

from collections.abc import Sequence

from ..probe import band_change, value_at_target


def format_cell(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def signed_cell(value) -> str:
    return "-" if value is None else f"{value:+.2f}"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool, wrap_last: int = 0) -> str:
    """A Markdown table, or an aligned plain-text one (the last column cut to ``wrap_last`` characters if > 0)."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines)
    if wrap_last:
        rows = [
            list(row[:-1]) + [row[-1] if len(row[-1]) <= wrap_last else row[-1][: wrap_last - 3] + "..."]
            for row in rows
        ]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def probe_change(run: dict, key: str) -> float | None:
    """Last minus first recorded value of a probe quantity over a run."""
    return band_change(run["probe"], key)


def steps_table(results: dict, *, markdown: bool) -> str:
    """The equal-steps table (rows: the fine-tuned start, then each run; changes over the run)."""
    header = ["model", "forget p", "paraphrase p", "band Δlp", "target Δlp", "p(label)", "alt mass", "retain p"]
    header += ["forget ROUGE-L", "sample answer"]
    start = results["start"]
    start_probe = results["runs"][0]["probe"]["records"][0] if results["runs"] else {}

    def cells(summary: dict, probe_record: dict, changes: tuple[str, str]) -> list[str]:
        return [
            format_cell(summary["forget_prob"]),
            format_cell(summary["paraphrase_prob"]),
            *changes,
            format_cell(probe_record.get("target_p_label")),
            format_cell(probe_record.get("target_alt_mass")),
            format_cell(summary["retain_prob"]),
            format_cell(summary["forget_rouge_l"], 2),
            summary["forget_answers"][0],
        ]

    rows = [["fine-tuned (start)", *cells(start, start_probe, ("0", "0"))]]
    for run in results["runs"]:
        changes = (signed_cell(probe_change(run, "belief_lp")), signed_cell(probe_change(run, "target_lp")))
        rows.append([run["label"], *cells(run["end"], run["probe"]["records"][-1], changes)])
    return render_table(header, rows, markdown=markdown, wrap_last=60)


def _not_reached_note(run: dict) -> str:
    """How a run that missed the target ended: at the step cap, or given up there by the projection rule."""
    if run["reached"]:
        return ""
    return " (given up; not reached)" if run.get("abandoned_step") is not None else " (cap; not reached)"


def matched_table(results: dict, *, markdown: bool) -> str:
    """The matched-forgetting table (every run at the step where it reached the target, or at its cap).

    "probe retain lp" is the squeezing probe's retain log-prob at the stop and, interpolated, where the run crossed
    the target exactly (probe.value_at_target): how much of a run's retain damage its overshoot accounts for.
    """
    header = ["model", "lr", "steps", "target lp", "band Δlp", "forget p", "paraphrase p", "leak rate", "retain p"]
    header += ["Mem", "Util*", "Agg*", "forget quality", "probe retain lp: stop / at target"]
    target_lp = results.get("target_lp")

    def retain_cell(probe: dict) -> str:
        stop = format_cell(probe["records"][-1].get("retain_lp"), 2)
        crossed = None if target_lp is None else value_at_target(probe, target_lp)
        return f"{stop} / {format_cell(crossed, 2)}"

    def metric_cells(metrics: dict) -> list[str]:
        forget = metrics["sets"][results["forget_set"]]
        paper = forget.get("paper", {})
        quality = paper.get("forget_quality")  # open-unlearning's: the KS test on the paper truth ratios
        retain = next((s for s in metrics["sets"].values() if s["role"] == "retain"), {})
        return [
            format_cell(forget.get("prob")),
            format_cell(forget.get("paraphrase_prob")),
            format_cell(paper.get("leak_rate"), 2),
            format_cell(retain.get("prob")),
            format_cell(paper.get("mem")),
            format_cell(paper.get("util")),
            format_cell(paper.get("agg")),
            "-" if quality is None else f"{quality:.2g}",
        ]

    first = results["runs"][0]["probe"]["records"][0] if results["runs"] else {}
    rows = [["fine-tuned (start)", "-", "0", format_cell(first.get("target_lp"), 2), "0"]]
    rows[0] += [*metric_cells(results["start_metrics"]), format_cell(first.get("retain_lp"), 2)]
    if results.get("retain_only_metrics"):
        rows.append(["retain-only (never saw the forget set)", "-", "-", "-", "-"])
        rows[-1] += [*metric_cells(results["retain_only_metrics"]), "-"]
    several_seeds = len(results.get("seeds", ())) > 1
    for run in results["runs"]:
        last = run["probe"]["records"][-1]
        steps = f"{run['steps']}" + _not_reached_note(run)
        label = run["label"] + (f" (seed {run['seed']})" if several_seeds else "")
        rows.append([label, f"{run['lr']:g}", steps, format_cell(last["target_lp"], 2)])
        rows[-1] += [
            signed_cell(probe_change(run, "belief_lp")),
            *metric_cells(run["metrics"]),
            retain_cell(run["probe"]),
        ]
    return render_table(header, rows, markdown=markdown)
