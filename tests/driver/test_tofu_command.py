"""``bs-unlearn tofu`` end to end on a tiny random model and a few TOFU records (every stage, seconds)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from bs_unlearn.cli import main as cli_main  # noqa: E402
from bs_unlearn.data import read_qa_records  # noqa: E402
from bs_unlearn.experiment.run_specs import parse_run  # noqa: E402
from bs_unlearn.tiny_model import build_quick_model  # noqa: E402
from bs_unlearn.tofu_data import tofu_eval_files  # noqa: E402


def test_tofu_default_runs_parse():
    from bs_unlearn.commands.tofu import TOFU_RUNS

    specs = [parse_run(spec) for spec in TOFU_RUNS]
    assert [spec.method for spec in specs] == ["graddiff", "npo", "bs-t", "bs-s"]


def test_tofu_command_on_a_tiny_model(tofu_dir, tmp_path, capsys, monkeypatch):
    import subprocess

    def no_process(*args, **kwargs):
        raise AssertionError(f"a progress line started a process: {args}")

    monkeypatch.setattr(subprocess, "run", no_process)  # the load comes from /proc/loadavg, not from `uptime`
    records = []
    for _, file, _ in tofu_eval_files("forget01"):
        records += read_qa_records(tofu_dir / file)
    records += read_qa_records(tofu_dir / "retain99.jsonl", max_examples=4, seed=0)
    model = build_quick_model(tmp_path / "tiny", records)
    output = tmp_path / "tofu"
    argv = ["tofu", "--tofu-dir", str(tofu_dir), "--model", model, "--output", str(output), "--retain-examples", "4"]
    argv += [
        "--eval-examples",
        "3",
        "--max-steps",
        "2",
        "--lr-grid",
        "1e-3",
        "--runs",
        "graddiff",
        "bs-t:lam=1.0,lr_grid=2e-3",
    ]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    results = json.loads((output / "results.json").read_text())
    assert results["forget_set"] == "forget01" and [run["label"] for run in results["runs"]] == [
        "GA (+retain NLL)",
        "BS-T λ=1 (lr_grid=0.002)",
    ]
    # GA takes the command's --lr-grid; BS-T its own lr_grid in place of it.
    assert [run["lr"] for run in results["runs"]] == [1e-3, 2e-3]
    forget = results["start_metrics"]["sets"]["forget01"]
    assert forget["n"] == 40  # the forget split is evaluated whole; the other sets are subsets
    assert results["start_metrics"]["sets"]["real_authors"]["n"] == 3
    assert forget["paper"].get("leak_rate") is None  # TOFU records carry no key strings: no leak rate
    for run in results["runs"]:
        assert run["steps"] <= 2 and 0.0 <= run["metrics"]["sets"]["forget01"]["paper"]["forget_quality"] <= 1.0
    assert "retain-only" in printed and (output / "forgetting.png").is_file() and (output / "table.md").is_file()
    # Model utility over all nine parts (retain, real authors, world facts x probability, ROUGE-L, truth ratio).
    assert (
        results["start_metrics"]["model_utility_parts"] == 9 and results["start_metrics"]["model_utility"] is not None
    )
    assert "Matched forgetting" in (output / "table.md").read_text()  # the caption the demo's table has
