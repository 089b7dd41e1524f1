"""Vocabulary-parallel BS-T on CPU processes (gloo) against the single-process loss at the same total vocabulary.

    python benchmarks/bench_vocab_parallel_cpu.py                        # llama3 shape (B=2, T=512, V=128 256)
    python benchmarks/bench_vocab_parallel_cpu.py --worlds 2 --rounds 3 --impl torch
    python benchmarks/bench_vocab_parallel_cpu.py --shape tiny --rounds 2  # a check that it runs

One table: fwd+bwd (loss.backward()) of bs_token_loss on the full [B, T, V] logits in one process, then of
vocab_parallel_bs_token_loss on P processes each holding [B, T, V / P] (one thread per process, so P processes use
P cores). Per rank: best and median wall time and the median process CPU time over the rounds (harness.time_bench, every
rank timed in lock step; the CPU time is the steadier figure on a shared machine),
the peak resident memory above the inputs of one call (harness.measure_peak in each freshly started rank; the
single process through harness.peak_memory, also a fresh process; the gradient of the logits is included), and the
bytes each rank sent in one call's collectives (counted by wrapping them). On one machine the collectives go through
loopback TCP (gloo), so the time says little about a real tensor-parallel group; the memory and bytes do carry over.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from harness import MIB, Bench, loss_backward, markdown_table, measure_peak, peak_memory, tensor_bytes, time_bench
from providers import LOGITS_SHAPES, OPTIONS, PROMPT_FRACTION, TINY_LOGITS_SHAPES, logits_case

import bs_kernels
import bs_kernels._vocab_shards as vocab_shards

SHAPES = {**LOGITS_SHAPES, **TINY_LOGITS_SHAPES}
CPU = torch.device("cpu")


def shard_inputs(batch: int, length: int, vocab: int, rank: int, world: int):
    """This rank's [B, T, V_p] logits (randn * 3, like providers.logits_inputs), its start, and the shared labels."""
    chunk = -(-vocab // world)
    start = min(rank * chunk, vocab)
    size = max(0, min(chunk, vocab - start))
    generator = torch.Generator().manual_seed(1000 + rank)
    local = (torch.randn(batch, length, size, generator=generator) * 3).requires_grad_(True)
    labels = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))  # same on all
    labels[:, : max(1, length // PROMPT_FRACTION)] = -100  # the prompt, as in providers.logits_inputs
    return local, start, labels


def bytes_sent_per_call(bench: Bench) -> int:
    """Run one call with the package's all_gather and torch.distributed's all_reduce counted; bytes this rank sent."""
    sent = []
    gather, reduce = vocab_shards.all_gather_single, dist.all_reduce

    def counted_gather(output, tensor, group=None):
        sent.append(tensor.numel() * tensor.element_size())
        return gather(output, tensor, group=group)

    def counted_reduce(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return reduce(tensor, *args, **kwargs)

    vocab_shards.all_gather_single, dist.all_reduce = counted_gather, counted_reduce
    try:
        bench.reset()
        bench.run()
    finally:
        vocab_shards.all_gather_single, dist.all_reduce = gather, reduce
    return sum(sent)


def rank_main(rank: int, world: int, rendezvous: str, shape: str, impl: str, rounds: int, output: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    batch, length, vocab = SHAPES[shape]
    local, start, labels = shard_inputs(batch, length, vocab, rank, world)

    def reset():
        local.grad = None

    bench = Bench(
        forward=lambda: bs_kernels.vocab_parallel_bs_token_loss(local, labels, start, impl=impl, **OPTIONS),
        backward=loss_backward,
        reset=reset,
    )
    memory = measure_peak(bench, CPU)  # first: this process is fresh, so no freed pages are reused
    dist.barrier()
    timing = time_bench(bench, CPU, rounds=rounds)
    sent = bytes_sent_per_call(bench)
    result = dict(
        rank=rank,
        best_ms=timing.best_ms,
        median_ms=timing.median_ms,
        cpu_ms=timing.median_cpu_ms,
        peak=memory.above_inputs,
        local_bytes=tensor_bytes(local),
        sent=sent,
        loss=memory.value,
    )
    results = [None] * world
    dist.all_gather_object(results, result)
    if rank == 0:
        pathlib.Path(output).write_text(json.dumps(results))
    dist.destroy_process_group()


def parallel_rows(world: int, shape: str, impl: str, rounds: int) -> list[list[str]]:
    with tempfile.TemporaryDirectory() as folder:
        output = os.path.join(folder, "results.json")
        mp.start_processes(
            rank_main,
            args=(world, os.path.join(folder, "rendezvous"), shape, impl, rounds, output),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        results = json.loads(pathlib.Path(output).read_text())
    return [
        [f"vocab-parallel {impl}, P={world}, rank {r['rank']}", f"{r['best_ms']:.0f}", f"{r['median_ms']:.0f}",
         f"{r['cpu_ms']:.0f}", f"{r['peak'] / MIB:.0f}", f"{r['peak'] / r['local_bytes']:.2f}",
         f"{r['sent'] / 1024:.1f}"]
        for r in results
    ]  # fmt: skip


def single_row(shape: str, impl: str, rounds: int) -> list[str]:
    from providers import logits_bench, logits_inputs, logits_provider

    batch, length, vocab = SHAPES[shape]
    torch.set_num_threads(1)
    logits, labels = logits_inputs(batch, length, vocab, torch.float32, CPU)
    timing = time_bench(logits_bench(logits_provider(impl, OPTIONS), logits, labels), CPU, rounds=rounds)
    case = dict(provider=impl, batch=batch, length=length, vocab=vocab, options=OPTIONS)
    peak = peak_memory(logits_case, case, CPU).above_inputs
    return [f"single process {impl}", f"{timing.best_ms:.0f}", f"{timing.median_ms:.0f}", f"{timing.median_cpu_ms:.0f}",
            f"{peak / MIB:.0f}",
            f"{peak / tensor_bytes(logits):.2f}", "0"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama3", choices=list(SHAPES))
    parser.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--impl", default="native", choices=["torch", "native"])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    reason = bs_kernels.unavailable_reason(args.impl, CPU)
    if reason is not None:
        sys.exit(reason)
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # as harness.peak_memory: freed large blocks leave the RSS
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    load_before = os.getloadavg()
    rows = [single_row(args.shape, args.impl, args.rounds)]
    for world in args.worlds:
        rows += parallel_rows(world, args.shape, args.impl, args.rounds)
    load_after = os.getloadavg()
    batch, length, vocab = SHAPES[args.shape]
    header = (
        f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, 1 thread per process; load average {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
    )
    title = (
        f"fwd+bwd, B={batch} T={length} V={vocab} fp32, k={OPTIONS['top_k']} lam={OPTIONS['lam']}, "
        f"rounds: {args.rounds}"
    )
    table = markdown_table(
        ["what (per rank)", "best ms", "median ms", "median CPU ms", "peak above inputs (MiB)", "x its logits",
         "KiB sent per call"],
        rows,
    )  # fmt: skip
    print("\n".join([header, "", title, "", *table]))


if __name__ == "__main__":
    main()
