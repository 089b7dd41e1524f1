"""Setuptools shim; all metadata lives in pyproject.toml.

The C++ kernel in csrc/ is not built here: bs_kernels.backends.native compiles it just in time with
torch.utils.cpp_extension and ninja at first use (cached per torch version), so `pip install -e .` works on machines
without a compiler and never needs torch inside an isolated build environment.
"""

from setuptools import setup

setup()
