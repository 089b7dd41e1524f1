"""Fine-tuned models built once and kept: the start model of a comparison (forget + retain facts) and its retain-only
reference, in a cache folder keyed by everything that determines them.

    key = model_key(model identity, training records, recipe)    sha256 of what determines the fine-tuned weights
    cached_model(cache, key, build)                              the folder cache/<key>, built by ``build`` if absent

The key hashes the base model's files (bytes, not their path), the training records as JSON (what the trainer reads,
whichever file or dataset they came from), the recipe (epochs, lr, batch size, the fine-tune's seed) and
``RECIPE_VERSION``, raised whenever the fine-tuning code changes what it produces. A folder is written under a staging
name owned by this process and renamed into place when complete (bs_unlearn.outputs.atomic_output_dir), so a killed
build leaves no half model under the key, and two runs never build into the same folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
from collections.abc import Callable, Sequence

from ..outputs import atomic_output_dir, is_own_output, write_json_atomic

# Raise when the fine-tuning recipe's code (finetune_stage, trainer.finetune) changes what a key's model would be.
# 2: chat prompts carry the evaluation's system prompt and date_string (data.TRAINING_PROMPT_FORMAT).
# 3: as open-unlearning trains: chat answers to their end (turn end, what follows, eos), no attention to pad ids.
RECIPE_VERSION = 3
MODEL_INFO = "bs-unlearn-model.json"


def default_cache_dir() -> pathlib.Path:
    """``$BS_UNLEARN_CACHE/models``, else ``$XDG_CACHE_HOME/bs_unlearn/models``, else ``~/.cache/bs_unlearn/models``."""
    from ..models import cache_dir

    return cache_dir() / "models"


def files_sha256(path: str | os.PathLike) -> str:
    """sha256 over a file's bytes, or over a folder's files (relative names and bytes, in sorted order)."""
    path = pathlib.Path(path).expanduser()
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for file in files:
        digest.update(str(file.relative_to(path) if file != path else file.name).encode() + b"\0")
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def records_sha256(records: Sequence[dict]) -> str:
    """sha256 of QA records as the trainer reads them (question and answer, in order)."""
    text = json.dumps([[r["question"], r["answer"]] for r in records], ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def model_key(model_sha256: str, records: Sequence[dict], recipe: dict) -> str:
    """The cache key of a fine-tuned model: its base model's files, its training records, the recipe."""
    what = {
        "model_sha256": model_sha256,
        "records_sha256": records_sha256(records),
        "recipe": recipe,
        "recipe_version": RECIPE_VERSION,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:32]


def cached_model(
    cache: str | os.PathLike,
    key: str,
    build: Callable[[pathlib.Path], None],
    *,
    info: dict | None = None,
    say: Callable[[str], None] = lambda message: None,
) -> tuple[pathlib.Path, bool]:
    """The model folder ``cache``/``key``; if absent, ``build(staging)`` saves the model into a staging folder that is
    renamed into place once complete (with ``info`` and the key in MODEL_INFO). Returns (folder, built now)."""
    folder = pathlib.Path(cache).expanduser() / key
    if (folder / MODEL_INFO).is_file():
        say(f"  cached model {folder}")
        return folder, False
    if folder.exists() and not is_own_output(folder):
        raise ValueError(f"--cache: {folder} exists and was not written by bs-unlearn; remove it or choose --cache")
    with atomic_output_dir(folder, overwrite=True) as staging:
        build(staging)
        write_json_atomic({"key": key, "recipe_version": RECIPE_VERSION, **(info or {})}, staging / MODEL_INFO)
    say(f"  saved model {folder}")
    return folder, True


def check_model_dir(path: str | os.PathLike, option: str) -> pathlib.Path:
    """A model folder given as ``option`` (--start, --retain-only): it must hold a config.json."""
    folder = pathlib.Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{option} {path}: no model there (expected a folder with config.json)")
    return folder
