"""Logits case on one CUDA GPU: every provider side by side in one process, plus bandwidth and a launcher sweep.

Run by benchmarks/gpu_check.sh. Providers (providers.py), in the order they run: triton, triton:inplace, liger, torch,
reference, compile (the slow ones last, torch.compile's reference last of all: its compilation takes the longest,
and a timeout then costs only its row). Each provider's row is printed, and bench.md / bench.json rewritten, as soon
as it is measured, so a run cut short keeps every number it got to. A missing Liger-Kernel is said in a loud line at
the top of the output and of bench.md.
Columns: forward ms and backward ms (harness.time_bench: median of --repeat after --warmup; providers that overwrite
the logits get them back from a pristine copy outside the timing), total, GB/s as one read of the logits over the
total, peak memory above the inputs (harness.measure_peak: torch.cuda.max_memory_allocated during one forward +
backward minus what was allocated before it, as MiB and as a multiple of the logits' bytes), and the max absolute
error of the loss and of the gradient against float64 (impl="torch" on the upcast logits; for liger the float64
token-mean cross entropy).
Also: the card's copy bandwidth (device-to-device copy of the logits, bytes read + written), forget_logprobs forward
alone against it, the two-pass floor (2 reads + 1 write of the logits at copy bandwidth), the targets with
PASS/FAIL, and a sweep of the Triton block sizes (forward and backward launchers called directly), including the
forward on 256 to 2048 rows (the fused lm_head's chunks): the launcher's choice beside the per-lane and the
split-vocabulary forwards forced.
Logits are random normal * 3 (never zeros); the shape (2 GiB of bf16 at the default) is far beyond L2, so one
buffer is reused.

    python benchmarks/bench_loss_gpu.py                        # N = 8192, V = 128256, bf16, k = 20, lam = 0.2
    TRITON_INTERPRET=1 python benchmarks/bench_loss_gpu.py --dry-run   # CPU, tiny shape: exercises the script only
Writes bench.md and bench.json under --out (default benchmarks/results/<gpu name>/).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import pathlib
import re
import sys
import traceback

import torch
from harness import MIB, Bench, cell, gbps, markdown_table, measure_peak, tensor_bytes, time_bench, write_report
from providers import logits_bench, logits_inputs, logits_provider, provider_list, unavailable

import bs_kernels
from bs_kernels.backends import triton_plan as plan

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
PROVIDERS = ("triton", "triton:inplace", "liger", "torch", "reference", "compile")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8, help="sequences; N = batch * length positions")
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128_256)
    parser.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--lam", type=float, default=0.2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument(
        "--providers",
        type=provider_list(PROVIDERS),
        default=",".join(PROVIDERS),
        help=f"comma-separated, from {', '.join(PROVIDERS)}",
    )
    parser.add_argument("--no-sweep", action="store_true", help="skip the Triton block-size sweep")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="results folder")
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="CPU under the Triton interpreter at a tiny shape (batch 2, length 8, V 300): checks the script only",
    )
    args = parser.parse_args(argv)
    if args.dry_run:
        args.batch, args.length, args.vocab = 2, 8, 300
        args.warmup, args.repeat = 1, 2
    return args


def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor, rows_per_chunk: int = 512) -> float:
    """max |actual - expected| over [N, V] tensors, in row chunks (no [N, V] float64 temporary)."""
    worst = 0.0
    flat_actual = actual.reshape(-1, actual.shape[-1])
    flat_expected = expected.reshape(-1, expected.shape[-1])
    for start in range(0, flat_actual.shape[0], rows_per_chunk):
        rows = slice(start, start + rows_per_chunk)
        worst = max(worst, (flat_actual[rows].double() - flat_expected[rows].double()).abs().max().item())
    return worst


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        # Triton reads this when the kernels are created, i.e. at the first launch (bs_kernels imports them lazily).
        os.environ["TRITON_INTERPRET"] = "1"
    from bs_kernels.backends import triton_launch as triton_backend

    device = torch.device("cpu" if args.dry_run else "cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run for a CPU check of the script", file=sys.stderr)
        return 2
    rows, vocab = args.batch * args.length, args.vocab
    loss_options = dict(lam=args.lam, top_k=args.top_k, shift=False)
    logits, labels = logits_inputs(args.batch, args.length, vocab, DTYPES[args.dtype], device)
    base = logits.detach()  # pristine logits: every provider gets its own copy
    del logits
    logits_bytes = tensor_bytes(base)

    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "dry-run-cpu"
    header = [
        f"device: {gpu_name}; torch {torch.__version__}; triton {_triton_version()}; "
        f"CUDA {torch.version.cuda}; {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"shape: N = {rows} positions ({args.batch} x {args.length}), V = {vocab}, {args.dtype}, k = {args.top_k}, "
        f"lam = {args.lam}, shift=False, reduction=sequence_mean; logits {logits_bytes / MIB:.0f} MiB; "
        f"median of {args.repeat} after {args.warmup} warm-up",
        f"triton forward at this shape: "
        f"{triton_backend.forward_config(vocab, args.top_k, rows, DTYPES[args.dtype].itemsize)!r}",
    ]
    liger_missing = unavailable("liger", device) if "liger" in args.providers else None
    if liger_missing is not None:
        header.insert(0, f"!!! LIGER-KERNEL IS MISSING: no liger row, no 'vs liger' target ({liger_missing})")
    print("\n".join(header), flush=True)

    out_dir = args.out
    if out_dir is None:
        if args.dry_run:
            out_dir = pathlib.Path("/tmp/bs_kernels_gpu_bench_dry_run")
        else:
            out_dir = REPO_ROOT / "benchmarks" / "results" / re.sub(r"[^A-Za-z0-9._-]+", "-", gpu_name).strip("-")
    results: list[dict] = []
    extra: dict = {}
    sweep: list[dict] = []

    def save() -> str:
        """Rewrite bench.md and bench.json with everything measured so far (a timeout keeps what was done)."""
        report = _format(header, results, extra, sweep, logits_bytes)
        payload = {"header": header, "results": results, "bandwidth": extra, "sweep": sweep, "args": vars(args)}
        write_report(out_dir, "bench", report, payload)
        return report

    exact = _exact(base, labels, loss_options)
    for name in (name for name in PROVIDERS if name in args.providers):
        print(f"-- {name}", flush=True)
        reason = unavailable(name, device)
        if reason is not None:
            results.append({"provider": name, "error": f"skipped: {reason}"})
        else:
            try:
                results.append(_measure(name, args, base, labels, loss_options, exact, logits_bytes))
            except Exception as error:  # a provider that cannot run is reported, the others still run
                traceback.print_exc()
                results.append({"provider": name, "error": f"failed: {type(error).__name__}: {error}"[:300]})
        print(_provider_line(results[-1]), flush=True)
        save()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    extra.update(_bandwidth_section(base, labels, logits_bytes, args))
    save()
    if not args.no_sweep:
        _sweep(triton_backend, base, labels, logits_bytes, args, sweep, on_row=lambda: save())
    report = save()
    print(report, flush=True)
    print(f"wrote {out_dir / 'bench.md'} and bench.json", flush=True)
    return 0


def _provider_line(result: dict) -> str:
    if "error" in result:
        return f"{result['provider']}: {result['error']}"
    return (
        f"{result['provider']}: fwd {result['fwd_ms']:.3f} ms, bwd {result['bwd_ms']:.3f} ms, total "
        f"{result['total_ms']:.3f} ms, {result['gbps']:.0f} GB/s, peak {cell(result['peak_mib'], '.1f')} MiB, "
        f"loss err {result['loss_error']:.2e}, grad err {result['grad_error']:.2e}"
    )


def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:
        return "not installed"


def _exact(base: torch.Tensor, labels: torch.Tensor, loss_options: dict) -> dict:
    """float64 loss and gradient of BS-T and of the token-mean cross entropy (impl="torch", chunked)."""
    x = base.double().requires_grad_(True)
    loss = bs_kernels.bs_token_loss(x, labels, impl="torch", **loss_options)
    (grad,) = torch.autograd.grad(loss, x)
    bs_t = (loss.item(), grad.float())
    del grad
    valid = (labels != -100).sum().clamp(min=1)
    cross_entropy = -bs_kernels.forget_logprobs(x, labels, impl="torch", shift=False).sum() / valid
    (grad,) = torch.autograd.grad(cross_entropy, x)
    return {"bs_t": bs_t, "cross_entropy": (cross_entropy.item(), grad.float())}


def _measure(name, args, base, labels, loss_options, exact, logits_bytes) -> dict:
    provider = logits_provider(name, loss_options)
    x = base.clone().requires_grad_(True)
    bench = logits_bench(provider, x, labels, pristine=base)

    # Correctness on fresh logits.
    bench.reset()
    loss = bench.run()
    exact_loss, exact_grad = exact[provider.objective]
    loss_error = abs(loss.double().item() - exact_loss)
    grad_error = max_abs_diff(x.grad, exact_grad)

    timing = time_bench(bench, base.device, rounds=args.repeat, warmup=args.warmup)
    peak_mib = None
    if base.device.type == "cuda":
        peak_mib = measure_peak(bench, base.device).above_inputs / MIB
    return {
        "provider": name,
        "fwd_ms": timing.median_forward_ms,
        "bwd_ms": timing.median_backward_ms,
        "total_ms": timing.median_ms,
        "gbps": gbps(logits_bytes, timing.median_ms),
        "peak_mib": peak_mib,
        "peak_x_logits": None if peak_mib is None else peak_mib * MIB / logits_bytes,
        "loss_error": loss_error,
        "grad_error": grad_error,
        "against": f"float64 {'BS-T' if provider.objective == 'bs_t' else 'cross entropy'}",
    }


def _bandwidth_section(base, labels, logits_bytes, args) -> dict:
    """Copy bandwidth (read + write) and forget_logprobs' forward alone, per impl, against it."""
    destination = torch.empty_like(base)
    copy_ms = time_bench(
        Bench(lambda: destination.copy_(base)), base.device, rounds=max(args.repeat, 10), warmup=args.warmup
    ).median_ms
    destination = None  # frees the buffer (the lambda holds the variable, not the tensor)
    copy_gbps = gbps(2 * logits_bytes, copy_ms)
    section = {"copy_ms": copy_ms, "copy_gbps": copy_gbps, "forget_logprobs": {}}
    for impl in ("torch", "triton"):
        try:

            def forward(impl=impl):
                with torch.no_grad():
                    return bs_kernels.forget_logprobs(base, labels, impl=impl, shift=False)

            ms = time_bench(Bench(forward), base.device, rounds=args.repeat, warmup=args.warmup).median_ms
            bandwidth = gbps(logits_bytes, ms)
            section["forget_logprobs"][impl] = {"ms": ms, "gbps": bandwidth, "fraction_of_copy": bandwidth / copy_gbps}
        except Exception as error:
            traceback.print_exc()
            section["forget_logprobs"][impl] = {"error": f"{type(error).__name__}: {error}"[:300]}
    section["two_pass_floor_ms"] = 3 * logits_bytes / (copy_gbps * 1e9) * 1e3
    return section


