"""TOFU from any source in ``tofu`` and ``eval`` (a JSON Lines folder, a local dataset folder, locuslab/TOFU from
the HF cache), the full evaluation sets by default, and the start model's retain-facts warning."""

from __future__ import annotations

import argparse
import dataclasses

import pytest
from bs_unlearn import tofu_source
from bs_unlearn.commands.evaluate import eval_sets_from_args
from bs_unlearn.data import read_qa_records
from bs_unlearn.tofu_data import tofu_eval_sets, tofu_eval_splits

FULL_SIZES = {"forget01": 40, "retain": 400, "real_authors": 100, "world_facts": 117}


def test_full_evaluation_sets_by_default(tofu_dir):
    sets = tofu_eval_sets(tofu_dir, "forget01")
    assert {s.name: len(s.records) for s in sets} == FULL_SIZES
    subsets = tofu_eval_sets(tofu_dir, "forget01", max_examples=5, retain_examples=7)
    assert {s.name: len(s.records) for s in subsets} == {
        "forget01": 40,
        "retain": 7,
        "real_authors": 5,
        "world_facts": 5,
    }


def test_parquet_folder_and_hub_id_give_the_jsonl_sets(tofu_dir, tmp_path, monkeypatch):
    parquet = pytest.importorskip("pyarrow.parquet")
    pyarrow = pytest.importorskip("pyarrow")
    folder = tmp_path / "snapshot"  # the hub repository's layout: NAME/train-00000-of-00001.parquet
    for _, split, _ in tofu_eval_splits("forget01"):
        (folder / split).mkdir(parents=True)
        rows = read_qa_records(tofu_dir / f"{split}.jsonl")
        parquet.write_table(pyarrow.Table.from_pylist(rows), folder / split / "train-00000-of-00001.parquet")
    expected = tofu_eval_sets(tofu_dir, "forget01", max_examples=4, retain_examples=6, seed=0)
    assert tofu_eval_sets(folder, "forget01", max_examples=4, retain_examples=6) == expected

    asked = []

    def cached_rows(dataset_id, name):  # what datasets.load_dataset would read from the HF cache
        asked.append((dataset_id, name))
        return read_qa_records(tofu_dir / f"{name}.jsonl")

    monkeypatch.setattr(tofu_source, "_hub_rows", cached_rows)
    args = argparse.Namespace(
        tofu="locuslab/TOFU", split="forget01", forget=None, retain=None, real_authors=None, world_facts=None, set=None,
        max_examples=4, seed=0,
    )  # fmt: skip
    from_hub = eval_sets_from_args(args)
    assert [(s.name, s.role) for s in from_hub] == [(s.name, s.role) for s in expected]
    assert from_hub[1:] == tofu_eval_sets(tofu_dir, "forget01", max_examples=4, retain_examples=4)[1:]
    assert ("locuslab/TOFU", "forget01") in asked
    args.tofu = str(folder)
    assert eval_sets_from_args(args) == from_hub


@pytest.mark.parametrize(("retain_p", "warned"), [(0.3, True), (0.6, False)])
def test_start_that_does_not_know_its_retain_facts_is_warned(tmp_path, retain_p, warned):
    from bs_unlearn.experiment.comparison import ComparisonData, _Context
    from bs_unlearn.experiment.progress import Laps
    from bs_unlearn.experiment.settings import ComparisonSettings

    def fake_set(role, prob):
        return {"role": role, "prob": prob, "rouge_l": 0.5, "per_example": {"generation": ["x"]}}

    lines = []
    data = ComparisonData("d", dataclasses.make_dataclass("S", ["name"])("forget01"), None, [])
    context = _Context("m", None, data, ComparisonSettings(), tmp_path, 0, lines.append, "t", Laps(), True)
    context.evaluate = lambda model, sets: {
        "sets": {"forget01": fake_set("forget", 0.9), "r": fake_set("retain", retain_p)}
    }
    results = {}
    context.evaluate_start(None, results)
    assert bool(results.get("start_warnings")) is warned
    assert any("does not know the evaluated retain facts" in line for line in lines) is warned
