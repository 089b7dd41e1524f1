"""GPU check for bs_linear_loss: fwd+bwd time and peak memory against Liger-Kernel's fused linear cross-entropy.

Issue 5's GPU target (N=8192, H=4096, V=128256, bf16): fwd+bwd at most 1.2x Liger's fused linear CE (hard labels,
same shape, same run), no [N, V] allocation, peak memory above the unavoidable gradients under 1 GiB.

Providers (named like ``impl`` values where they are one):
  triton / torch            bs_linear_loss(impl=...), accumulate_in_fp32=False (grad_W summed in bf16, like Liger)
  triton-fp32acc            bs_linear_loss(impl="triton"), default accumulate_in_fp32=True (+4 V H bytes)
  liger                     liger_kernel's LigerFusedLinearCrossEntropyLoss (skipped if liger_kernel is missing)
  eager-ce                  logits = F.linear(hidden, weight) in bf16, then F.cross_entropy (what HF does)

Memory: torch.cuda.max_memory_allocated during one fwd+bwd, minus what is allocated once the inputs exist, minus
the gradients' bytes (hidden and weight, in their dtype). "no [N, V] allocation" is checked by a CUDA caching-
allocator trace: the largest single block allocated during fwd+bwd is printed next to N*V*2 bytes.
Time: CUDA events around fwd+bwd, median of --repeats after --warmup, synchronised.

    python benchmarks/gpu_bench_linear.py               # the issue's shape
    python benchmarks/gpu_bench_linear.py --rows 2048   # smaller
Prints one markdown table (paste into benchmarks/RESULTS.md) and exits 0; a provider that fails prints its error.
"""

from __future__ import annotations

import argparse
import statistics
import traceback

import torch
import torch.nn.functional as F


def make_inputs(rows: int, hidden_size: int, vocab: int, dtype: torch.dtype):
    generator = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(1, rows, hidden_size, device="cuda", dtype=dtype, generator=generator)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=dtype, generator=generator) / hidden_size**0.5
    labels = torch.randint(0, vocab, (1, rows), device="cuda", generator=generator)
    labels[:, : rows // 8] = -100  # a prompt part, as in unlearning batches
    return hidden.requires_grad_(), weight.requires_grad_(), labels


def provider_step(name: str, hidden, weight, labels):
    """A function running one fwd+bwd for provider ``name`` (gradients land in hidden.grad / weight.grad)."""
    from bs_kernels import bs_linear_loss

    if name in ("triton", "torch"):
        return lambda: bs_linear_loss(hidden, weight, labels, impl=name, accumulate_in_fp32=False).backward()
    if name == "triton-fp32acc":
        return lambda: bs_linear_loss(hidden, weight, labels, impl="triton").backward()
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss()
        shifted_hidden = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        shifted_labels = labels[:, 1:].reshape(-1)
        return lambda: liger_loss(weight, shifted_hidden, shifted_labels).backward()
    if name == "eager-ce":

        def eager():
            logits = F.linear(hidden, weight)[:, :-1]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1)).backward()

        return eager
    raise ValueError(f"unknown provider {name!r}")


def measure(name: str, args) -> dict:
    torch.cuda.empty_cache()
    dtype = getattr(torch, args.dtype)
    hidden, weight, labels = make_inputs(args.rows, args.hidden, args.vocab, dtype)
    step = provider_step(name, hidden, weight, labels)

    def clear():
        hidden.grad = None
        weight.grad = None

    for _ in range(args.warmup):
        step()
        clear()
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    torch.cuda.memory._record_memory_history(max_entries=100_000)
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    snapshot = torch.cuda.memory._snapshot()
    torch.cuda.memory._record_memory_history(enabled=None)
    largest_block = max(
        (event["size"] for trace in snapshot["device_traces"] for event in trace if event["action"] == "alloc"),
        default=0,
    )
    grad_bytes = sum(x.grad.numel() * x.grad.element_size() for x in (hidden, weight) if x.grad is not None)
    clear()

    times = []
    for _ in range(args.repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        clear()
    return {
        "ms": statistics.median(times),
        "extra_gib": (peak - baseline - grad_bytes) / 2**30,
        "largest_block_gib": largest_block / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--providers", default="liger,triton,triton-fp32acc,torch,eager-ce")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench_linear.py needs a CUDA GPU")

    nv_gib = args.rows * args.vocab * torch.tensor([], dtype=getattr(torch, args.dtype)).element_size() / 2**30
    print(f"\n### bs_linear_loss on {torch.cuda.get_device_name()}: N={args.rows}, H={args.hidden}, V={args.vocab}, "
          f"{args.dtype}; one [N, V] tensor = {nv_gib:.2f} GiB")  # fmt: skip
    print("| provider | fwd+bwd (ms) | vs liger | peak above inputs+grads (GiB) | largest block (GiB) |")
    print("|---|---|---|---|---|")
    results = {}
    for name in args.providers.split(","):
        try:
            results[name] = measure(name, args)
        except Exception as error:  # report and go on: one missing provider must not hide the others
            print(f"| {name} | failed: {type(error).__name__}: {str(error).splitlines()[0][:150]} | | | |")
            traceback.print_exc()
            continue
        result = results[name]
        ratio = f"{result['ms'] / results['liger']['ms']:.2f}x" if "liger" in results else "n/a"
        print(
            f"| {name} | {result['ms']:.1f} | {ratio} | {result['extra_gib']:.2f} | {result['largest_block_gib']:.2f} |"
        )


if __name__ == "__main__":
    main()
