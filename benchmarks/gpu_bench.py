"""Side-by-side benchmark of the BS-T loss on one CUDA GPU (issue 3), run by benchmarks/gpu_check.sh.

One process, one input, every provider in turn (names as the ``impl`` values where they are one):
  reference            bs_token_loss(impl="reference"): the authors' materialising formula (what users had)
  compiled_reference   torch.compile of it
  torch                bs_token_loss(impl="torch"), chunked PyTorch
  triton               bs_token_loss(impl="triton")
  triton_inplace       the same with inplace_backward=True (the gradient overwrites the logits)
  liger                Liger-Kernel's hard-label cross entropy (lam = 0 makes BS-T that work plus a top-k, so it
                       is the cost floor); it writes the gradient into the logits during its forward
Columns: forward ms and backward ms (CUDA events around each, median of --repeat after --warmup; inputs are
restored from a pristine copy outside the timed region for the providers that overwrite them), total, GB/s as one
read of the logits over the total, peak memory above the inputs (torch.cuda.max_memory_allocated during one
forward+backward minus what was allocated before it, as MiB and as a multiple of the logits' bytes), and the max
absolute error of the loss and of the gradient against float64 (impl="torch" on the upcast logits; for liger the
float64 token-mean cross entropy).
Also: the card's copy bandwidth (device-to-device copy of the logits, bytes read + written), forget_logprobs forward
alone against it, the two-pass floor (2 reads + 1 write of the logits at copy bandwidth), the issue's targets with
PASS/FAIL, and a sweep of the Triton block sizes (forward and backward launchers called directly).
Logits are random normal * 3 (never zeros); the shape (2 GiB of bf16 at the default) is far beyond L2, so one
buffer is reused.

    python benchmarks/gpu_bench.py                        # N = 8192, V = 128256, bf16, k = 20, lam = 0.2
    TRITON_INTERPRET=1 python benchmarks/gpu_bench.py --dry-run   # CPU, tiny shape: exercises the harness only
Writes bench.md and bench.json under --out (default benchmarks/results/<gpu name>/).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import pathlib
import re
import statistics
import sys
import time
import traceback

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PROVIDERS = ("reference", "compiled_reference", "torch", "triton", "triton_inplace", "liger")
MIB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences; N = batch * length positions")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--lam", type=float, default=0.2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--providers", default=",".join(PROVIDERS), help=f"comma-separated subset of {PROVIDERS}")
    parser.add_argument("--no-sweep", action="store_true", help="skip the Triton block-size sweep")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="results folder")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU under the Triton interpreter at a tiny shape (batch 2, length 8, V 300): checks the harness only",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.batch, args.length, args.vocab = 2, 8, 300
        args.warmup, args.repeat = 1, 2
    unknown = set(args.providers.split(",")) - set(PROVIDERS)
    if unknown:
        parser.error(f"unknown providers {sorted(unknown)}; choose from {PROVIDERS}")
    return args


class Timer:
    """Elapsed milliseconds between marks: CUDA events on the GPU (read after one synchronize), a host clock else."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def mark(self):
        if self.cuda:
            event = self.torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def elapsed_ms(self, start, end) -> float:
        if self.cuda:
            return start.elapsed_time(end)
        return (end - start) * 1e3


def median_ms(timer: Timer, fn, repeat: int, setup=None) -> float:
    times = []
    for _ in range(repeat):
        if setup is not None:
            setup()
        timer.sync()
        start = timer.mark()
        fn()
        end = timer.mark()
        timer.sync()
        times.append(timer.elapsed_ms(start, end))
    return statistics.median(times)


