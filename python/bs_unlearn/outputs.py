"""Output folders and files, shared by the library and the CLI: protection of the inputs, overwrite rules, atomic
writes.

Every output folder bs-unlearn creates holds a marker file (``OUTPUT_MARKER``); ``--overwrite`` replaces a folder
only when it carries that marker (or is empty), so it can never delete a folder the tool did not write. An output may
not be, or contain, the current directory or any input of the run (the model folder, the data files): replacing it
would delete them. Both are checked before any work starts.

Output directories are written under a hidden sibling ``.NAME.partial`` and renamed into place only when complete,
so an interrupted run leaves either a complete previous/new directory or none. Files are written the same way.

A staging folder, like the per-run scratch folder in the system temp folder (``scratch_dir``), carries its owner: a
file naming the process (pid, host, start time) that the process holds an exclusive ``flock`` on while it works. The
operating system releases that lock when the process ends, however it ends (SIGKILL included), so a later run can
tell a dead run's leftover, which it removes, from a live run's folder, which it never touches.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import pathlib
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator

try:
    import fcntl
except ImportError:  # Windows: ownership falls back to "same host and the pid still runs"
    fcntl = None

OUTPUT_MARKER = ".bs-unlearn-output"
OWNER_FILE = ".bs-unlearn-owner"
SCRATCH_PREFIX = "bs-unlearn-"
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


# Longest file name (bytes) of the common file systems (ext4, xfs, btrfs, APFS, NTFS in UTF-16 units).
_NAME_MAX = 255


def _owner_record() -> dict:
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": started}


def _claim(folder: pathlib.Path):
    """Write ``folder``'s owner file and lock it; the returned open file holds the claim until it is closed (or the
    process dies). ``folder`` must be new to this process, so nobody else holds the lock."""
    handle = open(folder / OWNER_FILE, "w", encoding="utf-8")  # noqa: SIM115  (kept open: it is the claim)
    try:
        if fcntl is not None:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        handle.write(json.dumps(_owner_record()) + "\n")
        handle.flush()
    except BaseException:
        handle.close()
        raise
    return handle


def _pid_runs(pid: object) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def _lock_unless_owned(folder: pathlib.Path):
    """``(handle, None)`` when no live process owns ``folder``: ``handle`` (None if there is no owner file) holds
    the dead owner's lock until closed, so that no other run takes the folder over meanwhile. ``(None, record)``
    when a live process owns it (``record``: its pid, host and start time, as far as readable)."""
    try:
        handle = open(folder / OWNER_FILE, encoding="utf-8")  # noqa: SIM115  (returned: it holds the lock)
    except FileNotFoundError:
        return None, None
    except OSError:  # unreadable: another user's, so not ours to judge
        return None, {}
    try:
        record = json.loads(handle.read() or "{}")
    except (UnicodeDecodeError, json.JSONDecodeError):
        record = {}
    record = record if isinstance(record, dict) else {}
    if fcntl is None:
        alive = record.get("host") == socket.gethostname() and _pid_runs(record.get("pid"))
    else:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            alive = False
        except OSError:  # held: its owner (or a run cleaning it up) is alive
            alive = True
    if alive:
        handle.close()
        return None, record
    return handle, None


def _owner_text(record: dict) -> str:
    parts = [f"pid {record['pid']}" if "pid" in record else "", f"on {record['host']}" if "host" in record else ""]
    started = f", started {record['started']}" if "started" in record else ""
    return (" ".join(part for part in parts if part) or "owner unknown") + started


def remove_dead_scratch_dirs(root: str | os.PathLike | None = None) -> list[pathlib.Path]:
    """Remove the ``bs-unlearn-*`` scratch folders in ``root`` (default: the system temp folder) whose owner process
    has died (a SIGKILLed run cannot clean up after itself); returns them. A live process's folder, another user's,
    or one without an owner file (written by an older version, or being set up this instant) is left alone."""
    root = pathlib.Path(tempfile.gettempdir() if root is None else root)
    removed = []
    for folder in sorted(root.glob(f"{SCRATCH_PREFIX}*")):
        try:
            if folder.is_symlink() or not folder.is_dir():
                continue
            if hasattr(os, "getuid") and folder.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        handle, owner = _lock_unless_owned(folder)
        if handle is None:  # live, or no owner file
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        finally:
            handle.close()
    return removed


@contextlib.contextmanager
def scratch_dir() -> Iterator[pathlib.Path]:
    """A new folder in the system temp folder, owned by this process (see the module doc) and removed on exit.
    Dead runs' scratch folders are removed first (:func:`remove_dead_scratch_dirs`)."""
    remove_dead_scratch_dirs()
    folder = pathlib.Path(tempfile.mkdtemp(prefix=SCRATCH_PREFIX))
    try:
        claim = _claim(folder)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        claim.close()


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


def _check_can_create(output: pathlib.Path, shown: str | os.PathLike) -> None:
    """Refuse, before any work, an output that cannot be created: a name longer than file systems allow, or a
    nearest existing parent that is a file or not writable (the run would fail only when it saves)."""
    if len(os.fsencode(output.name)) > _NAME_MAX:
        raise ValueError(
            f"output name {output.name[:40]}... is {len(os.fsencode(output.name))} bytes long; file systems allow at "
            f"most {_NAME_MAX}: choose a shorter --output"
        )
    ancestor = output.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ValueError(f"cannot create output {shown}: {ancestor} is a file, not a folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create output {shown}: {ancestor} is not writable")


def _check_staging_free(staging: pathlib.Path, shown: str | os.PathLike) -> None:
    handle, owner = _lock_unless_owned(staging)
    if handle is not None:
        handle.close()
    if owner is not None:
        raise ValueError(
            f"output {shown} is being written by another run ({_owner_text(owner)}; its staging folder is "
            f"{staging}): wait for it to finish or choose another --output"
        )


