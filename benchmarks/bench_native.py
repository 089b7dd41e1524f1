"""impl="native" side by side with "reference" and "torch" on CPU, in one process; prints Markdown tables.

    python benchmarks/bench_native.py                      # both shapes, 7 rounds (the reference: 3)
    THP_MEM_ALLOC_ENABLE=1 python benchmarks/bench_native.py   # every provider's allocations on huge pages
    python benchmarks/bench_native.py --shapes smollm2 --rounds 3

Tables:
  1. fwd+bwd (loss.backward() on a fresh gradient) per provider: best and median wall time over consecutive rounds
     (see in_blocks), the median CPU time of all threads (steadier than wall time when other jobs share the
     cores), speed-ups of the best times, and peak
     memory above the inputs from benchmarks/measure_memory.py (a fresh process per provider).
     "native[avx2]"/"native[default]" cap the kernel's instruction set with BS_KERNELS_NATIVE_ISA, to show what
     machines without AVX-512 get.
  2. forward alone: the package forward (no autograd) per provider, the bare native kernel, and one
     torch.logsumexp over the same logits: the floor of one exp per element.
Shapes follow benchmarks/test_bench_loss.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import pathlib
import platform
import statistics
import sys
import time

import torch

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from conftest import peak_memory  # noqa: E402
from measure_memory import make_inputs  # noqa: E402
from providers import make_step  # noqa: E402

import bs_kernels  # noqa: E402
from bs_kernels.backends import native  # noqa: E402

SHAPES = {
    "smollm2": (4, 512, 49_152),
    "llama3": (2, 512, 128_256),
}
OPTIONS = {"lam": 0.2, "top_k": 20}
ISA_VARIANTS = ("avx2", "default")


@contextlib.contextmanager
def isa_cap(isa: str | None):
    previous = os.environ.get("BS_KERNELS_NATIVE_ISA")
    if isa is not None:
        os.environ["BS_KERNELS_NATIVE_ISA"] = isa
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("BS_KERNELS_NATIVE_ISA", None)
        else:
            os.environ["BS_KERNELS_NATIVE_ISA"] = previous


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all this process's threads)."""
    start_cpu, start = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - start, time.process_time() - start_cpu


def in_blocks(cases: dict, rounds: dict) -> tuple[dict, dict]:
    """Each case: one warm-up call, then its rounds back to back; returns name -> wall seconds, name -> CPU seconds.

    Blocks, not round-robin: a training loop calls one impl step after step, and on this (virtual) machine the first
    touch of memory that another provider just freed in a different page layout (4 KiB vs 2 MiB pages) costs up to
    0.4 s of kernel time, which round-robin would charge to whichever provider comes next.
    """
    wall = {name: [] for name in cases}
    cpu = {name: [] for name in cases}
    for name, fn in cases.items():
        fn()
        for _ in range(rounds[name]):
            wall_seconds, cpu_seconds = timed(fn)
            wall[name].append(wall_seconds)
            cpu[name].append(cpu_seconds)
    return wall, cpu


def provider_case(name: str, logits: torch.Tensor, labels: torch.Tensor):
    impl, _, isa = name.partition("[")
    step = make_step(impl, OPTIONS)

    def run():
        logits.grad = None
        with isa_cap(isa.rstrip("]") or None):
            step(logits, labels)

    return run


def fwd_bwd_table(shape: str, rounds: int) -> list[str]:
    batch, length, vocab = SHAPES[shape]
    logits, labels = make_inputs(batch, length, vocab, torch.float32, torch.device("cpu"))
    names = ["reference", "torch", "native", *(f"native[{isa}]" for isa in ISA_VARIANTS)]
    cases = {name: provider_case(name, logits, labels) for name in names}
    times, cpu = in_blocks(cases, {name: (min(3, rounds) if name == "reference" else rounds) for name in names})
    best = {name: min(values) for name, values in times.items()}
    lines = [
        f"fwd+bwd, B={batch} T={length} V={vocab} fp32, k={OPTIONS['top_k']} lam={OPTIONS['lam']}; "
        f"rounds: {rounds} (reference {min(3, rounds)})",
        "",
        "| provider | best ms | median ms | median CPU ms | best vs reference | best vs torch "
        "| peak above inputs (MiB) | x logits |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        if "[" in name:
            memory_cell = "as native | as native"  # the same allocations; only the instruction set differs
        else:
            memory = peak_memory(name, batch, length, vocab, "float32", "cpu", OPTIONS)
            ratio = memory["peak_bytes_above_inputs"] / memory["logits_bytes"]
            memory_cell = f"{memory['peak_bytes_above_inputs'] / 2**20:.0f} | {ratio:.2f}"
        lines.append(
            f"| {name} | {best[name] * 1e3:.0f} | {statistics.median(times[name]) * 1e3:.0f} | "
            f"{statistics.median(cpu[name]) * 1e3:.0f} | {best['reference'] / best[name]:.1f}x | "
            f"{best['torch'] / best[name]:.2f}x | {memory_cell} |"
        )
    return lines


def forward_table(shape: str, rounds: int) -> list[str]:
    batch, length, vocab = SHAPES[shape]
    logits, labels = make_inputs(batch, length, vocab, torch.float32, torch.device("cpu"))
    logits = logits.detach()
    rows, row_labels = logits.reshape(-1, vocab), labels.reshape(-1).clamp(min=-1)

    def loss_forward(impl):
        def run():
            with torch.no_grad():
                bs_kernels.bs_token_loss(logits, labels, impl=impl, **OPTIONS)

        return run

    cases = {
        "torch.logsumexp (floor)": lambda: torch.logsumexp(rows, dim=-1),
        "native kernel (lse + label + top-k)": lambda: native.forward(rows, row_labels, OPTIONS["top_k"]),
        "bs_token_loss native": loss_forward("native"),
        "bs_token_loss torch": loss_forward("torch"),
        "bs_token_loss reference": loss_forward("reference"),
    }
    times, cpu = in_blocks(cases, {name: (min(3, rounds) if "reference" in name else rounds) for name in cases})
    floor = min(times["torch.logsumexp (floor)"])
    lines = [
        f"forward alone (no autograd), B={batch} T={length} V={vocab} fp32, k={OPTIONS['top_k']}",
        "",
        "| what | best ms | median ms | median CPU ms | best, relative to torch.logsumexp |",
        "|---|---|---|---|---|",
    ]
    for name, values in times.items():
        lines.append(
            f"| {name} | {min(values) * 1e3:.0f} | {statistics.median(values) * 1e3:.0f} | "
            f"{statistics.median(cpu[name]) * 1e3:.0f} | {min(values) / floor:.2f}x the time |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    reason = native.unavailable_reason(torch.device("cpu"))
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
