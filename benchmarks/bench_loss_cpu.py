"""Logits case on CPU: reference, torch and native side by side in one process; prints Markdown tables.

    python benchmarks/bench_loss_cpu.py                          # both shapes, 7 rounds (the reference: 3)
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_loss_cpu.py   # every provider's allocations on huge pages
    python benchmarks/bench_loss_cpu.py --shapes smollm2 --rounds 3
    python benchmarks/bench_loss_cpu.py --shapes tiny --rounds 2 # a check that it runs
    python benchmarks/bench_loss_cpu.py --providers native,native:two-pass --rounds 3 --no-forward-table
                                                                 # the one-pass gradient against the two passes
    python benchmarks/bench_loss_cpu.py --providers native,native:no-pool,native:two-pass --no-forward-table
                                                                 # the gradient pool against fresh memory

Tables, per shape (providers.LOGITS_SHAPES, float32, k = 20, lam = 0.2):
  1. fwd+bwd (loss.backward() on a fresh gradient) per provider: best and median wall time and the median CPU time
     of all threads (harness.time_bench), speed-ups of the best times, and the peak memory above the inputs
     (harness.peak_memory: a fresh process per provider). native:avx2 / native:sse2 cap the kernel's instruction
     set (see providers.py); their allocations are native's. native:two-pass is native with the gradient formed in
     backward (a second read of the logits) instead of in forward (bs_kernels/one_pass.py). native:no-pool is native
     with every gradient in fresh memory (the kernels' gradient pool off); native keeps the last freed gradient's
     block between calls, released before the peak is measured (harness.measure_peak), so the peak counts the
     call's gradient.
     The floor, measured in the same process over the same bytes: one read + one write of the logits (the best
     time of a copy into a preallocated buffer), and one read (the best time of a sum); every provider's best time
     is given relative to the first (the one-pass floor) and to read + copy (the two-pass floor).
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
from harness import MIB, Bench, gbps, markdown_table, peak_memory, tensor_bytes, time_bench
from providers import (
    LOGITS_SHAPES,
    OPTIONS,
    TINY_LOGITS_SHAPES,
    logits_bench,
    logits_case,
    logits_inputs,
    logits_provider,
    provider_list,
)

import bs_kernels
from bs_kernels.backends import native

SHAPES = {**LOGITS_SHAPES, **TINY_LOGITS_SHAPES}
PROVIDERS = ("reference", "torch", "native", "native:no-pool", "native:two-pass", "native:avx2", "native:sse2")
ISA_VARIANTS = ("native:avx2", "native:sse2")  # same allocations as native
CPU = torch.device("cpu")


def reference_rounds(name: str, rounds: int) -> int:
    """The reference takes seconds a call at the full shapes: at most 3 rounds."""
    return min(3, rounds) if "reference" in name else rounds


def bandwidth_floor(logits: torch.Tensor, rounds: int) -> tuple[float, float]:
    """(best ms of one read + one write of ``logits``: a copy into a preallocated buffer, best ms of one read: a
    sum), over the same bytes and threads as the providers."""
    source = logits.detach()
    target = torch.empty_like(source)
    target.copy_(source)  # touch every page once: the floor is the bandwidth, not the page faults
    copy = time_bench(Bench(lambda: target.copy_(source)), CPU, rounds=rounds)
    read = time_bench(Bench(lambda: source.sum()), CPU, rounds=rounds)
    return copy.best_ms, read.best_ms


def fwd_bwd_table(shape: str, rounds: int, providers: list[str]) -> list[str]:
    batch, length, vocab = SHAPES[shape]
    logits, labels = logits_inputs(batch, length, vocab, torch.float32, CPU)
    copy_ms, read_ms = bandwidth_floor(logits, max(rounds, 3))
    timings = {
        name: time_bench(
            logits_bench(logits_provider(name, OPTIONS), logits, labels), CPU, rounds=reference_rounds(name, rounds)
        )
        for name in providers
    }
    best = {name: timing.best_ms for name, timing in timings.items()}

    def speedup(baseline: str, name: str, digits: int) -> str:
        return f"{best[baseline] / best[name]:.{digits}f}x" if baseline in best else "-"

    rows = []
    for name, timing in timings.items():
        if name in ISA_VARIANTS:
            memory_cells = ["as native", "as native"]  # the same allocations; only the instruction set differs
        else:
            case = dict(provider=name, batch=batch, length=length, vocab=vocab, options=OPTIONS)
            peak = peak_memory(logits_case, case, CPU).above_inputs
            memory_cells = [f"{peak / MIB:.0f}", f"{peak / tensor_bytes(logits):.2f}"]
        rows.append(
            [name, f"{timing.best_ms:.0f}", f"{timing.median_ms:.0f}", f"{timing.median_cpu_ms:.0f}",
             speedup("reference", name, 1), speedup("torch", name, 2), f"{timing.best_ms / copy_ms:.2f}x",
             f"{timing.best_ms / (copy_ms + read_ms):.2f}x", *memory_cells]
        )  # fmt: skip
    title = (
        f"fwd+bwd, B={batch} T={length} V={vocab} fp32, k={OPTIONS['top_k']} lam={OPTIONS['lam']}; "
        f"rounds: {rounds} (reference {reference_rounds('reference', rounds)})"
    )
    size = tensor_bytes(logits)
    floor = (
        f"Floor over the logits' {size / MIB:.0f} MiB, this process, {torch.get_num_threads()} threads: one read + "
        f"one write (copy) {copy_ms:.1f} ms ({gbps(2 * size, copy_ms):.1f} GB/s moved), one read (sum) "
        f"{read_ms:.1f} ms ({gbps(size, read_ms):.1f} GB/s); two-pass floor (read + copy) {copy_ms + read_ms:.1f} ms."
    )
    header = ["provider", "best ms", "median ms", "median CPU ms", "best vs reference", "best vs torch",
              "best / floor (1 read + 1 write)", "best / two-pass floor", "peak above inputs (MiB)",
              "x logits"]  # fmt: skip
    return [title, "", floor, "", *markdown_table(header, rows)]


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
    parser.add_argument(
        "--providers",
        type=provider_list(PROVIDERS),
        default=list(PROVIDERS),
        help="comma-separated subset of the fwd+bwd providers (default: all)",
    )
    parser.add_argument("--no-forward-table", action="store_true", help="only the fwd+bwd table per shape")
    args = parser.parse_args()
    reason = native.unavailable_reason(CPU)
    if reason is not None:
        sys.exit(reason)
    load_before = os.getloadavg()
    output = []
    for shape in args.shapes:
        output += fwd_bwd_table(shape, args.rounds, args.providers) + [""]
        if not args.no_forward_table:
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
