"""impl="triton" compiled for sm_80 and sm_90 without a GPU: every kernel variant the launcher can pick compiles with
Triton's bundled ptxas, without spills, with 16-byte loads on its loops over the vocabulary, no block barrier in the
per-lane loops, and within the register counts the launcher's bytes-in-flight model assumes.

The variants come from benchmarks/triton_cost.py (launcher_launches: each forward path at the k that change its
code, the backward); no data replay here, so the test takes only the compile time (a few seconds per kernel).
"""

from __future__ import annotations

import importlib
import os
import pathlib
import sys

import pytest
import torch

TESTS_DIR = pathlib.Path(__file__).resolve().parent
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"

pytestmark = pytest.mark.skipif(INTERPRETING, reason="the interpreter's kernels cannot be compiled")


def _cost_model():
    """benchmarks/triton_cost.py: compiles offline (Triton ships ptxas) and reads the SASS."""
    sys.path.insert(0, str(TESTS_DIR.parents[1] / "benchmarks"))
    return importlib.import_module("triton_cost")


def _bundled_tools_reason() -> str | None:
    try:
        import triton
    except ImportError as error:
        return f"triton is not installed ({error})"
    folder = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [name for name in ("ptxas", "nvdisasm", "cuobjdump") if not (folder / name).is_file()]
    if missing:
        return f"this Triton ({triton.__version__}) ships no {', '.join(missing)} under {folder}"
    return None


TOOLS_REASON = _bundled_tools_reason()
needs_tools = pytest.mark.skipif(TOOLS_REASON is not None, reason=TOOLS_REASON or "")


def _launches():
    if TOOLS_REASON is not None or INTERPRETING:
        return []
    return _cost_model().launcher_launches()


def _launch_id(launch) -> str:
    constants = ",".join(f"{name}={value}" for name, value in launch.constants if name != "IS_FP64")
    return f"{launch.kernel_name.removeprefix('bs_rows_')}-{launch.dtype}-{constants}-{launch.num_warps}w"


LAUNCHES = _launches()


@pytest.fixture(scope="module", autouse=True)
def _compiled_side_by_side():
    """Every launch for sm_80 and sm_90 compiled up front, one process per core (the tests then read the cache)."""
    if LAUNCHES:
        pairs = [(launch, capability) for capability in (80, 90) for launch in LAUNCHES]
        _cost_model().compile_launches(pairs, workers=min(len(os.sched_getaffinity(0)), 4))


@needs_tools
def test_every_launcher_path_is_listed():
    """The list covers each kernel the launcher starts (a new kernel must be added to launcher_launches)."""
    kernels = importlib.import_module("bs_kernels.backends.triton_kernels")
    launched = {
        name for name in dir(kernels) if name.startswith("bs_rows_") and name.endswith("_kernel")
    }  # every @triton.jit entry point of the module
    assert {launch.kernel_name for launch in LAUNCHES} == launched


@needs_tools
@pytest.mark.parametrize("capability", [80, 90])
@pytest.mark.parametrize("launch", LAUNCHES, ids=[_launch_id(launch) for launch in LAUNCHES])
def test_compiles_without_spills(launch, capability):
    cost = _cost_model()
    compiled = cost.compile_launch(launch, capability)
    assert compiled.usage.get("LOCAL", 0) == 0 and compiled.usage.get("STACK", 0) == 0, compiled.usage
    assert compiled.spills == 0
    if launch.kernel_name == "bs_rows_backward_fixup_kernel":
        return  # scattered accesses
    if launch.kernel_name in ("bs_rows_merge_kernel",):
        return  # reads O(S k) partials and the k belief logits: no stream
    assert compiled.wide_loads, f"{launch.kernel_name}: no 16-byte load"