def max_abs_diff(actual, expected, rows_per_chunk: int = 512) -> float:
    """max |actual - expected| over [N, V] tensors, in row chunks (no [N, V] float64 temporary)."""
    worst = 0.0
    flat_actual = actual.reshape(-1, actual.shape[-1])
    flat_expected = expected.reshape(-1, expected.shape[-1])
    for start in range(0, flat_actual.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        diff = (flat_actual[rows].double() - flat_expected[rows].double()).abs().max().item()
        worst = max(worst, diff)
    return worst


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton reads this when the kernels are created, i.e. at the first launch (bs_kernels imports them lazily).
        os.environ["TRITON_INTERPRET"] = "1"
    sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "python")]

    import torch

    import bs_kernels
    from bs_kernels.backends import triton as triton_backend

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for a CPU check of the harness", file=sys.stderr)
        return 2
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    timer = Timer(device)
    rows, vocab = args.batch * args.length, args.vocab
    logits_bytes = rows * vocab * torch.tensor([], dtype=dtype).element_size()
    loss_options = dict(lam=args.lam, top_k=args.top_k, shift=False)

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "dry-run-cpu"
    triton_version = _triton_version()
    header = [
        f"device: {gpu_name}; torch {torch.__version__}; triton {triton_version}; "
        f"CUDA {torch.version.cuda}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"shape: N = {rows} positions ({args.batch} x {args.length}), V = {vocab}, {args.dtype}, k = {args.top_k}, "
        f"lam = {args.lam}, shift=False, reduction=sequence_mean; logits {logits_bytes / MIB:.0f} MiB; "
        f"median of {args.repeat} after {args.warmup} warm-up",
    ]
    print("\n".join(header), flush=True)

    # Inputs: random normal * 3 logits, labels with the first eighth of each sequence ignored (the prompt).
    generator = torch.Generator(device=device).manual_seed(0)
    base = (torch.randn(args.batch, args.length, vocab, device=device, generator=generator) * 3).to(dtype)
    labels = torch.randint(0, vocab, (args.batch, args.length), device=device, generator=generator)
    labels[:, : max(1, args.length // 8)] = -100

    exact = _exact(bs_kernels, base, labels, loss_options)
    selected = [name for name in PROVIDERS if name in args.providers.split(",")]
    results = []
    for name in selected:
        print(f"-- {name}", flush=True)
        try:
            results.append(_measure(name, args, bs_kernels, base, labels, loss_options, exact, timer, logits_bytes))
        except Exception as error:  # a provider that cannot run is reported, the others still run
            traceback.print_exc()
            results.append({"provider": name, "error": f"{type(error).__name__}: {error}"[:300]})
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    extra = _bandwidth_section(bs_kernels, base, labels, timer, logits_bytes, args)
    sweep = [] if args.no_sweep else _sweep(triton_backend, base, labels, timer, logits_bytes, args)
    report = _format(header, results, extra, sweep, logits_bytes)
    print(report, flush=True)

    out_dir = args.out
    if out_dir is None:
        if args.dry_run:
            out_dir = pathlib.Path("/tmp/bs_kernels_gpu_bench_dry_run")
        else:
            out_dir = REPO_ROOT / "benchmarks" / "results" / re.sub(r"[^A-Za-z0-9._-]+", "-", gpu_name).strip("-")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.md").write_text(report + "\n")
    payload = {"header": header, "results": results, "bandwidth": extra, "sweep": sweep, "args": vars(args)}
    (out_dir / "bench.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"wrote {out_dir / 'bench.md'} and bench.json", flush=True)
    return 0


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def _exact(bs_kernels, base, labels, loss_options):
    """float64 loss and gradient of BS-T and of the token-mean cross entropy (impl="torch", chunked)."""
    import torch

    x = base.double().requires_grad_(True)
    loss = bs_kernels.bs_token_loss(x, labels, impl="torch", **loss_options)
    (grad,) = torch.autograd.grad(loss, x)
    bs_exact = (loss.item(), grad.float())
    del grad
    valid = (labels != -100).sum().clamp(min=1)
    cross_entropy = -bs_kernels.forget_logprobs(x, labels, impl="torch", shift=False).sum() / valid
    (grad,) = torch.autograd.grad(cross_entropy, x)
    ce_exact = (cross_entropy.item(), grad.float())
    return {"bs": bs_exact, "ce": ce_exact}


def _forward_fn(name, bs_kernels, loss_options):
    """(forward(x, labels) -> scalar loss, overwrites its input, which exact result it computes)."""
    import torch

    if name in ("torch", "triton", "reference"):
        return functools.partial(bs_kernels.bs_token_loss, impl=name, **loss_options), False, "bs"
    if name == "triton_inplace":
        forward = functools.partial(bs_kernels.bs_token_loss, impl="triton", inplace_backward=True, **loss_options)
        return forward, True, "bs"
    if name == "compiled_reference":
        return torch.compile(functools.partial(bs_kernels.bs_token_loss, impl="reference", **loss_options)), False, "bs"
    if name == "liger":
        loss_fn = _liger_loss()

        def forward(x, labels):
            return loss_fn(x.view(-1, x.shape[-1]), labels.view(-1))

        return forward, True, "ce"
    raise ValueError(f"unknown provider {name!r}")


def _liger_loss():
    try:
        from liger_kernel.transformers.cross_entropy import LigerCrossEntropyLoss
    except ImportError as error:
        raise RuntimeError(
            f"Liger-Kernel is not importable ({error}); gpu_check.sh installs it from benchmarks/wheels/ or $WHEELS"
        ) from error
    return LigerCrossEntropyLoss(ignore_index=-100, reduction="mean")


def _measure(name, args, bs_kernels, base, labels, loss_options, exact, timer, logits_bytes):
    import torch

    if name == "liger" and base.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Liger-Kernel runs on CUDA (or on the CPU under TRITON_INTERPRET=1)")
    forward, overwrites_input, exact_key = _forward_fn(name, bs_kernels, loss_options)
    x = base.clone().requires_grad_(True)  # every provider gets its own copy of the logits

    def restore():
        x.grad = None
        if overwrites_input:
            with torch.no_grad():
                x.copy_(base)

    # Correctness on fresh logits.
    restore()
    loss = forward(x, labels)
    loss.backward()
    exact_loss, exact_grad = exact[exact_key]
    loss_error = abs(loss.double().item() - exact_loss)
    grad_error = max_abs_diff(x.grad, exact_grad)
    for _ in range(args.warmup):
        restore()
        forward(x, labels).backward()

    # Peak memory above the inputs during one forward + backward.
    restore()
    gc.collect()
    peak_mib = None
    if base.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        forward(x, labels).backward()
        torch.cuda.synchronize()
        peak_mib = (torch.cuda.max_memory_allocated() - before) / MIB

    forward_times, backward_times = [], []
    for _ in range(args.repeat):
        restore()
        timer.sync()
        start = timer.mark()
        loss = forward(x, labels)
        middle = timer.mark()
        loss.backward()
        end = timer.mark()
        timer.sync()
        forward_times.append(timer.elapsed_ms(start, middle))
        backward_times.append(timer.elapsed_ms(middle, end))
    x.grad = None
    forward_ms, backward_ms = statistics.median(forward_times), statistics.median(backward_times)
    total_ms = statistics.median([f + b for f, b in zip(forward_times, backward_times)])
    return {
        "provider": name,
        "fwd_ms": forward_ms,
        "bwd_ms": backward_ms,
        "total_ms": total_ms,
        "gbps": logits_bytes / (total_ms * 1e-3) / 1e9,
        "peak_mib": peak_mib,
        "peak_x_logits": None if peak_mib is None else peak_mib * MIB / logits_bytes,
        "loss_error": loss_error,
        "grad_error": grad_error,
        "against": "float64 BS-T" if exact_key == "bs" else "float64 cross entropy",
    }


def _bandwidth_section(bs_kernels, base, labels, timer, logits_bytes, args):
    """Copy bandwidth (read + write) and forget_logprobs' forward alone, per impl, against it."""
    import torch

    destination = torch.empty_like(base)
    for _ in range(args.warmup):
        destination.copy_(base)
    copy_ms = median_ms(timer, lambda: destination.copy_(base), max(args.repeat, 10))
    destination = None
    copy_gbps = 2 * logits_bytes / (copy_ms * 1e-3) / 1e9
    section = {"copy_ms": copy_ms, "copy_gbps": copy_gbps, "forget_logprobs": {}}
    for impl in ("torch", "triton"):
        try:

            def run(impl=impl):
                with torch.no_grad():
                    bs_kernels.forget_logprobs(base, labels, impl=impl, shift=False)

            for _ in range(args.warmup):
                run()
            ms = median_ms(timer, run, args.repeat)
            gbps = logits_bytes / (ms * 1e-3) / 1e9
            section["forget_logprobs"][impl] = {"ms": ms, "gbps": gbps, "fraction_of_copy": gbps / copy_gbps}
        except Exception as error:
            traceback.print_exc()
            section["forget_logprobs"][impl] = {"error": f"{type(error).__name__}: {error}"[:300]}
    section["two_pass_floor_ms"] = 3 * logits_bytes / (copy_gbps * 1e9) * 1e3
    return section


def _sweep(triton_backend, base, labels, timer, logits_bytes, args):
    """Forward and backward launchers at several block sizes / warp counts (rows as the loss sees them)."""
    import torch

    rows = base.reshape(-1, base.shape[-1])
    row_labels = labels.reshape(-1).clamp(min=-1)
    compute = torch.float32
    top_k = min(args.top_k, rows.shape[1])
    padded_k = 1 << max(0, (top_k - 1).bit_length())
    results = []
    # Each forward config compiles its own top-k network (seconds each): five of them fit the time budget.
    forward_configs = [(1024, 4), (2048, 4), (2048, 8), (4096, 8), (4096, 16)]
    if args.dry_run:
        forward_configs = forward_configs[:2]
    for block, warps in forward_configs:
        block = max(block, padded_k)
        config = triton_backend.ForwardConfig(
            block_v=block, buckets=min(block, max(padded_k, block // 16)), num_warps=warps
        )
        try:

            def run(config=config):
                triton_backend.forward(rows, row_labels, top_k, config=config)

            run()
            ms = median_ms(timer, run, args.repeat)
            results.append({"kernel": "forward", "config": repr(config), "ms": ms, "gbps": logits_bytes / ms / 1e6})
        except Exception as error:
            results.append(
                {"kernel": "forward", "config": repr(config), "error": f"{type(error).__name__}: {error}"[:200]}
            )
    raw = triton_backend.forward(rows, row_labels, top_k)
    grad_rows = torch.where(row_labels >= 0, 1.0 / max(1, int((row_labels >= 0).sum())), 0.0).to(compute)
    belief_weights = torch.full((rows.shape[0], top_k), args.lam / top_k, dtype=compute, device=rows.device)
    lse = torch.where(torch.isfinite(raw.lse), raw.lse, torch.zeros_like(raw.lse))
    backward_configs = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]
    if args.dry_run:
        backward_configs = backward_configs[:2]
    for block, warps in backward_configs:
        config = triton_backend.BackwardConfig(block_v=block, num_warps=warps)
        try:

            def run(config=config):
                triton_backend.backward(
                    grad_rows, rows, row_labels, lse, raw.belief_ids, belief_weights, 1 - args.lam, False, config=config
                )

            run()
            ms = median_ms(timer, run, args.repeat)
            # one read + one write of the logits
            results.append(
                {"kernel": "backward", "config": repr(config), "ms": ms, "gbps": 2 * logits_bytes / ms / 1e6}
            )
        except Exception as error:
            results.append(
                {"kernel": "backward", "config": repr(config), "error": f"{type(error).__name__}: {error}"[:200]}
            )
    return results


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _format(header, results, extra, sweep, logits_bytes) -> str:
    lines = ["## BS-T forward + backward, side by side", "", *[f"- {line}" for line in header], ""]
    lines += [
        "| provider | fwd ms | bwd ms | total ms | GB/s (1 read) | peak MiB above inputs | x logits | "
        "loss err | grad err | against |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    by_name = {}
    for result in results:
        if "error" in result:
            lines.append(f"| {result['provider']} | failed: {result['error']} |||||||||")
            continue
        by_name[result["provider"]] = result
        lines.append(
            f"| {result['provider']} | {result['fwd_ms']:.3f} | {result['bwd_ms']:.3f} | {result['total_ms']:.3f} | "
            f"{result['gbps']:.0f} | {_fmt(result['peak_mib'], '.1f')} | {_fmt(result['peak_x_logits'], '.3f')} | "
            f"{result['loss_error']:.2e} | {result['grad_error']:.2e} | {result['against']} |"
        )
    lines += ["", "## Bandwidth", ""]
    lines.append(
        f"- copy: {extra['copy_ms']:.3f} ms for {logits_bytes / MIB:.0f} MiB, {extra['copy_gbps']:.0f} GB/s "
        "(read + write)"
    )
    for impl, numbers in extra["forget_logprobs"].items():
        if "error" in numbers:
            lines.append(f"- forget_logprobs forward, impl={impl}: failed: {numbers['error']}")
        else:
            lines.append(
                f"- forget_logprobs forward, impl={impl}: {numbers['ms']:.3f} ms, {numbers['gbps']:.0f} GB/s "
                f"= {numbers['fraction_of_copy']:.0%} of copy bandwidth"
            )
    lines.append(f"- two-pass floor (2 reads + 1 write at copy bandwidth): {extra['two_pass_floor_ms']:.3f} ms")

    lines += ["", "## Targets (issue 3)", ""]
    triton = by_name.get("triton")
    checks = []
    if triton:
        liger, reference = by_name.get("liger"), by_name.get("reference")
        if liger:
            checks.append(("fwd+bwd <= 1.2x liger", triton["total_ms"] / liger["total_ms"], 1.2, "<="))
        if reference:
            checks.append(("reference / triton >= 15x", reference["total_ms"] / triton["total_ms"], 15, ">="))
        checks.append(("fwd+bwd <= 2x two-pass floor", triton["total_ms"] / extra["two_pass_floor_ms"], 2, "<="))
        if triton["peak_x_logits"] is not None:
            checks.append(("peak <= 1.05x logits (out of place)", triton["peak_x_logits"], 1.05, "<="))
    inplace = by_name.get("triton_inplace")
    if inplace and inplace["peak_mib"] is not None:
        checks.append(("peak < 64 MiB (inplace_backward)", inplace["peak_mib"], 64, "<"))
    forget = extra["forget_logprobs"].get("triton", {})
    if "fraction_of_copy" in forget:
        checks.append(("forget_logprobs fwd >= 70% of copy bandwidth", forget["fraction_of_copy"], 0.7, ">="))
    for label, value, bound, op in checks:
        passed = {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[op]
        lines.append(f"- {label}: {value:.3f} -> {'PASS' if passed else 'FAIL'}")
    if not checks:
        lines.append("- no target could be evaluated (providers missing)")

    if sweep:
        lines += ["", "## Triton launcher sweep", "", "| kernel | config | ms | GB/s |", "|---|---|---|---|"]
        for row in sweep:
            if "error" in row:
                lines.append(f"| {row['kernel']} | {row['config']} | failed: {row['error']} | |")
            else:
                lines.append(f"| {row['kernel']} | {row['config']} | {row['ms']:.3f} | {row['gbps']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
