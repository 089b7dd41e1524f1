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
    """Start ``world`` processes, run the selected cases in each, return the per-rank {case: None | traceback}.

    Only the cases this session runs (``-k`` narrows them) are started: a full run takes every case.
    """
    world = request.param
    selected = sorted(
        {
            item.callspec.params["case"]
            for item in request.session.items
            if item.module is request.module and hasattr(item, "callspec") and "case" in item.callspec.params
        }
    )
    with tempfile.TemporaryDirectory() as folder:
        rendezvous = pathlib.Path(folder) / "rendezvous"
        mp.start_processes(
            vocab_parallel_worker.run,
            args=(world, str(rendezvous), IMPLS, TOLERANCE_TABLE, folder, selected),
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


def test_call_record_names_what_differs():
    """The record every call exchanges first (bs_kernels/_vocab_call.py), without processes: what differs is named
    with each rank's value, a failed rank's message survives the trip (cut at 256 bytes, never mid-character)."""
    from bs_kernels import _vocab_call as call
    from bs_kernels._options import BSOptions

    labels = torch.arange(2 * 3 * 4 * 5 * 6 * 7 * 2).reshape(2, 3, 4, 5, 6, 7, 2) % 11

    def record(**changes):
        fields = dict(
            form="logits", dtype=torch.float32, shift=False, hidden_size=0, options=BSOptions(), labels=labels
        )
        fields.update(changes)
        return call.ready_record(0, 11, call.CallRecord(**fields), torch.device("cpu")).tolist()

    assert call.RECORD_LENGTH * 8 == 424  # the bytes README and vocab_parallel.py state
    assert call.disagreements([record(), record()]) == []
    found = call.disagreements([record(), record(options=BSOptions(lam=0.5, top_k=3)), record(dtype=torch.float64)])
    assert found == [
        "dtype (rank 0: torch.float32, rank 1: torch.float32, rank 2: torch.float64)",
        "top_k (rank 0: 20, rank 1: 3, rank 2: 20)",
        "lam (rank 0: 0.2, rank 1: 0.5, rank 2: 0.2)",
    ], found
    swapped = labels.flatten().roll(1).reshape(labels.shape)
    (checksum,) = call.disagreements([record(), record(labels=swapped)])
    assert checksum.startswith("labels (a checksum of their values)"), checksum
    (shape,) = call.disagreements([record(), record(labels=labels.reshape(2, 3, 4, 5, 6, 14))])
    assert (
        shape == "labels shape (the batch) (rank 0: 7-D (2, 3, 4, 5, 6, ... product 14), rank 1: (2, 3, 4, 5, 6, 14))"
    )

    error = ValueError("labels contains é " + "x" * 300)
    failed = call.failed_record(error, torch.device("cpu")).tolist()
    assert len(failed) == call.RECORD_LENGTH and failed[0] == 1
    text = call.failure_text(failed)
    assert text.startswith("ValueError: labels contains é xx") and len(text.encode()) <= 256, text
    assert call.failure_text(record()) is None