@needs_tools
@pytest.mark.parametrize(
    "launch",
    [
        item
        for item in LAUNCHES
        if item.kernel_name in ("bs_rows_forward_lanes_kernel", "bs_rows_forward_split_kernel") and item.dtype != "fp64"
    ],
    ids=_launch_id,
)
def test_per_lane_loops_on_sm90(launch):
    """The per-lane loops (the per-lane and split forwards, 16/32-bit logits): 16-byte loads on every path of the loop
    over the vocabulary, no block barrier in it, a block of logits within the issue budget (the loop's plain path
    under 8 lane-instructions per logit at bf16; the H200's memory speed allows ~14), and registers within the
    launcher's bytes-in-flight model (LANES_REGISTERS). (float64 keys branch more: their loop has more than the
    cost model's 4096 paths to enumerate; they are checked for spills and 16-byte loads above.)"""
    from bs_kernels.backends import triton_plan as launcher

    cost = _cost_model()
    compiled = cost.compile_launch(launch, 90)
    paths = cost.loop_paths(compiled.blocks)
    assert paths.loop_barriers == 0
    constants = launch.constants_dict
    groups, lanes = 1 << constants["LOG_GROUPS"], 1 << constants["LOG_LANES"]
    assert paths.paths and all(path.loads.get("LDG.E.128", 0) >= groups for path in paths.paths)
    config = launcher.LaneForwardConfig(groups=groups, num_warps=lanes // 32)
    if launch.dtype == "bf16":
        block = cost.name_lane_paths(paths)["block"][0]
        assert block * lanes / config.block_v(torch.bfloat16) < 8
    assert compiled.usage["REG"] <= launcher.LANES_REGISTERS[config], compiled.usage


def test_launcher_choice_by_the_models():
    """The launcher's choice from its two models at the shapes of issue 25: at least 3 MB in flight from 512 rows
    for k <= 64, the merge's traffic within 2 % of the logits, the bucket kernel only above k = 128."""
    from bs_kernels.backends import triton_plan as launcher

    for vocab in (49_152, 128_256):
        for top_k in (0, 20, 64):
            for rows in (256, 512, 1024, 2048, 4096, 8192):
                config = launcher.forward_config(vocab, top_k, rows)
                assert isinstance(config, (launcher.LaneForwardConfig, launcher.SplitForwardConfig))
                if rows >= 512 and top_k <= 20:
                    assert launcher.bytes_in_flight(config, rows) >= 3e6, (vocab, top_k, rows, config)
                if isinstance(config, launcher.SplitForwardConfig):
                    slices = -(-vocab // config.slice_len(vocab, torch.bfloat16))
                    assert 2 * slices * (8 + 8 * top_k) <= 0.02 * vocab * 2
        assert isinstance(launcher.forward_config(vocab, 100, 256), launcher.LaneForwardConfig)
        assert isinstance(launcher.forward_config(vocab, 129, 8192), launcher.ForwardConfig)
    # Many rows: the 4-group per-lane kernel alone keeps enough in flight; fewer: 8, then 16 groups; the fewest rows
    # of a large vocabulary: split, unless 16 groups keep as much in flight (2 slices of V = 49 152 at 256 rows).
    assert launcher.forward_config(128_256, 20, 8192) == launcher.LANES_DEFAULT
    assert launcher.forward_config(128_256, 20, 1024) == launcher.LANES_DEEP
    assert launcher.forward_config(128_256, 20, 512) == launcher.LANES_DEEPER
    assert launcher.forward_config(128_256, 20, 256) == launcher.SplitForwardConfig(launcher.LANES_DEEP, 3)
    assert launcher.forward_config(49_152, 20, 512) == launcher.LANES_DEEPER
    assert launcher.forward_config(49_152, 20, 256) == launcher.LANES_DEEPER
    assert launcher.forward_config(49_152, 100, 256) == launcher.LANES_DEEP  # issue-bound: the fewest instructions
    assert launcher.forward_config(49_152, 20, 256, element_size=8) == launcher.SplitForwardConfig(
        launcher.LANES_DEFAULT, 2
    )
