"""``bs-unlearn tofu`` end to end on a tiny random model and a few TOFU records (every stage, seconds): the cached
start and retain-only models, seeds with intervals, --start / --retain-only, a killed comparison resumed."""

from __future__ import annotations

import dataclasses
import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")
pytest.importorskip("scipy")

from bs_unlearn.cli import main as cli_main  # noqa: E402
from bs_unlearn.commands import tofu as tofu_command  # noqa: E402
from bs_unlearn.data import read_qa_records  # noqa: E402
from bs_unlearn.experiment import comparison, finetune_stage  # noqa: E402
from bs_unlearn.experiment.run_specs import parse_run  # noqa: E402
from bs_unlearn.tiny_model import build_quick_model  # noqa: E402
from bs_unlearn.tofu_data import tofu_eval_files  # noqa: E402
from bs_unlearn.tofu_source import load_split  # noqa: E402

RUNS = ["--runs", "graddiff", "bs-t:lam=1.0,lr_grid=2e-3"]


def test_tofu_default_runs_parse():
    specs = [parse_run(spec) for spec in tofu_command.TOFU_RUNS]
    assert [spec.method for spec in specs] == ["graddiff", "npo", "bs-t", "bs-t", "bs-s"]
    assert [spec.options.get("lam") for spec in specs[2:4]] == [0.2, 1.0]  # the authors' λ and λ = 1


@pytest.fixture
def tiny_tofu(tofu_dir, tmp_path, monkeypatch):
    """A tiny model over the TOFU texts, short answers for speed, and counters of fine-tunes and unlearning runs."""
    import subprocess

    def no_process(*args, **kwargs):
        raise AssertionError(f"a progress line started a process: {args}")

    monkeypatch.setattr(subprocess, "run", no_process)  # the load comes from /proc/loadavg, not from `uptime`
    monkeypatch.setattr(
        tofu_command, "TOFU_SETTINGS", dataclasses.replace(tofu_command.TOFU_SETTINGS, eval_max_new_tokens=8)
    )
    records = []
    for _, file, _ in tofu_eval_files("forget01"):
        records += read_qa_records(tofu_dir / file)
    model = build_quick_model(tmp_path / "tiny", records)
    counts = {"finetune": 0, "runs": 0}
    real_finetune, real_matched = finetune_stage.finetune_stage, comparison.matched_stage

    def counted_finetune(*args, **kwargs):
        counts["finetune"] += 1
        return real_finetune(*args, **kwargs)

    def counted_matched(*args, **kwargs):
        counts["runs"] += 1
        if counts.get("fail_at") == counts["runs"]:
            raise KeyboardInterrupt("killed")  # as Ctrl-C would stop it
        return real_matched(*args, **kwargs)

    monkeypatch.setattr(finetune_stage, "finetune_stage", counted_finetune)
    monkeypatch.setattr(comparison, "matched_stage", counted_matched)
    argv = ["tofu", "--tofu-dir", str(tofu_dir), "--model", model, "--cache", str(tmp_path / "cache")]
    argv += ["--retain-examples", "4", "--eval-examples", "3", "--max-steps", "2", "--lr-grid", "1e-3", *RUNS]
    return argv, counts


def _numbers(results: dict) -> list:
    return [
        (run["label"], run["seed"], run["lr"], run["steps"], run["metrics"]["sets"]["forget01"]["prob"])
        for run in results["runs"]
    ]