def _sweep(triton_backend, base, labels, logits_bytes, args, results: list[dict], on_row) -> None:
    """Forward and backward launchers at several block sizes / warp counts (rows as the loss sees them), appended to
    ``results`` one by one (``on_row`` is called after each)."""
    rows = base.reshape(-1, base.shape[-1])
    row_labels = labels.reshape(-1).clamp(min=-1)
    top_k = min(args.top_k, rows.shape[1])
    padded_k = 1 << max(0, (top_k - 1).bit_length())

    def timed(kernel: str, config, launch, bytes_moved: int) -> None:
        try:
            ms = time_bench(Bench(launch), base.device, rounds=args.repeat).median_ms
            results.append({"kernel": kernel, "config": repr(config), "ms": ms, "gbps": gbps(bytes_moved, ms)})
        except Exception as error:
            results.append(
                {"kernel": kernel, "config": repr(config), "error": f"{type(error).__name__}: {error}"[:200]}
            )
        print(f"sweep {results[-1]}", flush=True)
        on_row()

    # The per-lane forward (the default at this N) first, then the bucket forward; each bucket config compiles its
    # own top-k network (seconds each): four of them fit the time budget.
    lane_configs = [(2, 1), (4, 1), (8, 1), (4, 2)]
    configs = [triton_backend.LaneForwardConfig(groups=groups, num_warps=warps) for groups, warps in lane_configs]
    for block, warps in [(1024, 4), (2048, 8), (4096, 8), (4096, 16)]:
        block = max(block, padded_k)
        buckets = min(block, max(padded_k, block // 16))
        configs.append(triton_backend.ForwardConfig(block_v=block, buckets=buckets, num_warps=warps))
    for config in configs[:1] + configs[4:5] if args.dry_run else configs:
        timed(
            "forward",
            config,
            lambda config=config: triton_backend.forward(rows, row_labels, top_k, config=config),
            logits_bytes,
        )

    _few_rows_sweep(triton_backend, rows, row_labels, top_k, args, timed)

    raw = triton_backend.forward(rows, row_labels, top_k)
    grad_rows = torch.where(row_labels >= 0, 1.0 / max(1, int((row_labels >= 0).sum())), 0.0).to(torch.float32)
    belief_weights = torch.full((rows.shape[0], top_k), args.lam / top_k, dtype=torch.float32, device=rows.device)
    finite = torch.isfinite(raw.row_max) & torch.isfinite(raw.log_sum)
    row_max = torch.where(finite, raw.row_max, torch.zeros_like(raw.row_max))
    log_sum = torch.where(finite, raw.log_sum, torch.zeros_like(raw.log_sum))
    backward_configs = [(2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16)]
    for block, warps in backward_configs[:2] if args.dry_run else backward_configs:
        config = triton_backend.BackwardConfig(block_v=block, num_warps=warps)

        def launch(config=config):
            return triton_backend.backward(
                grad_rows,
                rows,
                row_labels,
                row_max,
                log_sum,
                raw.belief_ids,
                belief_weights,
                1 - args.lam,
                False,
                config=config,
            )

        timed("backward", config, launch, 2 * logits_bytes)  # one read + one write of the logits


def _few_rows_sweep(triton_backend, rows, row_labels, top_k: int, args, timed) -> None:
    """The forward on the first N rows, N as in the fused lm_head's chunks (256 to 2048), at k and at k = 0: the
    launcher's choice (its config in the row), then each path forced: the per-lane kernel with 4, 8 and 16 groups
    and the split-vocabulary forward with 2 to 4 slices of 8-group blocks."""
    deep = plan.LANES_DEEP
    forced = [plan.LANES_DEFAULT, deep, plan.LANES_DEEPER]
    forced += [triton_backend.SplitForwardConfig(deep, s) for s in (2, 3, 4)]
    counts = (8, 16) if args.dry_run else (256, 512, 1024, 2048)
    for count in counts:
        subset, subset_labels = rows[:count], row_labels[:count]
        for k in dict.fromkeys((top_k, 0)):
            chosen = triton_backend.forward_config(subset.shape[1], k, count, subset.element_size())
            for label, config in [("launcher", None), *(("forced", config) for config in forced)]:
                if args.dry_run and label == "forced" and config not in (deep, forced[3]):  # 8 groups, 2 slices
                    continue

                def launch(config=config, k=k, subset=subset, subset_labels=subset_labels):
                    return triton_backend.forward(subset, subset_labels, k, config=config)

                shown = chosen if config is None else config
                timed(f"forward N={count} k={k} ({label})", shown, launch, tensor_bytes(subset))


def _targets(by_name: dict, extra: dict) -> list[str]:
    triton = by_name.get("triton")
    checks = []
    if triton:
        liger, reference = by_name.get("liger"), by_name.get("reference")
        if liger:
            checks.append(("fwd+bwd <= 1.2x liger", triton["total_ms"] / liger["total_ms"], 1.2, "<="))
        if reference:
            checks.append(("reference / triton >= 15x", reference["total_ms"] / triton["total_ms"], 15, ">="))
        if "two_pass_floor_ms" in extra:
            floor = extra["two_pass_floor_ms"]
            checks.append(("fwd+bwd <= 2x two-pass floor", triton["total_ms"] / floor, 2, "<="))
        if triton["peak_x_logits"] is not None:
            checks.append(("peak <= 1.05x logits (out of place)", triton["peak_x_logits"], 1.05, "<="))
    inplace = by_name.get("triton:inplace")
    if inplace and inplace["peak_mib"] is not None:
        checks.append(("peak < 64 MiB (triton:inplace)", inplace["peak_mib"], 64, "<"))
    forget = extra.get("forget_logprobs", {}).get("triton", {})
    if "fraction_of_copy" in forget:
        checks.append(("forget_logprobs fwd >= 70% of copy bandwidth", forget["fraction_of_copy"], 0.7, ">="))
    lines = []
    for label, value, bound, op in checks:
        passed = {"<=": value <= bound, ">=": value >= bound, "<": value < bound}[op]
        lines.append(f"- {label}: {value:.3f} -> {'PASS' if passed else 'FAIL'}")
    return lines or ["- no target could be evaluated (providers missing)"]


def _format(header, results, extra, sweep, logits_bytes) -> str:
    rows, by_name = [], {}
    for result in results:
        if "error" in result:
            rows.append([result["provider"], result["error"], *[""] * 8])
            continue
        by_name[result["provider"]] = result
        rows.append(
            [result["provider"], f"{result['fwd_ms']:.3f}", f"{result['bwd_ms']:.3f}", f"{result['total_ms']:.3f}",
             f"{result['gbps']:.0f}", cell(result["peak_mib"], ".1f"), cell(result["peak_x_logits"], ".3f"),
             f"{result['loss_error']:.2e}", f"{result['grad_error']:.2e}", result["against"]]
        )  # fmt: skip
    lines = ["## BS-T forward + backward, side by side", "", *[f"- {line}" for line in header], ""]
    lines += markdown_table(
        ["provider", "fwd ms", "bwd ms", "total ms", "GB/s (1 read)", "peak MiB above inputs", "x logits",
         "loss err", "grad err", "against"], rows,
    )  # fmt: skip
    lines += ["", "## Bandwidth", ""]
    if not extra:
        lines.append("- not measured yet")
    else:
        lines += _bandwidth_lines(extra, logits_bytes)
    lines += ["", "## Targets", "", *_targets(by_name, extra)]
    if sweep:
        sweep_rows = [
            [row["kernel"], row["config"], f"failed: {row['error']}", ""]
            if "error" in row
            else [row["kernel"], row["config"], f"{row['ms']:.3f}", f"{row['gbps']:.0f}"]
            for row in sweep
        ]
        lines += ["", "## Triton launcher sweep", "", *markdown_table(["kernel", "config", "ms", "GB/s"], sweep_rows)]
    return "\n".join(lines)


def _bandwidth_lines(extra: dict, logits_bytes: int) -> list[str]:
    lines = []
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
    return lines


if __name__ == "__main__":
    sys.exit(main())
