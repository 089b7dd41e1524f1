"""experiment.model_cache: keys that change with what determines a model, a build kept once, a killed build leaving
nothing under its key."""

from __future__ import annotations

import pytest
from bs_unlearn.experiment.model_cache import MODEL_INFO, cached_model, files_sha256, model_key

RECORDS = [{"question": "Q1?", "answer": "A1."}, {"question": "Q2?", "answer": "A2."}]
RECIPE = {"epochs": 4.0, "lr": 1e-4, "batch_size": 8, "seed": 0}


def test_key_changes_with_model_records_and_recipe(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "w.bin").write_bytes(b"weights")
    sha = files_sha256(tmp_path / "m")
    key = model_key(sha, RECORDS, RECIPE)
    assert key == model_key(sha, [dict(r, extra="ignored") for r in RECORDS], dict(RECIPE))  # what the trainer reads
    (tmp_path / "m" / "w.bin").write_bytes(b"weightz")
    assert model_key(files_sha256(tmp_path / "m"), RECORDS, RECIPE) != key
    assert model_key(sha, RECORDS[::-1], RECIPE) != key
    assert model_key(sha, RECORDS[:1], RECIPE) != key
    assert model_key(sha, RECORDS, {**RECIPE, "seed": 1}) != key
    assert model_key(sha, RECORDS, {**RECIPE, "epochs": 5.0}) != key


def test_built_once_and_a_killed_build_leaves_nothing(tmp_path):
    calls = []

    def build(staging):
        calls.append(staging)
        (staging / "config.json").write_text("{}")

    def killed(staging):
        (staging / "config.json").write_text("{}")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_model(tmp_path / "cache", "k", killed)
    assert not (tmp_path / "cache" / "k").exists()
    assert [p.name for p in (tmp_path / "cache").iterdir()] == []  # no staging folder left either
    folder, built = cached_model(tmp_path / "cache", "k", build, info={"role": "start"})
    assert built and (folder / "config.json").is_file() and (folder / MODEL_INFO).is_file()
    assert cached_model(tmp_path / "cache", "k", build) == (folder, False) and len(calls) == 1


def test_a_foreign_folder_under_the_key_is_refused(tmp_path):
    (tmp_path / "cache" / "k").mkdir(parents=True)
    (tmp_path / "cache" / "k" / "mine.txt").write_text("not bs-unlearn's")
    with pytest.raises(ValueError, match="not written by bs-unlearn"):
        cached_model(tmp_path / "cache", "k", lambda staging: None)
