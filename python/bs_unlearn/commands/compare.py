"""``bs-unlearn compare``: one figure (a column per run) and one table from several squeezing-probe JSONs.

    bs-unlearn compare runs/ga/probe.json runs/bs_t/probe.json runs/bs_s/probe.json --output squeeze.png

A probe JSON is what ``bs_unlearn.probe.SqueezeProbe`` writes (``bs-unlearn demo`` writes one per run).
"""

from __future__ import annotations

import argparse
import pathlib

from ..outputs import check_output_file, check_readable_file
from .base import require_modules

TABLE_KEYS = (
    ("target_lp", "target lp"),
    ("belief_lp", "band lp"),
    ("paraphrase_lp", "paraphrase lp"),
    ("retain_lp", "retain lp"),
    ("target_p_label", "p(label)"),
    ("target_alt_mass", "alt mass"),
)


def compare_table(runs: list[dict]) -> str:
    """First -> last recorded value of each probe quantity, one row per run."""
    header = ["run", "steps", *(name for _, name in TABLE_KEYS)]
    rows = []
    for run in runs:
        first, last = run["records"][0], run["records"][-1]
        cells = [run.get("label") or "?", f"{first['step']}->{last['step']}"]
        for key, _ in TABLE_KEYS:
            cells.append(f"{first[key]:.3f} -> {last[key]:.3f}" if key in first and key in last else "-")
        rows.append(cells)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def handle(args: argparse.Namespace) -> int:
    require_modules("bs-unlearn compare", "matplotlib")
    output = pathlib.Path(args.output).expanduser()
    if output.suffix.lower() != ".png":
        raise ValueError(f"--output must be a .png file, got {output}")
    if args.labels is not None and len(args.labels) != len(args.probes):
        raise ValueError(f"--labels has {len(args.labels)} names for {len(args.probes)} probe files")
    probes = [check_readable_file(path, "probe JSON") for path in args.probes]
    check_output_file(output, overwrite=args.overwrite, inputs=probes)
    from ..plotting import plot_probe_runs
    from ..probe import load_probe_json

    runs = []
    for index, path in enumerate(probes):
        run = load_probe_json(path)
        if args.labels is not None:
            run["label"] = args.labels[index]
        elif not run.get("label"):
            run["label"] = pathlib.Path(path).stem
        runs.append(run)
    plot_probe_runs(runs, output, title=args.title)
    print(compare_table(runs))
    print(f"wrote {output}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="plot several squeezing-probe JSONs side by side (one panel per method)",
        description="Draw the squeezing probes of several unlearning runs in one figure and print a summary table.",
    )
    parser.add_argument("probes", nargs="+", help="probe JSON files (written by SqueezeProbe / bs-unlearn demo)")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--labels", nargs="+", default=None, help="panel titles, one per probe file")
    parser.add_argument("--title", default=None, help="figure title (default: the model and data of the first run)")
    parser.set_defaults(handler=handle)
