"""fwd+bwd time (pytest-benchmark, in this process) and peak memory (fresh subprocess) per provider.

    pytest benchmarks/ --benchmark-only                       # all shapes, all providers available here
    pytest benchmarks/ --benchmark-only -k smollm2            # one shape

Shapes: B·T = 2048 positions at V = 49 152 (SmolLM2), and 1 024 positions at V = 128 256 (Llama-3; sized so the
reference's ~7 GB of float32 temporaries fit a 24 GiB machine and a run stays within minutes on 2 cores).
"""

from __future__ import annotations

import pytest
import torch
from conftest import peak_memory
from measure_memory import make_inputs
from providers import PROVIDERS, available, make_step

SHAPES = {
    "smollm2_4x512x49152": (4, 512, 49_152),
    "llama3_2x512x128256": (2, 512, 128_256),
}
OPTIONS = {"lam": 0.2, "top_k": 20}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _provider_param(name: str):
    reason = available(name, DEVICE)
    return pytest.param(name, id=name, marks=[pytest.mark.skip(reason=reason)] if reason else [])


@pytest.mark.parametrize("provider", [_provider_param(name) for name in PROVIDERS])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_fwd_bwd(benchmark, record_row, shape, provider):
    batch, length, vocab = SHAPES[shape]
    logits, labels = make_inputs(batch, length, vocab, torch.float32, DEVICE)
    step = make_step(provider, OPTIONS)

    def fwd_bwd():
        logits.grad = None
        step(logits, labels)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    fwd_bwd()  # warm-up outside the timing (compilation, first-touch allocations)
    benchmark.pedantic(fwd_bwd, rounds=3, iterations=1)
    memory = peak_memory(provider, batch, length, vocab, "float32", DEVICE.type, OPTIONS)
    peak_mib = memory["peak_bytes_above_inputs"] / 2**20
    benchmark.extra_info.update(peak_mib_above_inputs=peak_mib, logits_mib=memory["logits_bytes"] / 2**20)
    record_row(
        dict(
            shape=shape,
            provider=provider,
            median_ms=benchmark.stats.stats.median * 1e3,
            peak_mib=peak_mib,
            peak_vs_logits=memory["peak_bytes_above_inputs"] / memory["logits_bytes"],
        )
    )
