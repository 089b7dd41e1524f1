"""Run by tests/driver/test_ddp.py under torchrun: unlearn the tiny setup and write rank 0's loss curve as JSON.

    torchrun --nproc_per_node N tests/driver/driver_ddp_run.py SETUP_DIR OUT_JSON PER_DEVICE_BATCH [--bs-s]

The global batch is N * PER_DEVICE_BATCH; runs with the same global batch must give the same loss curve. With
--bs-s it also runs two BS-S steps (beliefs sampled in shards across processes and exchanged) and records, per
process, a fingerprint of the belief set, which must agree across processes.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import torch
from bs_unlearn import BeliefConfig, ObjectiveConfig, UnlearnConfig, unlearn


def main() -> None:
    setup, out_path, per_device_batch = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
    common = dict(
        forget=str(setup / "forget.jsonl"),
        retain=str(setup / "retain.jsonl"),
        model=str(setup / "model"),
        batch_size=per_device_batch,
        lr=5e-3,
        progress=False,
    )
    result = unlearn(UnlearnConfig(objective=ObjectiveConfig(method="graddiff"), max_steps=4, **common))
    record = {
        "world_size": int(os.environ.get("WORLD_SIZE", "1")),
        "loss": [entry["loss"] for entry in result.log_history if "loss" in entry],
        "forget_logprob": [entry["forget_logprob"] for entry in result.log_history if "loss" in entry],
    }
    if "--bs-s" in sys.argv:
        bs_s = unlearn(
            UnlearnConfig(
                objective=ObjectiveConfig(method="bs-s"), beliefs=BeliefConfig(max_new_tokens=4), max_steps=2, **common
            )
        )
        beliefs = bs_s.trainer.train_dataset.beliefs
        fingerprint = sum(sum(b["input_ids"]) * (i + 1) for i, s in enumerate(beliefs) for b in s)
        fingerprints = [None] * record["world_size"]
        if torch.distributed.is_initialized():
            torch.distributed.all_gather_object(fingerprints, fingerprint)
        else:
            fingerprints = [fingerprint]
        record["belief_fingerprints"] = fingerprints
        record["beliefs_per_prompt"] = sorted({len(s) for s in beliefs})
    if int(os.environ.get("RANK", "0")) == 0:
        out_path.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
