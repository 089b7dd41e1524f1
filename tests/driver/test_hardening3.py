"""Issue 26 (hardening 2), items 2 and 3: non-finite settings and a diverging loss never train or save a model of NaN
weights (item 2); a record whose answers cannot be scored is an error naming its file and line, never a silently
dropped truth ratio (item 3)."""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib

import pytest

pytest.importorskip("transformers")

from bs_unlearn import cli, metrics  # noqa: E402
from bs_unlearn.commands.base import EXIT_BAD_INPUT  # noqa: E402
from bs_unlearn.config import BeliefConfig, FinetuneConfig, ObjectiveConfig, UnlearnConfig  # noqa: E402
from bs_unlearn.data import read_qa_records  # noqa: E402
from bs_unlearn.experiment.run_specs import parse_run  # noqa: E402
from bs_unlearn.experiment.settings import ComparisonSettings  # noqa: E402
from bs_unlearn.tiny_model import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from bs_unlearn.tofu_source import load_split  # noqa: E402
from bs_unlearn.trainer import finetune, unlearn  # noqa: E402
from driver_fixtures import qa_rows, tiny_setup, write_jsonl  # noqa: E402, F401  (tiny_setup: a pytest fixture)
from open_unlearning_checkout import TOFU_DIR, TOFU_DIR_VARIABLE  # noqa: E402

NAN, INF = math.nan, math.inf

# --------------------------------------------------------------------------------------------------------------
# Item 2: every float setting finite and in range, refused by validate() with the option's name
# --------------------------------------------------------------------------------------------------------------

TRAIN_FLOATS = [
    ("lr", INF),
    ("lr", NAN),
    ("lr", -INF),
    ("epochs", INF),
    ("epochs", NAN),
    ("weight_decay", NAN),
    ("weight_decay", INF),
]
OBJECTIVE_FLOATS = [
    ("forget_weight", NAN),
    ("forget_weight", INF),
    ("forget_weight", -1.0),
    ("retain_weight", NAN),
    ("retain_weight", -INF),
    ("beta", INF),
    ("beta", NAN),
    ("lam_s", NAN),
    ("lam", NAN),
    ("belief_temperature", INF),
]


def _unlearn_config(setup, **fields) -> UnlearnConfig:
    fields = {"max_steps": 1, **fields}
    return UnlearnConfig(model=str(setup["model"]), forget=str(setup["forget"]), retain=str(setup["retain"]), **fields)


@pytest.mark.parametrize(("name", "value"), TRAIN_FLOATS)
def test_a_non_finite_training_setting_is_refused_by_validate(tiny_setup, name, value):  # noqa: F811
    for config in (
        _unlearn_config(tiny_setup, **{name: value}),
        FinetuneConfig(model=str(tiny_setup["model"]), data=[str(tiny_setup["forget"])], **{name: value}),
    ):
        with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
            config.validate()


@pytest.mark.parametrize(("name", "value"), OBJECTIVE_FLOATS)
def test_a_non_finite_objective_setting_is_refused_built_or_set_later(tiny_setup, name, value):  # noqa: F811
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        _unlearn_config(tiny_setup, objective=ObjectiveConfig(method="bs-t", **{name: value})).validate()
    config = _unlearn_config(tiny_setup, objective=ObjectiveConfig(method="bs-t"))
    setattr(config.objective, name, value)  # after building: validate() still sees it
    with pytest.raises(ValueError, match=rf"^{name} must be"):
        config.validate()


def test_a_non_finite_belief_temperature_or_count_is_refused(tiny_setup):  # noqa: F811
    for fields in ({"gen_temperature": NAN}, {"gen_temperature": INF}, {"num_beliefs": NAN}):
        with pytest.raises(ValueError, match=rf"^{next(iter(fields))} must be"):
            BeliefConfig(**fields)
    config = _unlearn_config(tiny_setup, objective=ObjectiveConfig(method="bs-s"))
    config.beliefs.gen_temperature = NAN
    with pytest.raises(ValueError, match="^gen_temperature must be a finite number > 0"):
        config.validate()


@pytest.mark.parametrize(
    "spec",
    ["bs-t:lr=inf", "bs-t:lr=nan", "bs-t:lam=nan", "bs-t:lam=inf", "bs-s:lam_s=nan", "bs-s:lam_s=-inf", "bs-t:top_k=0"],
)
def test_a_run_spec_option_out_of_range_is_refused_as_the_spec_is_read(spec):
    option = spec.split(":")[1].split("=")[0]
    with pytest.raises(ValueError, match=rf"^--runs: bad value in '{option}=.*': {option} must be"):
        parse_run(spec)


@pytest.mark.parametrize(
    ("name", "value"),
    [("target_lp", NAN), ("target_lp", -INF), ("target_lp", 1.0), ("lr_grid", (1e-3, INF)), ("finetune_lr", NAN)],
)
def test_a_non_finite_comparison_setting_is_refused(name, value):
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number"):
        dataclasses.replace(ComparisonSettings(), **{name: value})


