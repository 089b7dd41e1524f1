"""How impl="native" gets its library in each kind of install (csrc/README.md).

- source tree / editable install: the source is the repository's csrc/, built just in time;
- regular wheel (``pip wheel .``): the source ships inside the package, built just in time from there;
- ahead-of-time wheel (``BS_KERNELS_BUILD_NATIVE=1 pip wheel --no-build-isolation .``): the compiled library ships
  too and is loaded without compiling anything.
Each wheel is built from a copy of the source tree in tmp_path, extracted into a folder (what ``pip install
--target`` does without dependencies) and used from a fresh interpreter with an empty build cache. The regular
wheel's just-in-time build reuses the build cache (same source bytes, same key); the ahead-of-time test compiles
(15-20 s of one core) and is opt-in (BS_KERNELS_TEST_AOT=1) so that CI does not pay for a second compile.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest
import torch
from conftest import REPO_ROOT

import bs_kernels
from bs_kernels.backends import native, native_build

NATIVE_REASON = native.unavailable_reason(torch.device("cpu"))
needs_native = pytest.mark.skipif(NATIVE_REASON is not None, reason=str(NATIVE_REASON))


def _setuptools_reason() -> str | None:
    """--no-build-isolation builds with this environment's setuptools, which must be one pyproject.toml accepts."""
    if importlib.util.find_spec("setuptools") is None:
        return "building a wheel with --no-build-isolation needs setuptools in this environment"
    import setuptools

    if int(setuptools.__version__.split(".")[0]) < 77:
        return f"building a wheel needs setuptools >= 77 (see pyproject.toml), not {setuptools.__version__}"
    return None


needs_wheel_build = pytest.mark.skipif(_setuptools_reason() is not None, reason=str(_setuptools_reason()))
CPP_NAME = f"bs_kernels/csrc/{native_build.SOURCE_NAME}"

# Run in a fresh interpreter with the extracted wheel first on sys.path: the package, its source and the library
# it loads must all come from there. argv: site folder, "prebuilt" or "jit".
CHECK_SCRIPT = """
import pathlib, sys
site, mode = pathlib.Path(sys.argv[1]).resolve(), sys.argv[2]
sys.path.insert(0, str(site))
import torch
from torch.utils import cpp_extension
if mode == "prebuilt":
    def refuse(*args, **kwargs):
        raise AssertionError("a just-in-time build was started although the wheel holds a prebuilt library")
    cpp_extension.load = refuse
import bs_kernels
from bs_kernels.backends import native, native_build
assert pathlib.Path(bs_kernels.__file__).is_relative_to(site), bs_kernels.__file__
assert native_build.SOURCE.is_relative_to(site), native_build.SOURCE
assert (native_build.prebuilt_library() is not None) == (mode == "prebuilt"), native_build.prebuilt_library()
reason = native.unavailable_reason(torch.device("cpu"))
assert reason is None, reason
logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
labels = torch.randint(0, 11, (2, 5))
loss = bs_kernels.bs_token_loss(logits, labels, impl="native")
(grad,) = torch.autograd.grad(loss, logits)
expected = bs_kernels.bs_token_loss(logits, labels, impl="reference")
torch.testing.assert_close(loss, expected)
torch.testing.assert_close(grad, torch.autograd.grad(expected, logits)[0])
print(native._library_path)
"""


def _source_copy(tmp_path: pathlib.Path) -> pathlib.Path:
    """What a clean checkout holds for a build: the package, csrc/, setup.py, pyproject.toml and the files it names."""
    tree = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for name in ("bs_kernels", "csrc"):
        shutil.copytree(REPO_ROOT / name, tree / name, ignore=ignore)
    for name in ("setup.py", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO_ROOT / name, tree / name)
    return tree


def _build_wheel(tree: pathlib.Path, out: pathlib.Path, *, ahead_of_time: bool) -> pathlib.Path:
    env = {key: value for key, value in os.environ.items() if key != native_build.BUILD_ENV}
    if ahead_of_time:
        env[native_build.BUILD_ENV] = "1"
    command = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--no-index", "-q"]
    completed = subprocess.run(
        [*command, "-w", str(out), str(tree)], env=env, cwd=tree, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return wheel


def _run_from(wheel: pathlib.Path, tmp_path: pathlib.Path, mode: str, cache: pathlib.Path | None = None) -> str:
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if cache is not None:
        env[native_build.CACHE_ENV] = str(cache)
    completed = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, str(site), mode],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    library = completed.stdout.strip().splitlines()[-1]
    assert pathlib.Path(library).resolve().is_relative_to(site.resolve()) == (mode == "prebuilt"), library
    return library


def test_source_tree_uses_the_repository_csrc():
    if not pathlib.Path(bs_kernels.__file__).resolve().is_relative_to(REPO_ROOT):
        pytest.skip(f"bs_kernels is imported from {bs_kernels.__file__}, not from this source tree")
    assert native_build.SOURCE == REPO_ROOT / "csrc" / native_build.SOURCE_NAME
    assert not (REPO_ROOT / CPP_NAME).exists(), "the C++ source lives in csrc/ only; bs_kernels/csrc/ is a build copy"
    assert native_build.prebuilt_library() is None


@needs_native
@needs_wheel_build
def test_regular_wheel_ships_the_source_and_builds_it_just_in_time(tmp_path):
    wheel = _build_wheel(_source_copy(tmp_path), tmp_path / "wheel", ahead_of_time=False)
    assert wheel.name.endswith("-py3-none-any.whl"), wheel.name
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert archive.read(CPP_NAME) == native_build.SOURCE.read_bytes()
    assert not [name for name in names if name.endswith(".so")], names
    # The wheel's copy of the source is found and keyed like the tree's (same bytes, same build key), so the
    # library comes from this process's build cache, which the other native tests fill: a second 15-20 s compile
    # would test the compiler, not the wheel. The ahead-of-time test below does compile from a wheel.
    library = _run_from(wheel, tmp_path, "jit")
    assert pathlib.Path(library).resolve().is_relative_to(native_build.cache_root().resolve()), library


@needs_native
@needs_wheel_build
@pytest.mark.skipif(
    os.environ.get("BS_KERNELS_TEST_AOT") != "1",
    reason="opt-in (a second compile, about 20 s): BS_KERNELS_TEST_AOT=1 pytest tests/kernels/test_build.py",
)
def test_ahead_of_time_wheel_runs_without_compiling(tmp_path):
    wheel = _build_wheel(_source_copy(tmp_path), tmp_path / "wheel", ahead_of_time=True)
    assert "-none-any" not in wheel.name, f"a wheel with a compiled library must be platform-specific: {wheel.name}"
    prebuilt = f"bs_kernels/{native_build.prebuilt_name(native_build.build_key(native_build.SOURCE))}"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        assert archive.read(CPP_NAME) == native_build.SOURCE.read_bytes()
    assert [name for name in names if name.startswith(prebuilt) and name.endswith(".so")], names
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    _run_from(wheel, tmp_path, "prebuilt", cache=cache)
    assert not any(cache.iterdir()), "the prebuilt library was not used: something was built into the cache"
