"""Logits case: bs_token_loss fwd+bwd time (pytest-benchmark) and peak memory (harness) per provider.

    pytest benchmarks/test_bench_loss.py --benchmark-only             # both shapes, every provider available here
    pytest benchmarks/test_bench_loss.py --benchmark-only -k smollm2  # one shape
    BS_BENCH_TINY=1 pytest benchmarks/test_bench_loss.py --benchmark-only

Shapes: providers.LOGITS_SHAPES (B·T = 2048 positions at V = 49 152, 1 024 at V = 128 256), float32, k = 20,
lam = 0.2; the first T/8 labels ignored.
"""

from __future__ import annotations

import pytest
from conftest import DEVICE, provider_params, shape_id
from harness import tiny
from providers import LOGITS_PROVIDERS, LOGITS_SHAPES, OPTIONS, TINY_LOGITS_SHAPES, logits_case

SHAPES = TINY_LOGITS_SHAPES if tiny() else LOGITS_SHAPES


@pytest.mark.parametrize("provider", provider_params(LOGITS_PROVIDERS))
@pytest.mark.parametrize("shape", list(SHAPES))
def test_logits_fwd_bwd(measure, shape, provider):
    batch, length, vocab = SHAPES[shape]
    measure(
        "logits",
        shape_id(shape, SHAPES[shape]),
        provider,
        logits_case,
        logits_bytes=batch * length * vocab * 4,
        batch=batch,
        length=length,
        vocab=vocab,
        device=DEVICE.type,
        options=OPTIONS,
    )
