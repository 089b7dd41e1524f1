"""``bs-unlearn demo --quick``: every stage of the demo on a tiny random model, in seconds."""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from bs_unlearn.cli import main as cli_main  # noqa: E402
from bs_unlearn.commands.demo import parse_run, results_table  # noqa: E402


def test_demo_quick_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    started = time.perf_counter()
    assert cli_main(["demo", "--quick", "--output", str(output)]) == 0
    seconds = time.perf_counter() - started
    printed = capsys.readouterr().out

    results = json.loads((output / "results.json").read_text())
    labels = [run["label"] for run in results["runs"]]
    assert labels == ["GA (+retain NLL)", "BS-T λ=1", "BS-S λs=0.5"]
    for run in results["runs"]:
        records = run["probe"]["records"]
        assert [r["step"] for r in records] == [0, 1, 2, 3]
        assert run["belief_lp_change"] == pytest.approx(records[-1]["belief_lp"] - records[0]["belief_lp"])
        assert 0 < run["end"]["forget_prob"] < 1 and 0 < run["end"]["retain_prob"] < 1
        assert len(run["end"]["forget_answers"]) == 12
    assert (output / "squeeze.png").stat().st_size > 10_000
    assert len(list(output.glob("probe_*.json"))) == 3
    table = (output / "table.md").read_text()
    assert table.count("\n|") == 1 + 1 + 1 + 3  # header, rule, start row, one row per run
    for label in labels:
        assert label in printed and label in table
    # A smoke test: generous bound (the machine may be shared); it takes well under a minute when idle.
    assert seconds < 300

    # The output directory is protected, then replaced with --overwrite.
    assert cli_main(["demo", "--quick", "--output", str(output)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_parse_run_and_table_bad_input():
    assert parse_run("bs-t:lam=0.5,top_k=10") == ("bs-t", {"lam": 0.5, "top_k": 10})
    assert parse_run("bs-s") == ("bs-s", {})
    with pytest.raises(ValueError, match="unknown method"):
        parse_run("sgd")
    with pytest.raises(ValueError, match="bad option"):
        parse_run("bs-t:alpha=1")
    with pytest.raises(ValueError, match="bad value"):
        parse_run("bs-t:lam=high")
    empty = {
        "start": {
            "forget_prob": 0.5,
            "paraphrase_prob": 0.1,
            "retain_prob": 0.4,
            "forget_rouge_l": 1.0,
            "forget_answers": ["x"],
        },
        "runs": [],
    }
    assert "fine-tuned (start)" in results_table(empty, markdown=True)
