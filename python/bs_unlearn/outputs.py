"""Output folders and files, shared by the library and the CLI: protection of the inputs, overwrite rules, atomic
writes.

Every output folder bs-unlearn creates holds a marker file (``OUTPUT_MARKER``); ``--overwrite`` replaces a folder
only when it carries that marker (or is empty), so it can never delete a folder the tool did not write. An output may
not be, or contain, the current directory or any input of the run (the model folder, the data files): replacing it
would delete them. Both are checked before any work starts.

Output directories are written under a hidden sibling ``.NAME.partial`` and renamed into place only when complete,
so an interrupted run leaves either a complete previous/new directory or none. Files are written the same way.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
from collections.abc import Iterable, Iterator

OUTPUT_MARKER = ".bs-unlearn-output"
_MARKER_TEXT = "Written by bs-unlearn. `--overwrite` replaces this folder (and only folders holding this file).\n"


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


def is_own_output(path: str | os.PathLike) -> bool:
    """True if ``path`` is a folder that bs-unlearn wrote (it holds the marker file)."""
    return (pathlib.Path(path) / OUTPUT_MARKER).is_file()


def mark_output_dir(path: str | os.PathLike) -> None:
    """Write the marker that lets a later ``--overwrite`` replace this folder."""
    (pathlib.Path(path) / OUTPUT_MARKER).write_text(_MARKER_TEXT, encoding="utf-8")


def _is_empty_dir(path: pathlib.Path) -> bool:
    return path.is_dir() and next(path.iterdir(), None) is None


def _check_not_an_input(output: pathlib.Path, shown: str | os.PathLike, inputs: Iterable[str | os.PathLike]) -> None:
    """Refuse an output that is, or lies above, the current directory or one of ``inputs``."""
    protected = [("the current directory", pathlib.Path.cwd())]
    protected += [(f"the input {path}", pathlib.Path(path).expanduser().resolve()) for path in inputs]
    for name, path in protected:
        if path == output or output in path.parents:
            relation = "is" if path == output else "contains"
            raise ValueError(
                f"output {shown} {relation} {name}; an output folder is written and replaced as a whole, so that "
                "would delete it: give a new folder, e.g. --output runs/NAME"
            )


def check_output_dir(
    path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()
) -> pathlib.Path:
    """The absolute output folder, after refusing what must not be written: a path that is a file; the current
    directory, an input (``inputs``: the model folder, data files) or a folder containing one; an existing folder
    without ``overwrite``; an existing, non-empty folder without the bs-unlearn marker (whatever ``overwrite``); a
    mount point (it cannot be renamed). Nothing is created here."""
    final = pathlib.Path(path).expanduser().resolve()
    if final.exists() and not final.is_dir():
        raise ValueError(f"output path exists and is not a directory: {path}")
    _check_not_an_input(final, path, inputs)
    if final.exists():
        if not overwrite:
            raise ValueError(f"output directory {path} already exists (pass --overwrite to replace it)")
        if not is_own_output(final) and not _is_empty_dir(final):
            raise ValueError(
                f"output directory {path} was not written by bs-unlearn (it has no {OUTPUT_MARKER} file), so "
                "--overwrite does not replace it; remove it yourself or choose another --output"
            )
        if os.path.ismount(final):
            raise ValueError(f"output directory {path} is a mount point, which cannot be replaced; use a folder in it")
    for sibling in (partial_dir_for(final), previous_dir_for(final)):
        if sibling.exists() and not is_own_output(sibling) and not _is_empty_dir(sibling):
            raise ValueError(
                f"{sibling} exists and was not written by bs-unlearn; remove it or choose another --output"
            )
    return final


def partial_dir_for(path: str | os.PathLike) -> pathlib.Path:
    """The staging folder of an output folder: a hidden sibling, named after the absolute path's last part (so that
    ``.`` or ``runs/x/`` give a real name)."""
    path = pathlib.Path(path).expanduser().resolve()
    return path.parent / f".{path.name}.partial"


def previous_dir_for(path: str | os.PathLike) -> pathlib.Path:
    """Where the replaced output folder is kept for the instant between the two renames of an overwrite."""
    path = pathlib.Path(path).expanduser().resolve()
    return path.parent / f".{path.name}.previous"


def remove_own_output_dir(path: str | os.PathLike) -> None:
    """Delete a folder bs-unlearn wrote (or an empty one); anything else raises ValueError and nothing is removed."""
    path = pathlib.Path(path)
    if not is_own_output(path) and not _is_empty_dir(path):
        raise ValueError(f"refusing to delete {path}: it was not written by bs-unlearn (no {OUTPUT_MARKER} file)")
    shutil.rmtree(path)


def prepare_output_dir(
    path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (), replace: bool = True
) -> pathlib.Path:
    """Check ``path`` (:func:`check_output_dir`), then create it, marked as bs-unlearn's. For commands that write
    their files straight into the folder as they go (``demo``, ``tofu``). ``replace``: an earlier output there is
    deleted first, else the new files are written into it."""
    final = check_output_dir(path, overwrite=overwrite, inputs=inputs)
    if final.exists() and replace:
        remove_own_output_dir(final)
    final.mkdir(parents=True, exist_ok=True)
    mark_output_dir(final)
    return final


def _move_into_place(staging: pathlib.Path, final: pathlib.Path, *, overwrite: bool, inputs: list) -> None:
    if not final.exists():
        os.replace(staging, final)
        return
    check_output_dir(final, overwrite=overwrite, inputs=inputs)  # still bs-unlearn's: nobody put files there meanwhile
    previous = previous_dir_for(final)
    if previous.exists():  # left by a run killed between the two renames below
        remove_own_output_dir(previous)
    os.replace(final, previous)
    try:
        os.replace(staging, final)
    except BaseException:
        os.replace(previous, final)
        raise
    shutil.rmtree(previous)


@contextlib.contextmanager
def atomic_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    main_process: bool = True,
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[pathlib.Path]:
    """Yield a staging directory; on normal exit it replaces ``path``; on any exception (Ctrl-C, SIGTERM under the
    CLI) it is removed. ``path`` is checked first (:func:`check_output_dir`, with ``inputs``).

    Only the main process creates, renames or deletes; other processes get the same staging path and must not
    write to it (the Trainer already saves on the main process only).
    """
    inputs = list(inputs)
    final = check_output_dir(path, overwrite=overwrite, inputs=inputs)
    staging = partial_dir_for(final)
    if main_process:
        if staging.exists():  # left by a killed run; check_output_dir made sure it is bs-unlearn's
            remove_own_output_dir(staging)
        staging.mkdir(parents=True)
        mark_output_dir(staging)
    try:
        yield staging
        if main_process:
            _move_into_place(staging, final, overwrite=overwrite, inputs=inputs)
    except BaseException:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise


def check_output_file(
    path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()
) -> pathlib.Path:
    """Refuse an output file that is a directory, exists without ``overwrite``, or is one of ``inputs``."""
    output = pathlib.Path(path).expanduser()
    if output.is_dir():
        raise ValueError(f"output path is a directory: {path}")
    for given in inputs:
        if pathlib.Path(given).expanduser().resolve() == output.resolve():
            raise ValueError(f"output {path} is the input {given}: writing it would destroy that input")
    if output.exists() and not overwrite:
        raise ValueError(f"output file {path} already exists (pass --overwrite to replace it)")
    return output


def write_json_atomic(data: object, path: str | os.PathLike, *, indent: int | None = 1) -> pathlib.Path:
    """Write ``data`` as JSON (UTF-8, non-ASCII kept) to ``path`` via a temporary sibling, creating parent folders."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
