"""Build steps pyproject.toml cannot state: the C++ source in every wheel, and the native op ahead of time on request.

All metadata lives in pyproject.toml. The C++ kernel is csrc/bs_token_native.cpp (csrc/README.md); two ways to get
its compiled library:

- Just in time (the default): nothing is compiled here. ``build_py`` copies csrc/*.cpp into the package
  (bs_kernels/csrc/) so a wheel ships the source, and bs_kernels.backends.native_build compiles it at first use with
  torch.utils.cpp_extension and ninja (cached per source, flags and torch version). The build system needs only
  setuptools, so ``pip install .`` / ``pip install -e .`` never download torch into an isolated build environment.
  An editable install copies nothing: native_build.py reads the repository's csrc/ directly.
- Ahead of time: ``BS_KERNELS_BUILD_NATIVE=1 pip wheel --no-build-isolation --no-deps .`` (or ``pip install``)
  also compiles the kernel into the wheel as bs_kernels/_native_<key>.<abi>.so, with the flags of the
  just-in-time build, against the torch installed in this environment (hence ``--no-build-isolation``). native.py
  loads it instead of compiling when its key (source, flags, torch version and ABI, platform) is the running one,
  so compute nodes without a compiler can use impl="native". The wheel is then platform-specific.
"""

from __future__ import annotations

import os
import pathlib
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = pathlib.Path(__file__).resolve().parent
CSRC = "csrc"
BUILD_ENV = "BS_KERNELS_BUILD_NATIVE"


def _sources() -> list[str]:
    """The C++ files of csrc/, relative to this folder (setuptools wants relative paths)."""
    return sorted(path.relative_to(HERE).as_posix() for path in (HERE / CSRC).glob("*.cpp"))


class BuildPyWithSources(build_py):
    """build_py that also puts csrc/*.cpp into the package (bs_kernels/csrc/), where a regular install finds them."""

    def run(self) -> None:
        super().run()
        if self.editable_mode:  # an editable install reads the repository's csrc/ itself
            return
        target = pathlib.Path(self.build_lib) / "bs_kernels" / CSRC
        self.mkpath(str(target))
        for source in _sources():
            self.copy_file(source, str(target / pathlib.Path(source).name))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        target = pathlib.Path(self.build_lib) / "bs_kernels" / CSRC
        copies = [] if self.editable_mode else [str(target / pathlib.Path(s).name) for s in _sources()]
        return super().get_outputs(include_bytecode) + copies


class SdistWithSources(sdist):
    """sdist that also ships csrc/ (it is not package data until build_py copies it), so a wheel built from the
    sdist still has the source."""

    def make_release_tree(self, base_dir, files) -> None:
        extra = [path for path in (*_sources(), f"{CSRC}/README.md") if path not in files]
        super().make_release_tree(base_dir, [*files, *extra])


def _native_extension() -> dict:
    """With BS_KERNELS_BUILD_NATIVE=1: the CppExtension and BuildExtension of the ahead-of-time build."""
    if os.environ.get(BUILD_ENV, "0") in ("", "0"):
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError as error:
        raise RuntimeError(
            f"{BUILD_ENV}=1 compiles the native op against the installed torch, which this build cannot import "
            f"({error}). Install torch first and build with --no-build-isolation, e.g. "
            f"`{BUILD_ENV}=1 pip wheel --no-build-isolation --no-deps .`"
        ) from error
    sys.path.insert(0, str(HERE))  # the flags and the build key come from the package being built
    from bs_kernels.backends.native_build import CFLAGS, LDFLAGS, SOURCE_NAME, build_key, prebuilt_name

    key = build_key(HERE / CSRC / SOURCE_NAME)
    extension = CppExtension(
        name=f"bs_kernels.{prebuilt_name(key)}",
        sources=[f"{CSRC}/{SOURCE_NAME}"],
        # -g0: Python's own CFLAGS ask for debug information, which would make the library 15 times larger.
        extra_compile_args=["-std=c++20", *CFLAGS, "-g0"],
        extra_link_args=list(LDFLAGS),
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


native_build = _native_extension()
setup(
    cmdclass={"build_py": BuildPyWithSources, "sdist": SdistWithSources, **native_build.pop("cmdclass", {})},
    **native_build,
)
