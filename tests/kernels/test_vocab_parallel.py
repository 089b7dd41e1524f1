"""Vocabulary-parallel BS-T (bs_kernels/vocab_parallel.py, bs_kernels/dtensor.py) on 2 and 4 CPU processes (gloo).

The processes start once per group size (spawning costs seconds; each case takes milliseconds), run every case of
vocab_parallel_worker.CASES and report per case; each test here asserts one case on every rank. The cases compare
against the single-process loss on the gathered logits with the same backend: values, gradients, stats, every
reduction, detached and attached beliefs, temperature != 1, k beyond one shard, V not divisible by the group size,
empty shards, labels on every shard, fully ignored rows, -inf logits, the fused lm_head form, the bytes
communicated, and (2 processes) a tiny Llama whose lm_head is ColwiseParallel.
"""

from __future__ import annotations

import json
import pathlib
import tempfile

import pytest
import torch
import torch.multiprocessing as mp
import vocab_parallel_worker
from conftest import KERNEL_IMPLS, TOLERANCES

import bs_kernels

if not torch.distributed.is_available():
    pytest.skip("torch.distributed is not available in this build", allow_module_level=True)

pytestmark = pytest.mark.multiprocess
IMPLS = [name for name in KERNEL_IMPLS if bs_kernels.unavailable_reason(name, torch.device("cpu")) is None]
TOLERANCE_TABLE = {"float64": TOLERANCES[torch.float64], "float32": TOLERANCES[torch.float32]}


@pytest.fixture(scope="module", params=[2, 4], ids=lambda world: f"{world}proc")
def world_results(request):
    """Start ``world`` processes, run every case in each, return the per-rank {case: None | traceback}."""
    world = request.param
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = pathlib.Path(folder) / "rendezvous"
        mp.start_processes(
            vocab_parallel_worker.run,
            args=(world, str(rendezvous), IMPLS, TOLERANCE_TABLE, folder),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        ranks = [json.loads((pathlib.Path(folder) / f"rank{rank}.json").read_text()) for rank in range(world)]
    return world, ranks


@pytest.mark.parametrize("case", list(vocab_parallel_worker.CASES))
def test_case(world_results, case):
    world, ranks = world_results
    failures = [
        f"rank {rank}:\n{report['results'][case]}"
        for rank, report in enumerate(ranks)
        if report["results"].get(case, "case did not run") is not None
    ]
    assert not failures, f"{case} on {world} processes failed:\n" + "\n".join(failures)
