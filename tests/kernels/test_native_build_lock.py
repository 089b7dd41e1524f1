"""A native build killed half-way, or one that takes too long, must never hang a later process (issue 15, defect 1);
a damaged cached library is rebuilt, never loaded (issue 26, item 11).

The builds here compile a one-line C++ file (a few seconds) or nothing at all: the killed builder's compiler is
replaced by a sleep that creates cpp_extension's "lock" file first, exactly what a real build leaves behind when it
is killed. Every process runs under a timeout, so a hang fails the test instead of stalling CI.
"""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys

import pytest
from conftest import REPO_ROOT

from bs_kernels.backends import native

pytestmark = pytest.mark.skipif(native.fcntl is None, reason="the build lock needs fcntl (POSIX)")

# Stands in for cpp_extension.load's build: takes cpp_extension's lock file the way FileBaton does, then "compiles"
# until it is killed. argv: build folder, source.
KILLED_BUILDER = """
import os, pathlib, sys, time
from torch.utils import cpp_extension
from bs_kernels.backends import native
def compile_forever(**kwargs):
    os.close(os.open(os.path.join(kwargs["build_directory"], "lock"), os.O_CREAT | os.O_EXCL))
    print("building", flush=True)
    time.sleep(600)
cpp_extension.load = compile_forever
native.build(pathlib.Path(sys.argv[2]), build_directory=pathlib.Path(sys.argv[1]))
"""

LATER_BUILD = """
import pathlib, sys
from bs_kernels.backends import native
print(native.build(pathlib.Path(sys.argv[2]), build_directory=pathlib.Path(sys.argv[1])))
"""

# Holds the build lock of this process's native-<key> folder (under $BS_KERNELS_CACHE) like a live, slow builder.
LIVE_BUILDER = """
import time
from bs_kernels.backends import native
folder = native.cache_root() / f"native-{native.build_key(native.SOURCE)}"
folder.mkdir(parents=True, exist_ok=True)
with native.build_lock(folder):
    print("building", flush=True)
    time.sleep(600)
"""

# Builds (or loads) the library with warnings recorded; prints each RuntimeWarning, then the library's path.
WARNED_BUILD = """
import pathlib, sys, warnings
from bs_kernels.backends import native
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    path = native.build(pathlib.Path(sys.argv[2]), build_directory=pathlib.Path(sys.argv[1]))
for warning in caught:
    if issubclass(warning.category, RuntimeWarning):
        print("warning:", warning.message)
print(path)
"""

FALLBACK_CALL = """
import warnings, torch, bs_kernels
logits, labels = torch.randn(2, 5, 11, dtype=torch.float64), torch.randint(0, 11, (2, 5))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    loss = bs_kernels.bs_token_loss(logits, labels)
assert bs_kernels.resolve_impl("auto", logits.device) == "torch"
torch.testing.assert_close(loss, bs_kernels.bs_token_loss(logits, labels, impl="reference"))
messages = [str(warning.message) for warning in caught if issubclass(warning.category, RuntimeWarning)]
assert len(messages) == 1 and "BS_KERNELS_BUILD_TIMEOUT" in messages[0], messages
try:
    bs_kernels.bs_token_loss(logits, labels, impl="native")
except RuntimeError as error:
    assert "another process (pid " in str(error), error
else:
    raise AssertionError('impl="native" ran although its build never finished')
print("fell back")
"""


def _environment(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _start(script: str, *args: str, env: dict[str, str]) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", script, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    first_line = process.stdout.readline()
    if first_line.strip() != "building":
        process.kill()
        raise AssertionError(f"the builder did not start: {first_line}{process.communicate()[1][-3000:]}")
    return process


def _run(script: str, *args: str, env: dict[str, str], timeout: float) -> str:
    try:
        completed = subprocess.run(
            [sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still waiting after {timeout} s: a dead or slow builder blocked this process")
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed.stdout


def test_a_killed_build_does_not_block_the_next(tmp_path):
    """SIGKILL (SIGTERM and an OOM kill end a build the same way: no cleanup runs)."""
    source = tmp_path / "probe.cpp"
    source.write_text("int bs_kernels_build_lock_probe() { return 1; }\n")
    folder = tmp_path / "native-probe"
    builder = _start(KILLED_BUILDER, str(folder), str(source), env=_environment())
    builder.send_signal(signal.SIGKILL)
    builder.communicate(timeout=60)
    assert (folder / "lock").exists(), "the killed build should have left cpp_extension's lock file behind"

    library = _run(LATER_BUILD, str(folder), str(source), env=_environment(), timeout=120).strip().splitlines()[-1]
    assert pathlib.Path(library).is_file()
    assert not (folder / "lock").exists()


@pytest.mark.skipif(native.prebuilt_library() is not None, reason="a prebuilt library is loaded without building")
def test_a_slow_build_elsewhere_times_out_and_auto_falls_back(tmp_path):
    env = _environment(BS_KERNELS_CACHE=str(tmp_path / "cache"), BS_KERNELS_BUILD_TIMEOUT="1")
    builder = _start(LIVE_BUILDER, env=env)
    try:
        assert _run(FALLBACK_CALL, env=env, timeout=120).strip().endswith("fell back")
    finally:
        builder.kill()
        builder.communicate()


@pytest.mark.parametrize("value", ["soon", "-1", "nan"])
def test_bad_build_timeout_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(native.BUILD_TIMEOUT_ENV, value)
    with pytest.raises(ValueError, match=native.BUILD_TIMEOUT_ENV):
        native.build_timeout_s()


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_a_damaged_cached_library_is_rebuilt(tmp_path, damage):
    """A library cut short made the loader die with SIGBUS (and an empty one blamed a missing compiler): the cache
    keeps its size and sha256 beside it, and a library that does not match is rebuilt, with one warning."""
    source = tmp_path / "probe.cpp"
    source.write_text("int bs_kernels_build_lock_probe() { return 1; }\n")
    folder = tmp_path / "native-probe"
    library = pathlib.Path(_run(LATER_BUILD, str(folder), str(source), env=_environment(), timeout=120).split()[-1])
    record = native.library_record(library)
    assert record.is_file(), "the build wrote no size/sha256 record beside the library"
    intact = library.read_bytes()
    library.write_bytes(intact[: len(intact) // 2] if damage == "truncated" else b"")

    lines = _run(WARNED_BUILD, str(folder), str(source), env=_environment(), timeout=120).strip().splitlines()
    warned = [line for line in lines if line.startswith("warning:")]
    assert len(warned) == 1 and "rebuilding" in warned[0] and str(library) in warned[0], lines
    assert pathlib.Path(lines[-1]) == library and native.library_problem(library) is None
    # The rebuilt library is loaded by the next process without a rebuild or a warning.
    lines = _run(WARNED_BUILD, str(folder), str(source), env=_environment(), timeout=120).strip().splitlines()
    assert lines == [str(library)], lines


def test_library_problem_names_what_differs(tmp_path):
    library = tmp_path / "bs_kernels_native.so"
    library.write_bytes(b"\x7fELF" + bytes(range(256)) * 8)
    assert "no readable size/sha256 record" in native.library_problem(library)
    native.write_library_record(library)
    assert native.library_problem(library) is None
    content = library.read_bytes()
    library.write_bytes(content[:100])
    assert native.library_problem(library) == f"it has 100 bytes where its build wrote {len(content)}"
    library.write_bytes(content[:-1] + b"x")
    assert native.library_problem(library) == "its sha256 differs from the one its build recorded"
    native.library_record(library).write_text("garbage")
    assert "no readable size/sha256 record" in native.library_problem(library)
