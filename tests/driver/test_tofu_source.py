"""bs_unlearn.tofu_source.load_split: TOFU from a JSON Lines folder, a local dataset folder (parquet, JSON, a hub
snapshot, save_to_disk) or the Hugging Face id read offline, all giving the JSON Lines loader's records (issue 26.17).

Every folder is built in tmp_path from the same small records, so the expected value is the JSONL folder's."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
from bs_unlearn import tofu_source
from bs_unlearn.data import read_qa_records, select_examples
from bs_unlearn.tofu_source import load_split

datasets = pytest.importorskip("datasets")
parquet = pytest.importorskip("pyarrow.parquet")
pyarrow = pytest.importorskip("pyarrow")


def records(name: str, count: int) -> list[dict]:
    rows = []
    for index in range(count):
        row = {"question": f"{name} question {index}?", "answer": f"{name} answer {index} é"}
        if name != "retain99":
            row["paraphrased_answer"] = f"{name} paraphrase {index}"
            row["perturbed_answer"] = [f"{name} wrong {index} {k}" for k in range(3)]
        rows.append(row)
    return rows


SPLITS = {"forget01": records("forget01", 7), "retain99": records("retain99", 9), "retain_perturbed": records("rp", 5)}


def jsonl_folder(folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir()
    for name, rows in SPLITS.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return folder


def build(layout: str, folder: pathlib.Path) -> pathlib.Path:
    folder.mkdir()
    for name, rows in SPLITS.items():
        table = pyarrow.Table.from_pylist(rows)
        if layout == "parquet":
            parquet.write_table(table, folder / f"{name}.parquet")
        elif layout == "hub_snapshot":  # the hub repository's layout: NAME/train-00000-of-00001.parquet
            (folder / name).mkdir()
            parquet.write_table(table, folder / name / "train-00000-of-00001.parquet")
        elif layout == "json_array":
            (folder / f"{name}.json").write_text(json.dumps(rows))
        elif layout == "json_lines":  # the hub's older NAME.json files are JSON Lines
            (folder / f"{name}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif layout == "save_to_disk_per_split":  # load_dataset(id, NAME).save_to_disk(folder / NAME)
            datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(folder / name))
        elif layout == "save_to_disk_dataset":
            datasets.Dataset.from_list(rows).save_to_disk(str(folder / name))
    if layout == "save_to_disk_dict":  # one DatasetDict keyed by split name
        folder.rmdir()
        datasets.DatasetDict({n: datasets.Dataset.from_list(r) for n, r in SPLITS.items()}).save_to_disk(str(folder))
    return folder


@pytest.mark.parametrize(
    "layout",
    [
        "parquet",
        "hub_snapshot",
        "json_array",
        "json_lines",
        "save_to_disk_per_split",
        "save_to_disk_dataset",
        "save_to_disk_dict",
    ],  # fmt: skip
)
def test_local_dataset_folders_give_the_jsonl_records(tmp_path, layout):
    expected_folder = jsonl_folder(tmp_path / "jsonl")
    folder = build(layout, tmp_path / layout)
    for name in SPLITS:
        expected = read_qa_records(expected_folder / f"{name}.jsonl")
        assert load_split(folder, name) == expected, (layout, name)
        assert load_split(expected_folder, name) == expected  # today's layout, unchanged
        subset = load_split(folder, name, max_examples=3, seed=5)
        assert subset == read_qa_records(expected_folder / f"{name}.jsonl", max_examples=3, seed=5)


def test_bad_records_and_missing_splits_are_named(tmp_path):
    folder = tmp_path / "tofu"
    folder.mkdir()
    rows = [{"question": "q", "answer": "a"}, {"question": "q", "answer": None}]
    parquet.write_table(pyarrow.Table.from_pylist(rows), folder / "forget01.parquet")
    with pytest.raises(ValueError, match=r"forget01.parquet row 2: missing string field 'answer'"):
        load_split(folder, "forget01")
    with pytest.raises(FileNotFoundError, match=r"TOFU split retain99 not found in .*expected retain99.jsonl"):
        load_split(folder, "retain99")
    with pytest.raises(ValueError, match="unknown TOFU split 'forget1'"):
        load_split(folder, "forget1")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a Hugging Face dataset id"):
        load_split(tmp_path / "nowhere" / "tofu", "forget01")
    datasets.DatasetDict({"forget01": datasets.Dataset.from_list(SPLITS["forget01"])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match=r"has no split retain99 \(it has forget01\)"):
        load_split(tmp_path / "d", "retain99")


def test_hub_id_reads_the_config_named_like_the_split(monkeypatch):
    """A forget split comes from its forgetXX_perturbed config (same rows, plus the perturbed answers); the others
    from the config of the same name; always split "train"."""
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(SPLITS["forget01" if name.startswith("forget") else "retain_perturbed"])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_split("locuslab/TOFU", "forget01") == SPLITS["forget01"]
    expected_subset = select_examples(SPLITS["retain_perturbed"], 2, seed=0)
    assert len(expected_subset) == 2
    assert load_split("locuslab/TOFU", "retain_perturbed", max_examples=2) == expected_subset
    assert calls == [("locuslab/TOFU", "forget01_perturbed", "train"), ("locuslab/TOFU", "retain_perturbed", "train")]
    assert tofu_source.is_hub_id("locuslab/TOFU") and not tofu_source.is_hub_id("./tofu")


def test_hub_id_not_in_the_cache_is_a_clear_error(tmp_path):
    """Offline, with an empty cache: FileNotFoundError saying what is missing and how to fetch it (a fresh
    interpreter, so that datasets reads the offline variables and the empty cache at import)."""
    root = pathlib.Path(tofu_source.__file__).resolve().parents[2]
    env = dict(
        os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(root), str(root / "python")]),
    )  # fmt: skip
    code = (
        "from bs_unlearn.tofu_source import load_split\n"
        "try:\n    load_split('locuslab/TOFU', 'forget01')\n"
        "except FileNotFoundError as error:\n    print('ERROR', error)\n"
    )
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "ERROR locuslab/TOFU (config forget01_perturbed) is not in the local Hugging Face cache" in run.stdout, (
        run.stdout + run.stderr
    )
    assert "datasets.load_dataset('locuslab/TOFU', 'forget01_perturbed')" in run.stdout
