"""A 2-process DDP run (gloo, CPU, via torchrun) gives the same loss curve as one process with the same global batch."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from driver_fixtures import make_tiny_setup

SCRIPT = pathlib.Path(__file__).with_name("driver_ddp_run.py")


def _torchrun(nproc: int, setup: pathlib.Path, out: pathlib.Path, per_device_batch: int, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    command += [str(SCRIPT), str(setup), str(out), str(per_device_batch), *extra]
    # A new session, so that on a timeout the launcher and its workers can be killed together (no orphans).
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    try:
        stdout, stderr = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise
    assert process.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.multiprocess
def test_two_process_ddp_matches_single_process(tmp_path):
    setup = tmp_path / "setup"
    make_tiny_setup(setup)
    single = _torchrun(1, setup, tmp_path / "single.json", 4)
    double = _torchrun(2, setup, tmp_path / "double.json", 2, "--bs-s")
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert len(single["loss"]) == 4
    # The tiny answers all have the same length, so the mean of per-process means is the global mean.
    assert double["loss"] == pytest.approx(single["loss"], abs=1e-5, rel=1e-5)
    assert double["forget_logprob"] == pytest.approx(single["forget_logprob"], abs=1e-5)
    # BS-S under DDP: each process samples a shard; after the exchange all hold the same full belief set.
    assert double["beliefs_per_prompt"] == [3]
    assert len(set(double["belief_fingerprints"])) == 1
