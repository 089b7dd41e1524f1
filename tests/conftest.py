"""Shared test configuration: one tolerance table, the impl axis, the TOFU data location."""

from __future__ import annotations

import os
import pathlib

import pytest
import torch

import bs_kernels

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
# The TOFU JSONL folder: $BS_TOFU_DIR, else the shared/ folder beside the repository (where this project keeps it).
TOFU_DIR_VARIABLE = "BS_TOFU_DIR"
TOFU_DIR = pathlib.Path(os.environ.get(TOFU_DIR_VARIABLE) or REPO_ROOT.parent / "shared" / "data" / "tofu").expanduser()

# Maximum absolute error against the float64 reference, for values and for gradients, keyed by input dtype.
# For bf16/fp16 the budget is relative to the eager same-dtype error (see test_error_budget_low_precision).
TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=2e-5, rtol=2e-5),  # slack added on top of the eager bf16 error
    torch.float16: dict(atol=2e-5, rtol=2e-5),
}

# Every kernel impl runs the same parametrisation; one that cannot run here is skipped with its reason.
KERNEL_IMPLS = ("torch", "native", "triton")


def impl_param(name: str):
    reason = bs_kernels.unavailable_reason(name, torch.device("cpu"))
    marks = [pytest.mark.skip(reason=reason)] if reason else []
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(params=[impl_param(name) for name in KERNEL_IMPLS])
def impl(request) -> str:
    return request.param


@pytest.fixture
def tofu_dir() -> pathlib.Path:
    if not (TOFU_DIR / "forget01.jsonl").is_file():
        pytest.skip(
            f"TOFU data not found at {TOFU_DIR}: set {TOFU_DIR_VARIABLE} to a folder holding forget01.jsonl etc."
        )
    return TOFU_DIR


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_report_header(config):
    return f"torch {torch.__version__}; TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}"
