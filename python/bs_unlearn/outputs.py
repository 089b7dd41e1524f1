"""Output folders and files, shared by the library and the CLI: overwrite protection and atomic writes.

Output directories are written under a hidden sibling ``.NAME.partial`` and renamed into place only when complete,
so an interrupted run leaves either a complete previous/new directory or none. Files are written the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterator


def is_main_process() -> bool:
    """True on the process that writes outputs (rank 0 under torchrun / accelerate launch, or a single process)."""
    return int(os.environ.get("RANK", "0")) == 0


def check_readable_file(path: str | os.PathLike, what: str) -> pathlib.Path:
    """The path if it is a readable file, else FileNotFoundError/ValueError naming ``what``."""
    path = pathlib.Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{what} file not found: {path}")
    if not path.is_file():
        raise ValueError(f"{what} path is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{what} file is not readable: {path}")
    return path


def check_output_dir(path: str | os.PathLike, *, overwrite: bool) -> pathlib.Path:
    """Refuse an output path that exists (unless ``overwrite``) or is a file; nothing is created here."""
    path = pathlib.Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"output path exists and is not a directory: {path}")
    if path.exists() and not overwrite:
        raise ValueError(f"output directory {path} already exists (pass --overwrite to replace it)")
    return path


def partial_dir_for(path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(path).expanduser()
    return path.parent / f".{path.name}.partial"


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool, main_process: bool = True) -> Iterator[pathlib.Path]:
    """Yield a staging directory; on normal exit it replaces ``path``; on any exception (Ctrl-C too) it is removed.

    Only the main process creates, renames or deletes; other processes get the same staging path and must not
    write to it (the Trainer already saves on the main process only).
    """
    final = check_output_dir(path, overwrite=overwrite)
    staging = partial_dir_for(final)
    if main_process:
        if staging.exists():
            shutil.rmtree(staging)
        staging.mkdir(parents=True)
    try:
        yield staging
    except BaseException:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    if main_process:
        if final.exists():
            check_output_dir(final, overwrite=overwrite)
            previous = final.parent / f".{final.name}.previous"
            shutil.rmtree(previous, ignore_errors=True)
            os.replace(final, previous)
            os.replace(staging, final)
            shutil.rmtree(previous, ignore_errors=True)
        else:
            os.replace(staging, final)


def write_json_atomic(data: object, path: str | os.PathLike, *, indent: int | None = 1) -> pathlib.Path:
    """Write ``data`` as JSON (UTF-8, non-ASCII kept) to ``path`` via a temporary sibling, creating parent folders."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return path
