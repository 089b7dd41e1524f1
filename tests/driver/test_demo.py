"""``bs-unlearn demo --quick`` (both protocols) and the matched-forgetting pieces, on a tiny random model."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from bs_unlearn.cli import main as cli_main  # noqa: E402
from bs_unlearn.data import demo_data_path, read_qa_records  # noqa: E402
from bs_unlearn.experiment.comparison import run_comparison  # noqa: E402
from bs_unlearn.experiment.matched_stage import matched_stage  # noqa: E402
from bs_unlearn.experiment.run_specs import RunSpec, parse_run  # noqa: E402
from bs_unlearn.experiment.settings import ComparisonSettings, UnlearnSettings  # noqa: E402
from bs_unlearn.experiment.tables import matched_table  # noqa: E402
from bs_unlearn.experiment.unlearn_stage import unlearn_stage  # noqa: E402
from bs_unlearn.probe import ForgettingTarget, projected_drop  # noqa: E402
from bs_unlearn.tiny_model import build_quick_model  # noqa: E402
from bs_unlearn.tofu_data import QASplit  # noqa: E402


def test_demo_quick_matched_end_to_end(tmp_path, capsys):
    output = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--output", str(output)]) == 0
    printed = capsys.readouterr().out

    results = json.loads((output / "results.json").read_text())
    assert results["protocol"] == "matched"
    labels = [run["label"] for run in results["runs"]]
    assert labels == ["GA (+retain NLL)", "BS-T λ=1", "BS-S λs=0.5 (BS-T λ=1 base)"]
    target = results["target_lp"]
    for run in results["runs"]:
        records = run["probe"]["records"]
        # lr_search="ascending": the grid from its smallest lr, stopping at the first that reaches the target.
        tried = [attempt["lr"] for attempt in run["attempts"]]
        assert tried == sorted(results["settings"]["lr_grid"])[: len(tried)]
        assert not any(attempt["reached"] for attempt in run["attempts"][:-1])
        assert run["lr"] in tried
        if run["reached"]:  # stopped at the first check at or below the target
            assert records[-1]["target_lp"] <= target and run["steps"] == run["probe"]["reached_step"]
        else:  # ran to the cap, reported as not reached
            assert run["steps"] == results["settings"]["max_steps"] and records[-1]["target_lp"] > target
        paper = run["metrics"]["sets"]["forget"]["paper"]
        for key in ("es", "em", "mem", "util", "agg", "leak_rate"):
            assert 0.0 <= paper[key] <= 1.0, key
        assert 0.0 <= paper["forget_quality"] <= 1.0
    assert "retain-only" in printed
    # The stage profile: every stage with its seconds and memory, each training stage's step phases, printed too.
    profile = results["profile"]
    stages = [stage["stage"] for stage in profile["stages"]]
    expected = ["load", "finetune", "retain_only", "evaluate_start", "belief_band"]
    expected += [f"{kind} {label}" for label in labels for kind in ("unlearn", "evaluate")] + ["plot"]
    assert stages == expected
    for stage in profile["stages"]:
        assert stage["seconds"] >= 0 and stage["rss_start_mib"] > 0 and stage["rss_end_mib"] > 0
        assert stage["peak_mib"] is None or stage["peak_mib"] >= stage["rss_end_mib"]
    assert profile["process_peak_mib"] >= max(stage["rss_end_mib"] for stage in profile["stages"])
    assert list(profile["steps"]) == ["finetune", "retain_only"] + [f"unlearn {label}" for label in labels]
    for name, timer in profile["steps"].items():
        assert timer["steps"] > 0 and timer["seconds"]["forward"] > 0, name
    assert sum(run["steps"] for run in results["runs"]) <= sum(
        attempt["steps"] for run in results["runs"] for attempt in run["attempts"]
    )
    assert all("abandoned_step" in attempt for run in results["runs"] for attempt in run["attempts"])
    assert profile["fused_linear"] == "on"
    assert "stage profile" in printed and "seconds per step" in printed
    for name in ("forgetting.png", "squeeze.png"):
        assert (output / name).stat().st_size > 10_000
    assert len(list(output.glob("probe_*.json"))) == 3
    table = (output / "table.md").read_text()
    assert "without fluency" in table
    assert table.count("\n|") == 1 + 1 + 2 + 3  # header, rule, start and retain-only rows, one row per run
    for label in labels:
        assert label in printed and label in table

    # The output directory is protected, then replaced with --overwrite.
    assert cli_main(["demo", "--quick", "--output", str(output)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_demo_quick_steps_protocol(tmp_path, capsys):
    output = tmp_path / "demo"
    assert cli_main(["demo", "--quick", "--protocol", "steps", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((output / "results.json").read_text())
    labels = [run["label"] for run in results["runs"]]
    assert labels == ["GA (+retain NLL)", "BS-T λ=1", "BS-S λs=0.5 (GA base)"]
    for run in results["runs"]:
        records = run["probe"]["records"]
        assert [r["step"] for r in records] == [0, 1, 2, 3]
        assert run["reached"] is None
        assert 0 < run["end"]["forget_prob"] < 1 and 0 < run["end"]["retain_prob"] < 1
        assert len(run["end"]["forget_answers"]) == 12
    table = (output / "table.md").read_text()
    assert table.count("\n|") == 1 + 1 + 1 + 3
    for label in labels:
        assert label in printed and label in table


@pytest.fixture(scope="module")
def tiny_start(tmp_path_factory):
    from bs_unlearn.models import load_model_and_tokenizer

    folder = tmp_path_factory.mktemp("tiny")
    forget_path, retain_path = demo_data_path("forget.jsonl"), demo_data_path("retain.jsonl")
    forget = QASplit("forget", read_qa_records(forget_path)[:4], forget_path)
    retain = QASplit("retain", read_qa_records(retain_path), retain_path)
    model, tokenizer = load_model_and_tokenizer(build_quick_model(folder / "model", forget.records + retain.records))
    band = [{"question": r["question"], "target": r["answer"], "beliefs": []} for r in forget.records]
    stage = dict(forget=forget, retain=retain, band=band, settings=UnlearnSettings(probe_every=2, top_k=5))
    return model, tokenizer, stage


def test_stopping_rule_stops_at_the_target(tiny_start):
    model, tokenizer, stage = tiny_start
    spec = parse_run("ga")
    _, free = unlearn_stage(model, tokenizer, spec, lr=3e-3, max_steps=6, **stage)
    curve = [r["target_lp"] for r in free["probe"]["records"]]
    assert curve[-1] < curve[0]  # GA at this lr forgets on the tiny model
    # A target between the start and where the free run ended: the matched run stops early, at or below it.
    target = ForgettingTarget((curve[0] + curve[-1]) / 2)
    _, stopped = unlearn_stage(model, tokenizer, spec, lr=3e-3, max_steps=6, stop_at=target, **stage)
    assert stopped["reached"] and stopped["steps"] < 6
    assert stopped["probe"]["records"][-1]["target_lp"] <= target.target_lp
    assert stopped["probe"]["records"][-1]["step"] == stopped["steps"] == stopped["probe"]["reached_step"]


def test_stopping_rule_reports_not_reached(tiny_start):
    model, tokenizer, stage = tiny_start
    unreachable = ForgettingTarget(-1e6)
    _, run = matched_stage(
        model, tokenizer, parse_run("ga"), learning_rates=[1e-4, 3e-3], stop_at=unreachable, max_steps=2, **stage
    )
    assert run["reached"] is False and run["steps"] == 2
    assert [a["reached"] for a in run["attempts"]] == [False, False]
    # Neither lr reached it: the one that got closest (the larger lr forgets faster) is kept.
    assert run["lr"] == 3e-3
    table = {"runs": [dict(run, metrics=_fake_metrics())], "start_metrics": _fake_metrics(), "forget_set": "forget"}
    assert "2 (cap; not reached)" in matched_table(table, markdown=True)
    # A run the projection rule gave up on before the cap says so, not "cap".
    table["runs"][0].update(steps=1, abandoned_step=1)
    assert "1 (given up; not reached)" in matched_table(table, markdown=True)


def test_a_run_spec_lr_grid_replaces_the_comparison_grid(tiny_start):
    model, tokenizer, stage = tiny_start
    unreachable = ForgettingTarget(-1e6)
    spec = parse_run("ga:lr_grid=3e-3/1e-4")
    _, run = matched_stage(
        model, tokenizer, spec, learning_rates=[0.5], stop_at=unreachable, max_steps=2, lr_search="all", **stage
    )
    # The spec's own rates, smallest first; the comparison's 0.5 is never tried.
    assert [attempt["lr"] for attempt in run["attempts"]] == [1e-4, 3e-3]
    assert run["lr"] == 3e-3


def test_give_up_stops_a_hopeless_run_at_the_first_projection(tiny_start):
    model, tokenizer, stage = tiny_start
    hopeless = ForgettingTarget(-1e6, give_up=True)
    _, run = unlearn_stage(model, tokenizer, parse_run("ga"), lr=1e-4, max_steps=8, stop_at=hopeless, **stage)
    # The first projection needs the start and two checks: step 2 of 8, not half the cap (4).
    assert run["reached"] is False and run["abandoned_step"] == 2 and run["steps"] == 2
    assert run["probe"]["records"][-1]["step"] == 2
    checks = run["probe"]["checks"]  # what the rule saw: the start record, then every step's check
    assert [step for step, _ in checks] == [0, 1, 2] and checks[0][1] == run["probe"]["records"][0]["target_lp"]
    # A reachable target is never given up on: the start record is reused, the run stops where it reaches it.
    _, free = unlearn_stage(model, tokenizer, parse_run("ga"), lr=3e-3, max_steps=6, **stage)
    start = free["probe"]["records"][0]
    reachable = ForgettingTarget(free["probe"]["records"][-1]["target_lp"], give_up=True)
    _, run = unlearn_stage(
        model, tokenizer, parse_run("ga"), lr=3e-3, max_steps=6, stop_at=reachable, start_record=start, **stage
    )
    assert run["reached"] and run["abandoned_step"] is None
    assert run["probe"]["records"][0] == start


def _fake_metrics() -> dict:
    paper = {"es": 0.1, "em": 0.2, "mem": 0.7, "util": 0.5, "agg": 0.6, "leak_rate": 0.25, "forget_quality": 0.03}
    return {
        "sets": {
            "forget": {"role": "forget", "prob": 0.5, "paraphrase_prob": 0.1, "paper": paper, "per_example": {}},
            "retain": {"role": "retain", "prob": 0.4, "per_example": {}},
        },
    }


def test_matched_table_shows_the_probe_retain_lp_at_the_stop_and_at_the_target():
    records = [
        {"step": 0, "target_lp": -0.1, "retain_lp": -0.1},
        {"step": 5, "target_lp": -2.0, "retain_lp": -0.8},
        {"step": 8, "target_lp": -4.0, "retain_lp": -1.0},  # stopped 1 nat past a target of -3
    ]
    run = {"label": "GA", "lr": 1e-4, "steps": 8, "reached": True, "probe": {"records": records}}
    table = {"runs": [dict(run, metrics=_fake_metrics())], "start_metrics": _fake_metrics(), "forget_set": "forget"}
    assert "| -1.00 / - |" in matched_table(table, markdown=True)  # no target recorded: nothing to interpolate to
    table["target_lp"] = -3.0
    assert "| -1.00 / -0.90 |" in matched_table(table, markdown=True)


def test_forgetting_target_and_run_specs_bad_input():
    with pytest.raises(ValueError, match="target_lp"):
        ForgettingTarget(0.5)
    with pytest.raises(ValueError, match="check_every"):
        ForgettingTarget(-1.0, check_every=0)
    assert parse_run("bs-t:lam=0.5,top_k=10") == RunSpec("bs-t", {"lam": 0.5, "top_k": 10})
    assert parse_run("bs-s") == RunSpec("bs-s", {})
    with pytest.raises(ValueError, match="unknown method"):
        parse_run("sgd")
    with pytest.raises(ValueError, match="bad option"):
        parse_run("bs-t:alpha=1")
    with pytest.raises(ValueError, match="bad value"):
        parse_run("bs-t:lam=high")


def test_run_spec_lr_grid_parsing_and_bad_input():
    spec = parse_run("bs-t:lam=1.0,lr_grid=5e-4/1.5e-3")
    assert spec.lr_grid == (5e-4, 1.5e-3) and spec.lr is None
    assert "lr_grid" not in spec.objective_options  # never reaches ObjectiveConfig
    assert spec.label == "BS-T λ=1 (lr_grid=0.0005/0.0015)"
    with pytest.raises(ValueError, match="both lr and lr_grid"):
        parse_run("ga:lr=1e-4,lr_grid=1e-4/3e-4")
    for bad in ("0/1e-4", "1e-4/-3e-4", "1e-4/inf", "1e-4//3e-4", "fast"):
        with pytest.raises(ValueError, match="bad value in 'lr_grid="):
            parse_run(f"ga:lr_grid={bad}")
    # The steps protocol has no grid to replace: refused before any work (no model, no data, no output needed).
    with pytest.raises(ValueError, match="lr_grid is for the matched protocol"):
        run_comparison(
            "model",
            None,
            None,
            None,
            [spec],
            protocol="steps",
            settings=ComparisonSettings(),
            output=None,
            model_name="",
        )
    with pytest.raises(ValueError, match="protocol"):
        run_comparison(
            "x", None, None, None, [], protocol="fast", settings=ComparisonSettings(), output=None, model_name=""
        )


def test_projected_drop_rule():
    """The give-up rule on constructed curves: no projection before the third check or before the curve falls; a
    geometric curve is projected with its growth factor; a run is given up only when even that covers less than half
    the way to the target."""
    assert projected_drop([(0, -0.1), (1, -0.2)], 12) is None
    assert projected_drop([(0, -0.1), (1, -0.1), (2, -0.3)], 12) is None  # no drop yet at step 1
    # Drops 0.01, 0.02, 0.04: factor 2 per step, 10 steps to go.
    geometric = [(0, -0.1), (1, -0.11), (2, -0.12), (3, -0.14)]
    assert projected_drop(geometric, 13) == pytest.approx(0.04 * 2**10)
    # The largest of the recent factors counts (here 3 per step from step 4 to 6), over checks two steps apart too.
    curve = [(0, 0.0), (2, -0.005), (4, -0.01), (6, -0.09), (8, -0.18)]
    assert projected_drop(curve, 10) == pytest.approx(0.18 * 3**2)
    target = ForgettingTarget(-3.0, give_up=True)
    assert not target.hopeless(geometric, 13)  # projected 41 >> 2.9: keep going
    assert target.hopeless(geometric, 6)  # 0.04 * 2**3 = 0.32 < half of 2.9
    assert not ForgettingTarget(-3.0).hopeless(geometric, 6)  # give_up off
