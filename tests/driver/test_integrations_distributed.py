"""Scale-out of the drop-ins on CPU (gloo, 2 processes via torchrun) against a single-process run of the same job.

- DDP through transformers.Trainer (the BST trainer, 3 steps).
- FSDP2 ``fully_shard`` (decoder layers + root unit holding the lm_head) with the fused terms in a plain loop: the
  fused linear loss receives the unsharded lm_head weight inside the root unit's forward.
The worker is tests/driver/integration_distributed_worker.py (its "ddp" mode, plain DistributedDataParallel with the
fused terms, also works; the Trainer case covers DDP here). float64, so the runs agree to rounding. The single-process
reference runs inside the test process (no second interpreter start-up).
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import subprocess
import sys

import pytest

WORKER = pathlib.Path(__file__).resolve().parent / "integration_distributed_worker.py"
pytestmark = pytest.mark.multiprocess


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _run_two_processes(mode: str, output: pathlib.Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
        str(WORKER),
        mode,
        str(output),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return json.loads(output.read_text())


@pytest.mark.parametrize("mode", ["trainer", "fsdp2"])
def test_two_processes_match_one(tmp_path, mode):
    import integration_distributed_worker as worker

    single = {"trainer": worker.run_trainer, "fsdp2": worker.run_fsdp2}[mode](1)
    distributed = _run_two_processes(mode, tmp_path / "distributed.json")
    assert len(single["losses"]) == 3
    # The job moves: the losses change from step to step, so equal trajectories mean equal updates.
    assert len(set(single["losses"])) == 3
    assert distributed["losses"] == pytest.approx(single["losses"], rel=1e-9, abs=1e-10)
    assert distributed["checksum"] == pytest.approx(single["checksum"], rel=1e-12)


def test_bss_under_ddp_shares_one_belief_set(tmp_path):
    """BSS on 2 processes: each samples a shard of the forget prompts, all end with the same complete set."""
    result = _run_two_processes("bss", tmp_path / "bss.json")
    assert result["prompts"] == 4 and result["beliefs_per_prompt"] == [2]
    assert result["same_belief_set_everywhere"]
    assert len(result["losses"]) == 2 and all(abs(loss) < 1e3 for loss in result["losses"])


def test_deepspeed_zero3_fused_matches_stock(tmp_path):
    """ZeRO-3 partitions the lm_head weight; the fused call must gather it and follow the stock ZeRO-3 run."""
    pytest.importorskip("deepspeed")
    result = _run_two_processes("zero3", tmp_path / "zero3.json")
    assert len(set(result["stock_losses"])) == 3
    assert result["losses"] == pytest.approx(result["stock_losses"], rel=1e-5, abs=1e-6)
