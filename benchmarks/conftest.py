"""pytest-benchmark entry points: shared fixtures, and one table (time and peak memory side by side) at the end.

pytest benchmarks/ --benchmark-only                    # every case, shape and provider available here
BS_BENCH_TINY=1 pytest benchmarks/ --benchmark-only    # tiny shapes: checks that every provider runs
"""

from __future__ import annotations

import pytest
import torch

# pytest puts this folder (no __init__.py) on sys.path before it imports this file, as running a script here does.
from harness import MIB, environ, markdown_table, peak_memory, synchronized
from providers import unavailable

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROUNDS = 3
_ROWS: list[dict] = []


def provider_params(names: tuple[str, ...]) -> list:
    """One pytest param per provider, skipped with the reason when it cannot run on DEVICE."""
    params = []
    for name in names:
        reason = unavailable(name, DEVICE)
        params.append(pytest.param(name, id=name, marks=[pytest.mark.skip(reason=reason)] if reason else []))
    return params


def shape_id(name: str, shape: tuple[int, ...]) -> str:
    return f"{name}_{'x'.join(map(str, shape))}"


@pytest.fixture
def measure(benchmark):
    """measure(case, shape, provider, factory, logits_bytes, **kwargs): time factory(**kwargs)'s Bench with
    pytest-benchmark, its peak memory above the inputs (and above the input gradients when the table counts only
    what the loss adds, ``above_grads=True``) with harness.peak_memory, and add a row to the summary."""

    def run(case: str, shape: str, provider: str, factory, logits_bytes: int, above_grads: bool = False, **kwargs):
        bench = factory(provider=provider, **kwargs)
        with environ(bench.environ):
            benchmark.pedantic(
                synchronized(bench, DEVICE), setup=bench.reset, rounds=ROUNDS, warmup_rounds=1, iterations=1
            )
        bench.reset()
        grad_bytes = bench.grad_bytes if above_grads else 0
        del bench  # free the inputs before the memory probe (in this process on CUDA)
        peak = peak_memory(factory, dict(provider=provider, **kwargs), DEVICE).above_inputs - grad_bytes
        benchmark.extra_info.update(peak_mib=peak / MIB, logits_mib=logits_bytes / MIB)
        _ROWS.append(
            dict(
                case=case,
                shape=shape,
                provider=provider,
                median_ms=benchmark.stats.stats.median * 1e3,
                peak_mib=peak / MIB,
                peak_vs_logits=peak / logits_bytes,
            )
        )

    return run


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    terminalreporter.write_sep("=", "bs_kernels: fwd+bwd time and peak memory above the inputs")
    reference_ms = {(row["case"], row["shape"]): row["median_ms"] for row in _ROWS if row["provider"] == "reference"}
    rows = []
    for row in sorted(_ROWS, key=lambda r: (r["case"], r["shape"], r["median_ms"])):
        speedup = reference_ms.get((row["case"], row["shape"]), float("nan")) / row["median_ms"]
        rows.append(
            [
                row["case"],
                row["shape"],
                row["provider"],
                f"{row['median_ms']:.1f}",
                f"{speedup:.2f}x",
                f"{row['peak_mib']:.1f}",
                f"{row['peak_vs_logits']:.2f}",
            ]
        )
    header = ["case", "shape", "provider", "median ms", "vs reference", "peak MiB", "x logits"]
    for line in markdown_table(header, rows):
        terminalreporter.write_line(line)
    terminalreporter.write_line("peak: above the inputs (logits case) / above the inputs and their gradients (linear)")
