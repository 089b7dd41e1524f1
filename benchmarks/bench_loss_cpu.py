"""Logits case on CPU: reference, torch and native side by side in one process; prints Markdown tables.

    python benchmarks/bench_loss_cpu.py                          # both shapes, 7 rounds (the reference: 3)
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_loss_cpu.py   # every provider's allocations on huge pages
    python benchmarks/bench_loss_cpu.py --shapes smollm2 --rounds 3
    python benchmarks/bench_loss_cpu.py --shapes tiny --rounds 2 # a check that it runs

Tables, per shape (providers.LOGITS_SHAPES, float32, k = 20, lam = 0.2):
  1. fwd+bwd (loss.backward() on a fresh gradient) per provider: best and median wall time and the median CPU time
     of all threads (harness.time_bench), speed-ups of the best times, and the peak memory above the inputs
     (harness.peak_memory: a fresh process per provider). native:avx2 / native:sse2 cap the kernel's instruction
     set (see providers.py); their allocations are native's.
  2. forward alone: the package forward (no autograd) per provider, the bare native kernel, and one torch.logsumexp
     over the same logits: the floor of one exp per element.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys

import torch
from harness import MIB, Bench, markdown_table, peak_memory, tensor_bytes, time_bench
from providers import (
    LOGITS_SHAPES,
    OPTIONS,
    TINY_LOGITS_SHAPES,
    logits_bench,
    logits_case,
    logits_inputs,
    logits_provider,
)

import bs_kernels
from bs_kernels.backends import native

SHAPES = {**LOGITS_SHAPES, **TINY_LOGITS_SHAPES}
PROVIDERS = ("reference", "torch", "native", "native:avx2", "native:sse2")
CPU = torch.device("cpu")


def reference_rounds(name: str, rounds: int) -> int:
    """The reference takes seconds a call at the full shapes: at most 3 rounds."""
    return min(3, rounds) if "reference" in name else rounds


def fwd_bwd_table(shape: str, rounds: int) -> list[str]:
    batch, length, vocab = SHAPES[shape]
    logits, labels = logits_inputs(batch, length, vocab, torch.float32, CPU)
    timings = {
        name: time_bench(
            logits_bench(logits_provider(name, OPTIONS), logits, labels), CPU, rounds=reference_rounds(name, rounds)
        )
        for name in PROVIDERS
    }
    best = {name: timing.best_ms for name, timing in timings.items()}
    rows = []
    for name, timing in timings.items():
        if ":" in name:
            memory_cells = ["as native", "as native"]  # the same allocations; only the instruction set differs
        else:
            case = dict(provider=name, batch=batch, length=length, vocab=vocab, options=OPTIONS)
            peak = peak_memory(logits_case, case, CPU).above_inputs
            memory_cells = [f"{peak / MIB:.0f}", f"{peak / tensor_bytes(logits):.2f}"]
        rows.append(
            [name, f"{timing.best_ms:.0f}", f"{timing.median_ms:.0f}", f"{timing.median_cpu_ms:.0f}",
             f"{best['reference'] / timing.best_ms:.1f}x", f"{best['torch'] / timing.best_ms:.2f}x", *memory_cells]
        )  # fmt: skip
    title = (
        f"fwd+bwd, B={batch} T={length} V={vocab} fp32, k={OPTIONS['top_k']} lam={OPTIONS['lam']}; "
        f"rounds: {rounds} (reference {reference_rounds('reference', rounds)})"
    )
    header = ["provider", "best ms", "median ms", "median CPU ms", "best vs reference", "best vs torch",
              "peak above inputs (MiB)", "x logits"]  # fmt: skip
    return [title, "", *markdown_table(header, rows)]


def forward_table(shape: str, rounds: int) -> list[str]:
    batch, length, vocab = SHAPES[shape]
    logits, labels = logits_inputs(batch, length, vocab, torch.float32, CPU)
    logits = logits.detach()
    rows, row_labels = logits.reshape(-1, vocab), labels.reshape(-1).clamp(min=-1)

    def loss_forward(impl: str) -> Bench:
        def forward():
            with torch.no_grad():
                return bs_kernels.bs_token_loss(logits, labels, impl=impl, **OPTIONS)

        return Bench(forward)

    cases = {
        "torch.logsumexp (floor)": Bench(lambda: torch.logsumexp(rows, dim=-1)),
        "native kernel (lse + label + top-k)": Bench(lambda: native.forward(rows, row_labels, OPTIONS["top_k"])),
        "bs_token_loss native": loss_forward("native"),
        "bs_token_loss torch": loss_forward("torch"),
        "bs_token_loss reference": loss_forward("reference"),
    }
    timings = {name: time_bench(bench, CPU, rounds=reference_rounds(name, rounds)) for name, bench in cases.items()}
    floor = timings["torch.logsumexp (floor)"].best_ms
    table = [
        [name, f"{timing.best_ms:.0f}", f"{timing.median_ms:.0f}", f"{timing.median_cpu_ms:.0f}",
         f"{timing.best_ms / floor:.2f}x the time"]
        for name, timing in timings.items()
    ]  # fmt: skip
    header = ["what", "best ms", "median ms", "median CPU ms", "best, relative to torch.logsumexp"]
    title = f"forward alone (no autograd), B={batch} T={length} V={vocab} fp32, k={OPTIONS['top_k']}"
    return [title, "", *markdown_table(header, table)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(LOGITS_SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    reason = native.unavailable_reason(CPU)
    if reason is not None:
        sys.exit(reason)
    load_before = os.getloadavg()
    output = []
    for shape in args.shapes:
        output += fwd_bwd_table(shape, args.rounds) + [""]
        output += forward_table(shape, args.rounds) + [""]
    load_after = os.getloadavg()
    header = (
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, native ISA {native.isa()}, "
        f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}; "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print("\n".join([header, "", *output]))


if __name__ == "__main__":
    main()