def check_output_dir(
    path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()
) -> pathlib.Path:
    """The absolute output folder, after refusing what must not be written: a path that is a file; a path that
    cannot be created (a name over 255 bytes, a parent that is a file or not writable); the current directory, an
    input (``inputs``: the model folder, data files) or a folder containing one; an existing folder without
    ``overwrite``; an existing, non-empty folder without the bs-unlearn marker (whatever ``overwrite``); a mount
    point (it cannot be renamed); an output another live run is writing (its staging folder is owned). Nothing is
    created here.

    Only the main process checks the staging folder's owner: under torchrun the other ranks may check after rank 0
    has created the job's own staging folder (if another run owns it, rank 0 stops the job)."""
    return _check_output_dir(path, overwrite=overwrite, inputs=inputs, check_owner=is_main_process())


def _check_output_dir(
    path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike], check_owner: bool
) -> pathlib.Path:
    final = pathlib.Path(path).expanduser().resolve()
    _check_can_create(final, path)
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
    if check_owner:
        _check_staging_free(partial_dir_for(final), path)
    return final


def _hidden_sibling(path: str | os.PathLike, suffix: str) -> pathlib.Path:
    """``.NAME<suffix>`` next to the absolute path; a NAME too long for that is cut and given a hash of the whole
    name, so the sibling still fits a file name and stays one per output."""
    path = pathlib.Path(path).expanduser().resolve()
    name = f".{path.name}{suffix}"
    if len(os.fsencode(name)) > _NAME_MAX:
        digest = hashlib.sha256(os.fsencode(path.name)).hexdigest()[:16]
        room = _NAME_MAX - len(os.fsencode(f".~{digest}{suffix}"))
        kept = os.fsencode(path.name)[:room].decode("utf-8", errors="ignore")
        name = f".{kept}~{digest}{suffix}"
    return path.parent / name


def partial_dir_for(path: str | os.PathLike) -> pathlib.Path:
    """The staging folder of an output folder: a hidden sibling, named after the absolute path's last part (so that
    ``.`` or ``runs/x/`` give a real name; a name near 255 bytes is shortened, see :func:`_hidden_sibling`)."""
    return _hidden_sibling(path, ".partial")


def previous_dir_for(path: str | os.PathLike) -> pathlib.Path:
    """Where the replaced output folder is kept for the instant between the two renames of an overwrite."""
    return _hidden_sibling(path, ".previous")


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
    # Still bs-unlearn's: nobody put files there meanwhile.
    _check_output_dir(final, overwrite=overwrite, inputs=inputs, check_owner=False)  # the staging folder is ours
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


def _create_staging(staging: pathlib.Path, shown: str | os.PathLike):
    """Create ``staging`` already claimed by this process (returns the claim): the folder is built under a unique
    name and renamed into place, so no other run ever sees it unowned. A dead run's leftover there is removed
    while its lock is held; a live run's is refused."""
    handle, owner = _lock_unless_owned(staging) if staging.exists() else (None, None)
    try:
        if owner is not None:
            raise ValueError(
                f"output {shown} is being written by another run ({_owner_text(owner)}): wait for it to finish or "
                "choose another --output"
            )
        if staging.exists():  # a dead run's leftover; check_output_dir made sure it is bs-unlearn's
            remove_own_output_dir(staging)
        staging.parent.mkdir(parents=True, exist_ok=True)
        fresh = pathlib.Path(tempfile.mkdtemp(prefix=".bs-unlearn-new-", dir=staging.parent))
        claim = None
        try:
            mark_output_dir(fresh)
            claim = _claim(fresh)
            os.rename(fresh, staging)  # fails if another run's staging appeared meanwhile
        except BaseException as error:
            shutil.rmtree(fresh, ignore_errors=True)
            if claim is not None:
                claim.close()
            if isinstance(error, OSError) and staging.exists():
                raise ValueError(
                    f"output {shown} is being written by another run that started meanwhile; choose another --output"
                ) from error
            raise
        return claim
    finally:
        if handle is not None:
            handle.close()


@contextlib.contextmanager
def atomic_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool,
    main_process: bool = True,
    inputs: Iterable[str | os.PathLike] = (),
) -> Iterator[pathlib.Path]:
    """Yield a staging directory; on normal exit it replaces ``path``; on any exception (Ctrl-C, SIGTERM under the
    CLI) it is removed. ``path`` is checked first (:func:`check_output_dir`, with ``inputs``). The staging folder
    is owned by this process while it exists (see the module doc): a dead run's leftover there is removed, a live
    run's makes this one stop with ValueError before any work.

    Only the main process creates, renames or deletes; other processes get the same staging path and must not
    write to it (the Trainer already saves on the main process only).
    """
    inputs = list(inputs)
    final = check_output_dir(path, overwrite=overwrite, inputs=inputs)
    staging = partial_dir_for(final)
    claim = _create_staging(staging, path) if main_process else None
    try:
        yield staging
        if main_process:
            _move_into_place(staging, final, overwrite=overwrite, inputs=inputs)
            (final / OWNER_FILE).unlink(missing_ok=True)
    except BaseException:
        if main_process:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if claim is not None:
            claim.close()


def check_output_file(
    path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()
) -> pathlib.Path:
    """Refuse an output file that is a directory, cannot be created (a name over 255 bytes, a parent that is a file
    or not writable), exists without ``overwrite``, or is one of ``inputs``. Commands call this before any work,
    so a bad path never costs a computed result."""
    output = pathlib.Path(path).expanduser()
    _check_can_create(output.resolve(), path)
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
    partial = _hidden_sibling(path, ".partial")
    try:
        partial.write_text(json.dumps(data, indent=indent, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path
