"""The squeezing probe on a tiny random model: belief band, Trainer callback records, JSON and PNG; compare/eval CLI."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from bs_unlearn.cli import main as cli_main  # noqa: E402
from bs_unlearn.data import demo_data_path, read_qa_records  # noqa: E402
from bs_unlearn.probe import (  # noqa: E402
    SqueezeProbe,
    band_change,
    collect_belief_band,
    load_probe_json,
    value_at_target,
)
from bs_unlearn.tiny_model import build_tiny_model, build_tiny_tokenizer  # noqa: E402
from transformers import TrainerControl, TrainerState, TrainingArguments  # noqa: E402


@pytest.fixture(scope="module")
def demo_records():
    return read_qa_records(demo_data_path("forget.jsonl"))[:3], read_qa_records(demo_data_path("retain.jsonl"))[:3]


@pytest.fixture(scope="module")
def tiny(demo_records):
    forget, retain = demo_records
    texts = [
        text
        for record in forget + retain
        for text in (record["question"], record["answer"], record["paraphrased_answer"], *record["perturbed_answer"])
    ]
    tokenizer = build_tiny_tokenizer(texts)
    return build_tiny_model(tokenizer, hidden_size=32), tokenizer


def test_demo_data_is_tofu_format():
    forget, retain = read_qa_records(demo_data_path("forget.jsonl")), read_qa_records(demo_data_path("retain.jsonl"))
    assert len(forget) * 2 == len(retain)  # a third of the facts is the forget set
    for record in forget + retain:
        assert {"question", "answer", "paraphrased_answer", "perturbed_answer"} <= set(record)
        assert len(record["perturbed_answer"]) == 3
        assert record["paraphrased_answer"] != record["answer"]
        assert record["answer"] not in record["perturbed_answer"]


def test_belief_band_excludes_target_and_duplicates(tiny, demo_records):
    model, tokenizer = tiny
    forget, _ = demo_records
    band = collect_belief_band(model, tokenizer, forget, num_beams=3, num_samples=2, max_new_tokens=5)
    assert [entry["question"] for entry in band] == [r["question"] for r in forget]
    for entry, record in zip(band, forget):
        normalised = [" ".join(b.lower().split()) for b in entry["beliefs"]]
        assert len(set(normalised)) == len(normalised)
        assert record["answer"] not in entry["beliefs"]
        assert 1 <= len(entry["beliefs"]) <= 5
    with pytest.raises(ValueError, match="num_beams"):
        collect_belief_band(model, tokenizer, forget, num_beams=0, num_samples=0)


def _state(step: int) -> TrainerState:
    state = TrainerState()
    state.global_step = step
    return state


def test_probe_callback_records_json_and_png(tiny, demo_records, tmp_path):
    model, tokenizer = tiny
    forget, retain = demo_records
    band = collect_belief_band(model, tokenizer, forget, num_beams=2, max_new_tokens=4)
    probe = SqueezeProbe(
        tokenizer,
        forget,
        band,
        retain_records=retain,
        every=2,
        top_k=4,
        output_json=tmp_path / "probe.json",
        output_png=tmp_path / "probe.png",
        label="GA",
        model_name="tiny",
        data_name="demo",
    )
    args = TrainingArguments(output_dir=str(tmp_path / "scratch"), report_to=[], use_cpu=True)
    control = TrainerControl()
    probe.on_train_begin(args, _state(0), control, model=model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(1, 4):
        # One gradient-ascent step on the forget answers between callback events, so the records must change.
        batch = tokenizer([r["question"] + " " + r["answer"] for r in forget], return_tensors="pt", padding=True)
        loss = -model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        probe.on_step_end(args, _state(step), control, model=model)
    probe.on_train_end(args, _state(3), control, model=model)

    # Records at step 0, 2 (every=2) and the final step 3.
    assert [r["step"] for r in probe.records] == [0, 2, 3]
    for record in probe.records:
        for key in ("target_lp", "belief_lp", "paraphrase_lp", "retain_lp", "target_p_label", "target_alt_mass"):
            assert key in record and record[key] == record[key]  # present and not NaN
        assert record["target_lp"] < 0 and 0 < record["target_p_label"] < 1 and 0 < record["target_alt_mass"] < 1
    assert probe.records[-1]["target_lp"] != probe.records[0]["target_lp"]
    assert band_change(probe.to_dict(), "target_lp") == pytest.approx(
        probe.records[-1]["target_lp"] - probe.records[0]["target_lp"]
    )

    saved = load_probe_json(tmp_path / "probe.json")
    assert saved["records"] == json.loads(json.dumps(probe.records))
    assert saved["label"] == "GA" and saved["counts"]["targets"] == len(forget)
    png = (tmp_path / "probe.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000

    # bs-unlearn compare: two runs side by side, table printed, PNG written; refuses to overwrite.
    second = saved | {"label": "BS-T"}
    (tmp_path / "second.json").write_text(json.dumps(second))
    out = tmp_path / "compare.png"
    assert cli_main(["compare", str(tmp_path / "probe.json"), str(tmp_path / "second.json"), "--output", str(out)]) == 0
    assert out.stat().st_size > 10_000
    assert cli_main(["compare", str(tmp_path / "probe.json"), "--output", str(out)]) == 2


def test_value_at_target_interpolates_where_the_target_is_crossed():
    """Linear in the target log-prob between the last record above the target and the first at or below it."""
    records = [
        {"step": 0, "target_lp": -0.1, "retain_lp": -0.1},
        {"step": 5, "target_lp": -2.0, "retain_lp": -0.8},
        {"step": 8, "target_lp": -4.0, "retain_lp": -1.0},  # crossed -3 between steps 5 and 8, half-way
        {"step": 9, "target_lp": -2.5, "retain_lp": -3.0},  # back above: only the first crossing counts
    ]
    run = {"records": records}
    assert value_at_target(run, -3.0) == pytest.approx(-0.9)
    assert value_at_target(run, -4.0) == pytest.approx(-1.0)  # reached exactly at a record
    assert value_at_target(run, -2.0, key="step") == pytest.approx(5.0)  # any key
    assert value_at_target(run, -5.0) is None  # never reached
    assert value_at_target({"records": [{"target_lp": -4.0}]}, -3.0) is None  # no retain_lp, one record


def test_probe_bad_input(tiny, demo_records):
    _, tokenizer = tiny
    forget, _ = demo_records
    band = [{"question": r["question"], "target": r["answer"], "beliefs": []} for r in forget]
    with pytest.raises(ValueError, match="every"):
        SqueezeProbe(tokenizer, forget, band, every=0)
    with pytest.raises(ValueError, match="belief_band"):
        SqueezeProbe(tokenizer, forget, band[:1])
    with pytest.raises(ValueError, match="forget_records"):
        SqueezeProbe(tokenizer, [], [])


def test_eval_cli_writes_json_and_table(tiny, demo_records, tmp_path, capsys):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    out = tmp_path / "metrics.json"
    argv = ["eval", "--model", str(tmp_path / "model"), "--output", str(out), "--max-new-tokens", "4", "--quiet"]
    argv += ["--forget", str(demo_data_path("forget.jsonl")), "--retain", str(demo_data_path("retain.jsonl"))]
    argv += ["--max-examples", "4"]
    assert cli_main(argv) == 0
    results = json.loads(out.read_text())
    assert set(results["sets"]) == {"forget", "retain"}
    assert results["sets"]["forget"]["n"] == 4 and "rouge_l" in results["sets"]["forget"]
    assert "model utility" in capsys.readouterr().out
    # Existing output without --overwrite, and a missing data file: one error line, exit status 2.
    assert cli_main(argv) == 2
    assert cli_main(argv[:-2] + ["--overwrite", "--set", "x=/nonexistent.jsonl"]) == 2
    assert "error" in capsys.readouterr().err


def test_eval_cli_tofu_dir_sets_and_forget_quality(tiny, tofu_dir, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    argv = ["eval", "--model", str(tmp_path / "model"), "--tofu-dir", str(tofu_dir), "--max-examples", "3"]
    argv += ["--no-generate", "--quiet"]
    assert cli_main(argv + ["--output", str(first)]) == 0
    results = json.loads(first.read_text())
    assert set(results["sets"]) == {"forget01", "retain", "real_authors", "world_facts"}
    assert results["sets"]["real_authors"]["role"] == "options"
    assert all(len(s["per_example"]["truth_ratio"]) == 3 for s in results["sets"].values())
    # The same model as its own retain-only reference: identical truth ratios, KS p-value 1.
    assert cli_main(argv + ["--output", str(second), "--retain-model-metrics", str(first)]) == 0
    assert json.loads(second.read_text())["forget_quality"]["forget01"] == pytest.approx(1.0)


def test_probe_records_fused_equal_materialised(tiny, demo_records):
    """The probe scores without logits by default; its records equal the materialised path's within tolerance."""
    from conftest import TOLERANCES

    model, tokenizer = tiny
    forget, retain = demo_records
    band = collect_belief_band(model, tokenizer, forget, num_beams=2, max_new_tokens=4)
    records = []
    for fused in (True, False):
        probe = SqueezeProbe(tokenizer, forget, band, retain_records=retain, top_k=4, fused_linear=fused)
        records.append(probe.measure(model, 0))
    fused_record, record = records
    keys = ("target_lp", "belief_lp", "paraphrase_lp", "retain_lp", "target_p_label", "target_alt_mass")
    tolerance = TOLERANCES[torch.float32]
    for key in keys:
        assert fused_record[key] == pytest.approx(record[key], abs=tolerance["atol"], rel=tolerance["rtol"]), key
