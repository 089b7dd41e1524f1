"""Linear case on CPU: bs_linear_loss (fused lm_head + BS-T) against the eager paths, side by side in one process.

    python benchmarks/bench_linear_cpu.py          # B=8, T=512, H=576, V=49152, float32 (SmolLM2-135M's lm_head)
    python benchmarks/bench_linear_cpu.py --batch 2 --length 128
    python benchmarks/bench_linear_cpu.py --batch 2 --length 32 --hidden 64 --vocab 4096 --rounds 2   # a check

Providers (providers.py): reference, eager:torch, torch, native, native:two-pass, torch:recompute by default;
--providers takes any of providers.LINEAR_PROVIDERS (those that cannot run here are listed as skipped).
Time: harness.time_bench, the median wall time and the median process CPU time (all threads) over --rounds after
one warm-up; on a machine shared with other jobs the CPU time is the steadier one. Peak memory:
harness.peak_memory (a fresh process per provider) minus the bytes of the input gradients (hidden, weight), i.e.
"above inputs and their gradients".
Labels: the first T/8 positions ignored; k = 20, lam = 0.2, reduction "sequence_mean".
"""

from __future__ import annotations

import argparse

import torch
from harness import MIB, markdown_table, peak_memory, time_bench
from providers import (
    LINEAR_PROVIDERS,
    LINEAR_SHAPES,
    OPTIONS,
    linear_bench,
    linear_case,
    linear_inputs,
    linear_provider,
    provider_list,
    unavailable,
)

CPU = torch.device("cpu")
DEFAULT_PROVIDERS = ("reference", "eager:torch", "torch", "native", "native:two-pass", "torch:recompute")


def main() -> None:
    batch, length, hidden, vocab = LINEAR_SHAPES["smollm2"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=batch)
    parser.add_argument("--length", type=int, default=length)
    parser.add_argument("--hidden", type=int, default=hidden)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per provider, after one warm-up")
    parser.add_argument(
        "--providers",
        type=provider_list(LINEAR_PROVIDERS),
        default=",".join(DEFAULT_PROVIDERS),
        help=f"comma-separated, from {', '.join(LINEAR_PROVIDERS)}",
    )
    args = parser.parse_args()

    shape = dict(batch=args.batch, length=args.length, hidden=args.hidden, vocab=args.vocab)
    inputs = linear_inputs(args.batch, args.length, args.hidden, args.vocab, getattr(torch, args.dtype), CPU)
    results = {}
    for name in args.providers:
        reason = unavailable(name, CPU)
        if reason is not None:
            results[name] = reason
            continue
        bench = linear_bench(linear_provider(name, OPTIONS), *inputs)
        timing = time_bench(bench, CPU, rounds=args.rounds)
        memory = peak_memory(linear_case, dict(provider=name, **shape, dtype=args.dtype, options=OPTIONS), CPU)
        results[name] = (timing, memory.above_inputs - bench.grad_bytes, memory.value)

    reference = results.get("reference")
    reference = reference if isinstance(reference, tuple) else None
    rows = []
    for name, result in results.items():
        if isinstance(result, str):
            rows.append([name, f"skipped: {result}", "", "", "", "", "", ""])
            continue
        timing, peak, loss = result
        ratios = ["n/a"] * 3
        if reference is not None:
            reference_timing, reference_peak, _ = reference
            ratios = [
                f"{timing.median_ms / reference_timing.median_ms:.2f}x",
                f"{timing.median_cpu_ms / reference_timing.median_cpu_ms:.2f}x",
                f"{peak / reference_peak:.1%}",
            ]
        rows.append(
            [
                name,
                f"{timing.median_ms / 1e3:.2f}",
                ratios[0],
                f"{timing.median_cpu_ms / 1e3:.2f}",
                ratios[1],
                f"{peak / MIB:.0f}",
                ratios[2],
                f"{loss:.6f}",
            ]
        )
    print(
        f"bs_linear_loss fwd+bwd, B={args.batch}, T={args.length}, H={args.hidden}, V={args.vocab}, {args.dtype}, "
        f"{torch.get_num_threads()} torch threads, median of {args.rounds} rounds after one warm-up"
    )
    header = [
        "provider",
        "fwd+bwd wall (s)",
        "vs reference",
        "CPU time (s)",
        "vs reference",
        "peak above inputs+grads (MiB)",
        "vs reference",
        "loss",
    ]
    print("\n".join(markdown_table(header, rows)))


if __name__ == "__main__":
    main()
