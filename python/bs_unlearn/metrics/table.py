"""The plain-text table of an evaluation (``bs-unlearn eval``): TOFU's metrics per set, model utility, forget
quality, then the paper's metrics of the forget sets."""

from __future__ import annotations

from .paper import FLUENCY_NOTE


def _cell(value, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)
    return lines


def format_table(results: dict) -> str:
    """A plain-text table of the summary metrics (one row per set), then the paper's metrics of the forget sets."""
    columns = ["prob", "paraphrase_prob", "rouge_l", "truth_ratio", "mean_logprob"]
    rows = []
    for name, metrics in results["sets"].items():
        rows.append([name, str(metrics["n"])] + [_cell(metrics.get(c)) for c in columns])
    lines = _table(["set", "n", *columns], rows)
    if results.get("model_utility") is not None:
        parts = results.get("model_utility_parts")
        lines.append(
            f"model utility (harmonic mean of {parts} parts over retain/utility sets; no fluency part: "
            f"open-unlearning's gibberish classifier cannot be had offline): {results['model_utility']:.4f}"
        )
    elif results.get("model_utility_missing"):
        missing = ", ".join(results["model_utility_missing"])
        lines.append(f"model utility: not computed, parts missing: {missing}")
    for name, value in (results.get("forget_quality") or {}).items():
        lines.append(f"forget quality on {name} (KS-test p-value vs the retain-only model): {value:.4g}")
    papers = {name: m["paper"] for name, m in results["sets"].items() if m.get("paper") is not None}
    if papers:
        paper_columns = ["es", "em", "paraphrase_prob", "truth_ratio", "mem", "util", "agg", "forget_quality"]
        with_leak = any("leak_rate" in p for p in papers.values())
        leak_columns = ["leak_rate", "leak_rate_original", "leak_rate_paraphrased"] if with_leak else []
        paper_rows = [
            [name] + [_cell(p.get(c)) for c in paper_columns] + [_cell(p.get(c)) for c in leak_columns]
            for name, p in papers.items()
        ]
        lines.append("")
        lines.append(f"Paper metrics (open-unlearning definitions; truth_ratio = mean p_c/(p_c+p_w); {FLUENCY_NOTE}):")
        lines.extend(_table(["forget set", *paper_columns, *leak_columns], paper_rows))
        if with_leak:
            samples = {p.get("leak_samples") for p in papers.values() if p.get("leak_samples")}
            lines.append(
                "leak rate: fraction of answers (greedy + "
                f"{'/'.join(str(s) for s in sorted(samples)) or '?'} samples per question, original and paraphrased "
                "question) that still contain a key string of the fact"
            )
    return "\n".join(lines)