def run_cli(capsys, argv: list[str]) -> tuple[int, list[str]]:
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    ("option", "value"), [("--lr", "inf"), ("--forget-weight", "nan"), ("--epochs", "inf"), ("--epochs", "nan")]
)
def test_the_cli_refuses_a_non_finite_option_in_one_line_and_saves_nothing(
    tiny_setup,  # noqa: F811
    tmp_path,
    capsys,
    option,
    value,
):
    output = tmp_path / "out"
    argv = ["unlearn", "--method", "graddiff", "--model", str(tiny_setup["model"]), "--output", str(output)]
    argv += ["--forget", str(tiny_setup["forget"]), "--retain", str(tiny_setup["retain"]), "--no-progress"]
    status, err = run_cli(capsys, [*argv, option, value] + ([] if option == "--epochs" else ["--max-steps", "1"]))
    name = option[2:].replace("-", "_")
    bound = ">= 0" if name == "forget_weight" else "> 0"
    assert status == EXIT_BAD_INPUT
    assert err == [f"bs-unlearn: error: {name} must be a finite number {bound}, got {value}"]
    assert not output.exists()


def test_a_diverging_loss_stops_the_run_naming_the_step_and_saves_nothing(tiny_setup, tmp_path):  # noqa: F811
    # lr 1e20: the first step's update overflows the tiny model, and the loss of step 2 is NaN.
    output = tmp_path / "out"
    config = _unlearn_config(tiny_setup, lr=1e20, max_steps=4, output=str(output), progress=False)
    config.objective = ObjectiveConfig(method="graddiff")
    with pytest.raises(ValueError, match=r"^the training loss became nan at step 2; .* not saved"):
        unlearn(config)
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == []

    # Logged every 3 steps: the first logged loss (steps 1-3) is NaN, and the run stops there, not at its end.
    config = FinetuneConfig(
        model=str(tiny_setup["model"]), data=[str(tiny_setup["forget"])], lr=1e20, max_steps=6, logging_steps=3
    )
    config.progress = False
    with pytest.raises(ValueError, match=r"^the training loss became nan by step 3;"):
        finetune(config)


def test_a_finite_run_is_not_stopped(tiny_setup):  # noqa: F811
    result = unlearn(_unlearn_config(tiny_setup, lr=1e-3, max_steps=2, progress=False))
    assert result.summary["steps"] == 2 and all(math.isfinite(e["loss"]) for e in result.log_history if "loss" in e)


# --------------------------------------------------------------------------------------------------------------
# Item 3: a record that cannot be scored is an error naming the file and line, at read time and in the metrics
# --------------------------------------------------------------------------------------------------------------

UNSCORABLE = [
    ("perturbed_answer", []),
    ("perturbed_answer", [""]),
    ("perturbed_answer", ["a fine answer", "  "]),
    ("perturbed_answer", ["a fine answer", 3]),
    ("perturbed_answer", "one answer, not a list"),
    ("paraphrased_answer", ""),
    ("paraphrased_answer", ["a list"]),
]


@pytest.mark.parametrize(("field", "value"), UNSCORABLE)
def test_a_record_whose_answers_cannot_be_scored_is_refused_naming_file_and_line(tmp_path, field, value):
    rows = qa_rows(range(3))
    rows[1][field] = value
    path = write_jsonl(tmp_path / "set.jsonl", rows)
    with pytest.raises(ValueError, match=rf"^{path} line 2: {field} must be a non-empty"):
        read_qa_records(path)


@pytest.mark.parametrize("field", ["perturbed_answer", "paraphrased_answer"])
def test_a_record_missing_a_scored_field_the_others_have_is_refused(tmp_path, field):
    rows = qa_rows(range(3))
    del rows[2][field]
    path = write_jsonl(tmp_path / "set.jsonl", rows)
    with pytest.raises(ValueError, match=rf"^{path} line 3: no {field}, which the other records have"):
        read_qa_records(path)
    # The same from a folder of JSON files (tofu_source's other reader), named by row.
    folder = tmp_path / "tofu"
    (folder / "forget01").mkdir(parents=True)
    (folder / "forget01" / "part.json").write_text(json.dumps(rows))
    with pytest.raises(ValueError, match=rf"row 3: no {field}"):
        load_split(folder, "forget01")


@pytest.mark.skipif(
    not (TOFU_DIR / "forget01.jsonl").is_file(),
    reason=f"TOFU data not found at {TOFU_DIR}: set {TOFU_DIR_VARIABLE} to a folder holding forget01.jsonl etc.",
)
def test_every_real_tofu_record_passes_the_checks():
    for path in sorted(pathlib.Path(TOFU_DIR).glob("*.jsonl")):
        assert read_qa_records(path), path


def test_the_metrics_raise_on_a_record_without_perturbed_answers_instead_of_dropping_the_truth_ratio():
    rows = qa_rows(range(3))
    texts = [r["question"] + " " + r["answer"] + " " + r["paraphrased_answer"] for r in rows]
    tokenizer = build_tiny_tokenizer(texts + [p for r in rows for p in r["perturbed_answer"]])
    model = build_tiny_model(tokenizer, hidden_size=32)
    options = metrics.EvalOptions(generate=False)
    whole = metrics.evaluate(model, tokenizer, [metrics.EvalSet("forget", rows, "forget")], options)
    assert whole["sets"]["forget"]["paper"]["truth_ratio"] is not None
    rows[1]["perturbed_answer"] = []  # records built in code do not pass through read_qa_records
    with pytest.raises(ValueError, match=r"record 2 .*perturbed_answer \[\] has no answer to score"):
        metrics.evaluate(model, tokenizer, [metrics.EvalSet("forget", rows, "forget")], options)
    # A set without perturbed answers at all still has no truth ratio, as before.
    bare = [{k: v for k, v in r.items() if k != "perturbed_answer"} for r in qa_rows(range(3))]
    results = metrics.evaluate(model, tokenizer, [metrics.EvalSet("forget", bare, "forget")], options)
    assert results["sets"]["forget"]["paper"]["truth_ratio"] is None
