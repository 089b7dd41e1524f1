"""Linear case: bs_linear_loss (lm_head + BS-T) fwd+bwd time (pytest-benchmark) and peak memory (harness).

    pytest benchmarks/test_bench_linear.py --benchmark-only
    BS_BENCH_TINY=1 pytest benchmarks/test_bench_linear.py --benchmark-only

Shape: providers.LINEAR_SHAPES (B=8, T=512, H=576, V=49 152: SmolLM2-135M's lm_head), float32, k = 20, lam = 0.2.
Peak memory is above the inputs and their gradients (hidden and weight); "x logits" relates it to the [B, T, V]
logits that the fused providers never form.
"""

from __future__ import annotations

import pytest
from conftest import DEVICE, provider_params, shape_id
from harness import tiny
from providers import LINEAR_PROVIDERS, LINEAR_SHAPES, OPTIONS, TINY_LINEAR_SHAPES, linear_case

SHAPES = TINY_LINEAR_SHAPES if tiny() else LINEAR_SHAPES


@pytest.mark.parametrize("provider", provider_params(LINEAR_PROVIDERS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_linear_fwd_bwd(measure, shape, provider):
    batch, length, hidden, vocab = SHAPES[shape]
    measure(
        "linear",
        shape_id(shape, SHAPES[shape]),
        provider,
        linear_case,
        logits_bytes=batch * length * vocab * 4,
        above_grads=True,
        batch=batch,
        length=length,
        hidden=hidden,
        vocab=vocab,
        device=DEVICE.type,
        options=OPTIONS,
    )
