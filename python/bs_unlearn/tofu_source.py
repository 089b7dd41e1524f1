"""TOFU where users keep it: this project's folder of JSON Lines files, a local dataset folder, or the Hugging Face
dataset ``locuslab/TOFU`` read from the local cache.

    records = load_split("locuslab/TOFU", "forget01")         # the HF dataset, offline, from the local cache
    records = load_split("~/data/tofu", "retain_perturbed")    # NAME.jsonl / NAME.json / NAME.parquet / NAME/...

Split names are the Hugging Face dataset's config names: ``full``, ``forget01`` / ``forget05`` / ``forget10``,
``retain90`` / ``retain95`` / ``retain99``, ``holdout01`` / ``holdout05`` / ``holdout10``, ``retain_perturbed``,
``real_authors`` / ``real_authors_perturbed``, ``world_facts`` / ``world_facts_perturbed`` (and the HF-only
``forgetXX_perturbed``). A forget split is read, on the hub, from its ``forgetXX_perturbed`` config: the same rows in
the same order plus the paraphrased and perturbed answers that the truth ratio needs, which the JSON Lines files of a
forget split carry too.

Every loader returns what :func:`bs_unlearn.data.read_qa_records` returns for a JSON Lines file: a list of dicts, each
checked (string ``question`` and ``answer``, valid text), a bad record named by its source and row, and the same
seeded ``max_examples`` subset.

A local folder may hold, for a split NAME: ``NAME.jsonl``; ``NAME.json`` (JSON Lines, or one JSON array);
``NAME.parquet``; a folder ``NAME/`` of parquet / JSON files (a snapshot of the hub repository, e.g.
``NAME/train-00000-of-00001.parquet``) or written by ``datasets``' ``save_to_disk`` (a Dataset, or a DatasetDict whose
``train`` split is read); or the folder itself may be a ``save_to_disk`` DatasetDict with one entry per split name.
Nothing is downloaded: a dataset id that is not in the local Hugging Face cache is an error saying how to fetch it.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

from .data import check_qa_record, check_scored_fields_shared, read_qa_records, select_examples

TOFU_HF_ID = "locuslab/TOFU"

# The configs of the locuslab/TOFU dataset (its split names).
SPLITS = frozenset(
    {
        "full",
        "forget01",
        "forget05",
        "forget10",
        "retain90",
        "retain95",
        "retain99",
        "holdout01",
        "holdout05",
        "holdout10",
        "forget01_perturbed",
        "forget05_perturbed",
        "forget10_perturbed",
        "retain_perturbed",
        "real_authors",
        "real_authors_perturbed",
        "world_facts",
        "world_facts_perturbed",
    }  # fmt: skip
)
# A hub id: owner/name, letters, digits, "-", "_", "." (what the hub accepts), and not an existing path.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def hub_config(name: str) -> str:
    """The config of ``locuslab/TOFU`` that holds split ``name`` as this project's JSON Lines file holds it."""
    return f"{name}_perturbed" if re.fullmatch(r"forget\d\d", name) else name


def is_hub_id(source: str | os.PathLike) -> bool:
    """True when ``source`` names a Hugging Face dataset (``owner/name``) rather than a local folder."""
    text = str(source)
    return bool(_HUB_ID.match(text)) and not pathlib.Path(text).expanduser().exists()


def load_split(source: str | os.PathLike, name: str, *, max_examples: int | None = None, seed: int = 0) -> list[dict]:
    """The records of TOFU split ``name`` (a config name of ``locuslab/TOFU``) from ``source``: a Hugging Face
    dataset id, read offline from the local cache, or a local folder (see the module doc). ``max_examples`` keeps a
    seeded subset, as :func:`bs_unlearn.data.read_qa_records` does."""
    if not isinstance(name, str) or name not in SPLITS:
        raise ValueError(f"unknown TOFU split {name!r}; the splits are {', '.join(sorted(SPLITS))}")
    if is_hub_id(source):
        rows, where = _hub_rows(str(source), name), f"{source} ({hub_config(name)})"
    else:
        folder = pathlib.Path(source).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"TOFU source {source} is neither a folder nor a Hugging Face dataset id (like {TOFU_HF_ID})"
            )
        jsonl = folder / f"{name}.jsonl"
        if jsonl.is_file():  # this project's layout: read with its line numbers
            return read_qa_records(jsonl, max_examples=max_examples, seed=seed)
        rows, where = _folder_rows(folder, name)
    places = [f"{where} row {index}" for index in range(1, len(rows) + 1)]
    records = [check_qa_record(row, place) for row, place in zip(rows, places)]
    if not records:
        raise ValueError(f"TOFU split {name} from {where} has no examples")
    check_scored_fields_shared(records, places)
    return select_examples(records, max_examples, seed=seed)


