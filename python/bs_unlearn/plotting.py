"""Figures of the squeezing probe, Agg backend (no display needed).

``plot_forgetting_axis``: forgetting on the x-axis (the forget targets' mean per-token log-prob), one line per
method, three panels: the belief band (a squeeze is a line that stays high while the target falls), the retain
answers (the trade-off) and the leak rate (start and matched point).

``plot_probe_runs``: one column per unlearning run against the optimizer step. Top row: mean per-token log-prob of
the forget targets, the belief band, the paraphrased answers and the retain answers. Bottom row: the token-level view
at the forget answers' positions, p(label) and the mass on the top-k other tokens (with their sum: when it stays flat
while p(label) falls, the mass the label lost went to its rivals: the squeeze).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

SEQUENCE_CURVES = (
    ("target_lp", "forget target", "tab:red", "-"),
    ("belief_lp", "belief band", "tab:blue", "-"),
    ("paraphrase_lp", "paraphrased target", "tab:purple", "--"),
    ("retain_lp", "retain", "tab:green", ":"),
)
TOKEN_CURVES = (
    ("target_p_label", "p(label)", "tab:red", "-"),
    ("target_alt_mass", "top-k alt mass", "tab:blue", "-"),
)


def _series(records: Sequence[dict], key: str):
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_probe_runs(runs: Sequence[dict], path: str | os.PathLike, *, title: str | None = None) -> pathlib.Path:
    """Draw one column per probe run (``SqueezeProbe.to_dict()`` or its JSON) and save a PNG to ``path``.

    Returns the path written. Raises ValueError when ``runs`` is empty or a run has no records.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    if not runs:
        raise ValueError("plot_probe_runs needs at least one run")
    for index, run in enumerate(runs):
        if not run.get("records"):
            raise ValueError(f"run {index} ({run.get('label', '')!r}) has no records")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = len(runs)
    figure, axes = plt.subplots(
        2, columns, figsize=(3.6 * columns + 0.8, 6.2), sharex="col", sharey="row", squeeze=False
    )
    for column, run in enumerate(runs):
        records = run["records"]
        top, bottom = axes[0][column], axes[1][column]
        for key, name, color, style in SEQUENCE_CURVES:
            steps, values = _series(records, key)
            if steps:
                top.plot(steps, values, style, color=color, marker="o", markersize=3, label=name)
        for key, name, color, style in TOKEN_CURVES:
            steps, values = _series(records, key)
            if steps:
                bottom.plot(steps, values, style, color=color, marker="o", markersize=3, label=name)
        steps, label_p = _series(records, "target_p_label")
        _, alt = _series(records, "target_alt_mass")
        if steps and len(alt) == len(label_p):
            bottom.plot(steps, [a + b for a, b in zip(label_p, alt)], "--", color="grey", label="p(label) + alt mass")
        top.set_title(run.get("label") or f"run {column + 1}", fontsize=10)
        top.grid(alpha=0.3)
        bottom.grid(alpha=0.3)
        bottom.set_xlabel("unlearning step")
        bottom.set_ylim(-0.02, 1.02)
    axes[0][0].set_ylabel("mean per-token log-prob")
    axes[1][0].set_ylabel(f"probability at forget positions (k={runs[0].get('top_k', '?')})")
    axes[0][-1].legend(fontsize=8, loc="best")
    axes[1][-1].legend(fontsize=8, loc="best")
    if title is None:
        model = runs[0].get("model") or "model"
        data = runs[0].get("data") or "data"
        title = f"Squeezing probe: {model} unlearning {data}"
    figure.suptitle(title, fontsize=11)
    return _save(figure, path)


def _save(figure, path: pathlib.Path) -> pathlib.Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    partial = path.with_name(path.name + ".partial.png")
    figure.savefig(partial, dpi=120)
    plt.close(figure)
    os.replace(partial, path)
    return path


def _leak_rate(metrics: dict | None) -> float | None:
    for values in (metrics or {}).get("sets", {}).values():
        if values.get("role") == "forget" and "leak_rate" in values.get("paper", {}):
            return values["paper"]["leak_rate"]
    return None


def plot_forgetting_axis(results: dict, path: str | os.PathLike, *, title: str | None = None) -> pathlib.Path:
    """Band, retain and leak rate against the forget targets' log-prob, one line per run of ``results["runs"]``.

    ``results``: what ``bs-unlearn demo`` / ``bs-unlearn tofu`` write (runs with ``probe`` and ``metrics``, plus
    ``start_metrics`` and ``target_lp``). Returns the path written.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    runs = results.get("runs") or []
    if not runs:
        raise ValueError("plot_forgetting_axis needs at least one run")
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    start_leak = _leak_rate(results.get("start_metrics"))
    for index, run in enumerate(runs):
        color = colors[index % len(colors)]
        records = run["probe"]["records"]
        label = run.get("label") or f"run {index + 1}"
        for axis, key in ((axes[0], "belief_lp"), (axes[1], "retain_lp")):
            points = [(r["target_lp"], r[key]) for r in records if key in r]
            if points:
                axis.plot(*zip(*points), "-", color=color, marker="o", markersize=3, label=label)
        end_leak = _leak_rate(run.get("metrics"))
        if start_leak is not None and end_leak is not None:
            xs = (records[0]["target_lp"], records[-1]["target_lp"])
            axes[2].plot(xs, (start_leak, end_leak), "-", color=color, marker="o", label=label)
    names = (
        "belief band: mean per-token log-prob",
        "retain answers: mean per-token log-prob",
        "leak rate (answers with a key fact)",
    )
    for axis, name in zip(axes, names):
        axis.set_xlabel("forget target: mean per-token log-prob (forgetting →)")
        axis.set_ylabel(name)
        axis.invert_xaxis()
        axis.grid(alpha=0.3)
        if results.get("target_lp") is not None:
            axis.axvline(results["target_lp"], color="grey", linestyle="--", linewidth=1)
    axes[0].legend(fontsize=8, loc="best")
    figure.suptitle(title or "At matched forgetting", fontsize=11)
    return _save(figure, path)