def test_tofu_command_seeds_cache_and_resume(tiny_tofu, tofu_dir, tmp_path, capsys):
    argv, counts = tiny_tofu
    output = tmp_path / "tofu"
    assert cli_main([*argv, "--output", str(output), "--seeds", "0,1"]) == 0
    printed = capsys.readouterr().out
    assert counts == {"finetune": 2, "runs": 4}  # the start and retain-only models; 2 methods x 2 seeds
    results = json.loads((output / "results.json").read_text())
    assert [(run["label"], run["seed"]) for run in results["runs"]] == [
        ("GA (+retain NLL)", 0),
        ("BS-T λ=1 (lr_grid=0.002)", 0),
        ("GA (+retain NLL)", 1),
        ("BS-T λ=1 (lr_grid=0.002)", 1),
    ]
    sets = results["start_metrics"]["sets"]
    assert sets["forget01"]["n"] == 40 and sets["retain"]["n"] == 4 and sets["real_authors"]["n"] == 3
    # The retain facts evaluated are the retain facts trained on.
    trained = [r["question"] for r in read_qa_records(output / "data" / "retain.jsonl")]
    evaluated = sets["retain"]["per_example"]
    assert trained == [r["question"] for r in load_split(tofu_dir, "retain_perturbed", max_examples=4, seed=0)]
    assert len(evaluated["answer_mean_logprob"]) == 4
    assert len(list((tmp_path / "cache").iterdir())) == 2
    table = (output / "table.md").read_text()
    assert "Student-t" in table and "method - GradDiff" in table and "subsets asked for" in table
    assert "smallest first" in table and "least retain damage" not in table
    assert "BS-T λ=1 (lr_grid=0.002) (seed 1)" in printed and (output / "probe_ga_retain_nll_seed1.json").is_file()
    # Every run differs from its seed's GradDiff: a difference with an interval per question metric.
    from bs_unlearn.experiment.seed_tables import paired_differences

    differences = paired_differences(results)
    assert list(differences) == ["BS-T λ=1 (lr_grid=0.002)"]
    mean, low, high, seeds = differences["BS-T λ=1 (lr_grid=0.002)"]["forget p"]
    assert seeds == 2 and low <= mean <= high

    # The same comparison again, killed after its first run: the cached models are reused (no fine-tune) ...
    counts.update(finetune=0, runs=0, fail_at=2)
    resumed = tmp_path / "resumed"
    assert cli_main([*argv, "--output", str(resumed), "--seeds", "0,1"]) == 130  # the CLI's status for Ctrl-C
    assert counts["finetune"] == 0 and len(json.loads((resumed / "results.json").read_text())["runs"]) == 1
    # ... killed again in the first run it makes: the run finished before is still in results.json ...
    counts.update(runs=0, fail_at=1)
    assert cli_main([*argv, "--output", str(resumed), "--seeds", "0,1"]) == 130
    kept = json.loads((resumed / "results.json").read_text())["runs"]
    assert [(run["label"], run["seed"]) for run in kept] == [("GA (+retain NLL)", 0)]
    # ... and continued: the finished run is not made again, and the results are the straight run's.
    counts.update(runs=0, fail_at=None)
    assert cli_main([*argv, "--output", str(resumed), "--seeds", "0,1"]) == 0
    assert counts == {"finetune": 0, "runs": 3, "fail_at": None}
    again = json.loads((resumed / "results.json").read_text())
    assert _same(_numbers(again), _numbers(results))
    assert again["start_metrics"]["sets"]["retain"]["prob"] == pytest.approx(sets["retain"]["prob"], rel=1e-6)

    # Other settings in that output are refused, naming what differs.
    assert cli_main([*argv, "--output", str(resumed), "--seeds", "0,1", "--max-steps", "3"]) == 2
    assert "other settings (differing: settings)" in capsys.readouterr().err


def _same(mine: list, theirs: list) -> bool:
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        assert a[:4] == b[:4] and a[4] == pytest.approx(b[4], rel=1e-5)
    return True


def test_tofu_command_with_given_models(tiny_tofu, tmp_path):
    argv, counts = tiny_tofu
    assert cli_main([*argv, "--output", str(tmp_path / "first"), "--runs", "graddiff"]) == 0
    start, retain_only = (
        json.loads((tmp_path / "first" / "results.json").read_text())[key]
        for key in ("start_model", "retain_only_model")
    )
    counts.update(finetune=0, runs=0)
    argv += ["--cache", str(tmp_path / "empty-cache"), "--start", start, "--retain-only", retain_only]
    assert cli_main([*argv, "--output", str(tmp_path / "given"), "--runs", "graddiff"]) == 0
    assert counts["finetune"] == 0 and not (tmp_path / "empty-cache").exists()
    results = json.loads((tmp_path / "given" / "results.json").read_text())
    assert results["start_model"] == start and results["seeds"] == [0]
    assert "[n/a]" in (tmp_path / "given" / "table.md").read_text()  # one seed: no interval