def _folder_rows(folder: pathlib.Path, name: str) -> tuple[list, str]:
    """The rows of split ``name`` in a local folder and where they came from (for error messages)."""
    if (folder / "dataset_dict.json").is_file():  # save_to_disk of a DatasetDict keyed by split name
        saved = _load_from_disk(folder)
        if name not in saved:
            raise FileNotFoundError(f"TOFU dataset {folder} has no split {name} (it has {', '.join(sorted(saved))})")
        return saved[name].to_list(), f"{folder} [{name}]"
    for file in (folder / f"{name}.json", folder / f"{name}.parquet"):
        if file.is_file():
            return _file_rows(file), str(file)
    split_dir = folder / name
    if split_dir.is_dir():
        if (split_dir / "dataset_dict.json").is_file() or (split_dir / "state.json").is_file():
            saved = _load_from_disk(split_dir)
            if (split_dir / "dataset_dict.json").is_file():  # a DatasetDict: the config's one split, "train" on the hub
                if "train" not in saved and len(saved) != 1:
                    raise ValueError(f"{split_dir} holds the splits {sorted(saved)}; expected train (or one split)")
                saved = saved["train"] if "train" in saved else next(iter(saved.values()))
            return saved.to_list(), str(split_dir)
        files = sorted(f for f in split_dir.rglob("*") if f.suffix in (".parquet", ".json", ".jsonl") and f.is_file())
        if files:
            return [row for file in files for row in _file_rows(file)], str(split_dir)
    raise FileNotFoundError(
        f"TOFU split {name} not found in {folder}: expected {name}.jsonl, {name}.json, {name}.parquet or a folder "
        f"{name}/ (parquet / JSON files, or written by datasets' save_to_disk)"
    )


def _file_rows(file: pathlib.Path) -> list:
    if file.suffix == ".parquet":
        try:
            import pyarrow.parquet as parquet
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError("reading parquet needs pyarrow", name="pyarrow") from error
        try:
            return parquet.read_table(file).to_pylist()
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError
            raise ValueError(f"cannot read parquet file {file}: {error}") from error
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"cannot read {file}: {error}") from error
    if file.suffix == ".jsonl" or not text.lstrip().startswith("["):
        return read_qa_records(file)  # JSON Lines (the hub's NAME.json files are JSON Lines too)
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON ({error.msg} at line {error.lineno})") from error
    return rows


def _load_from_disk(folder: pathlib.Path):
    import datasets

    try:
        return datasets.load_from_disk(str(folder))
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot read the dataset saved in {folder}: {error}") from error


def _hub_rows(dataset_id: str, name: str) -> list:
    """Split ``name`` of a hub dataset through ``datasets``, offline: only what the local cache holds."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    config = hub_config(name)
    try:
        loaded = datasets.load_dataset(dataset_id, config, split="train")
    except (OSError, ValueError) as error:  # ConnectionError and FileNotFoundError are OSErrors
        raise FileNotFoundError(
            f"{dataset_id} (config {config}) is not in the local Hugging Face cache "
            f"({datasets.config.HF_DATASETS_CACHE}) and nothing is downloaded here; fetch it once where the network "
            "is reachable, e.g. python -c "
            f"\"import datasets; datasets.load_dataset('{dataset_id}', '{config}')\", or pass a local folder"
        ) from error
    return loaded.to_list()
