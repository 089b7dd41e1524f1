"""bf16 autocast as an option of the evaluation (docs/driver.md, "bf16 autocast").

    with autocast_context("bf16", "cpu"):
        ...  # the model's matmuls in bfloat16, its weights in float32

"off" (the default) is float32 throughout. "bf16" runs the ops that torch.autocast casts (the linear layers, the
attention matmuls; the fused lm_head pass casts its own GEMM the same way, bs_kernels.linear) in bfloat16 and keeps
the weights and the reductions (softmax, log-probs, the kernels' statistics) in float32.
"""

from __future__ import annotations

import contextlib

AUTOCAST_MODES = ("off", "bf16")


def check_autocast(mode) -> str:
    """``mode`` if it is one of AUTOCAST_MODES, else a ValueError naming the option."""
    if not isinstance(mode, str) or mode not in AUTOCAST_MODES:
        raise ValueError(f"autocast must be one of {', '.join(AUTOCAST_MODES)}, got {mode!r}")
    return mode


def autocast_context(mode: str, device_type: str) -> contextlib.AbstractContextManager:
    """A torch.autocast region in bfloat16 on ``device_type`` for ``mode`` "bf16"; for "off", no region at all (an
    autocast the caller entered stays in force).

    For regions in which no weight changes (an evaluation): torch.autocast's weight-cast cache serves each weight's
    bf16 copy to every forward of the region (a generated token would otherwise cast all the weights again), and
    torch empties it only on leaving the outermost region, so an optimiser step inside would read stale copies.
    """
    if check_autocast(mode) == "off":
        return contextlib.nullcontext()
    import torch  # here: the commands import AUTOCAST_MODES before their checks, torch after them

    return torch.autocast(device_type, dtype=torch.bfloat16)
