"""Linear case on one CUDA GPU: bs_linear_loss against Liger-Kernel's fused linear cross entropy, side by side.

Target at N=8192, H=4096, V=128256, bf16: fwd+bwd at most 1.2x Liger's fused linear cross entropy (hard labels,
same shape, same run), no [N, V] allocation, peak memory above the unavoidable gradients under 1 GiB.

Providers (providers.py): liger, triton:no-fp32-acc and torch:no-fp32-acc (grad_W summed in bf16, like Liger),
triton (its default: accumulate_in_fp32=True, + 4 V H bytes), eager:ce (logits = F.linear in bf16, then
F.cross_entropy: what Hugging Face models do). Time: harness.time_bench, median of --repeats after --warmup.
Memory: harness.peak_memory (torch.cuda.max_memory_allocated during one fwd+bwd above what was allocated before it)
minus the gradients' bytes (hidden and weight, in their dtype); "no [N, V] allocation" is checked by the CUDA
caching allocator's trace: the largest single block allocated during fwd+bwd is printed next to one [N, V] tensor.
The last column says which GEMM formed bs_linear_loss's grad_W updates (bs_kernels._weight_grad.weight_grad_gemm_path):
the mixed bf16 x bf16 -> float32 cuBLAS GEMM, or the blocked fallback where this build lacks it.

    python benchmarks/bench_linear_gpu.py                  # the target shape
    python benchmarks/bench_linear_gpu.py --length 2048    # smaller
    python benchmarks/bench_linear_gpu.py --dry-run        # CPU, tiny shape, Triton interpreter: checks the script
Prints one Markdown table (paste into benchmarks/RESULTS.md) and exits 0; a provider that fails prints its error.
"""

from __future__ import annotations

import argparse
import os
import traceback

import torch
from harness import GIB, markdown_row, markdown_table, peak_memory, time_bench
from providers import LINEAR_PROVIDERS, OPTIONS, linear_case, provider_list, unavailable

from bs_kernels._weight_grad import weight_grad_gemm_path

DEFAULT_PROVIDERS = ("liger", "triton:no-fp32-acc", "triton", "torch:no-fp32-acc", "eager:ce")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1, help="sequences; N = batch * length positions")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--providers",
        type=provider_list(LINEAR_PROVIDERS),
        default=",".join(DEFAULT_PROVIDERS),
        help=f"comma-separated, from {', '.join(LINEAR_PROVIDERS)}",
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU under the Triton interpreter, N = 16, V = 300")
    args = parser.parse_args()
    if args.dry_run:
        # Triton reads this when the kernels are created, i.e. at the first launch (bs_kernels imports them lazily).
        os.environ["TRITON_INTERPRET"] = "1"
        args.batch, args.length, args.hidden, args.vocab, args.warmup, args.repeats = 2, 8, 32, 300, 1, 2
    elif not torch.cuda.is_available():
        raise SystemExit("bench_linear_gpu.py needs a CUDA GPU (or --dry-run for a CPU check of the script)")
    device = torch.device("cpu" if args.dry_run else "cuda")

    rows = args.batch * args.length
    nv_gib = rows * args.vocab * torch.tensor([], dtype=getattr(torch, args.dtype)).element_size() / GIB
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else "dry-run-cpu"
    if "liger" in args.providers and unavailable("liger", device) is not None:
        print(f"!!! LIGER-KERNEL IS MISSING: no liger row, no 'vs liger' ratio ({unavailable('liger', device)})")
    print(
        f"\n### bs_linear_loss on {device_name}: N={rows}, H={args.hidden}, V={args.vocab}, {args.dtype}; "
        f"one [N, V] tensor = {nv_gib:.2f} GiB"
    )
    case = dict(
        batch=args.batch,
        length=args.length,
        hidden=args.hidden,
        vocab=args.vocab,
        dtype=args.dtype,
        device=device.type,
        options=OPTIONS,
    )
    header = [
        "provider",
        "fwd+bwd (ms)",
        "vs liger",
        "peak above inputs+grads (GiB)",
        "largest block (GiB)",
        "grad_W GEMM",
    ]
    print("\n".join(markdown_table(header, [])), flush=True)  # rows follow as they are measured
    results = {}
    for name in args.providers:
        reason = unavailable(name, device)
        if reason is not None:
            print(markdown_row([name, f"skipped: {reason}", "", "", "", ""]), flush=True)
            continue
        try:
            bench = linear_case(provider=name, **case)
            timing = time_bench(bench, device, rounds=args.repeats, warmup=args.warmup)
            # liger and eager:ce do not run bs_linear_loss: no GEMM path of ours to report.
            gemm = "-" if name.split(":")[0] in ("liger", "eager") else weight_grad_gemm_path()
            grad_bytes = bench.grad_bytes
            del bench  # free the inputs before the memory probe builds its own
            memory = peak_memory(linear_case, dict(provider=name, **case), device, trace_blocks=True)
        except Exception as error:  # report and go on: one missing provider must not hide the others
            traceback.print_exc()
            message = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:150]}"
            print(markdown_row([name, message, "", "", "", ""]), flush=True)
            continue
        results[name] = timing.median_ms
        ratio = f"{timing.median_ms / results['liger']:.2f}x" if "liger" in results else "n/a"
        largest = "-" if memory.largest_block is None else f"{memory.largest_block / GIB:.2f}"
        extra_gib = (memory.above_inputs - grad_bytes) / GIB
        print(markdown_row([name, f"{timing.median_ms:.1f}", ratio, f"{extra_gib:.2f}", largest, gemm]), flush=True)


if __name__ == "__main__":
    main()
