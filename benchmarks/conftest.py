"""Collects every benchmark's peak memory and prints one table (time and memory side by side) at the end."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

_ROWS: list[dict] = []


def peak_memory(provider: str, batch: int, length: int, vocab: int, dtype: str, device: str, options: dict) -> dict:
    """Run measure_memory.py in a fresh process; glibc's mmap threshold is fixed so freed blocks leave the RSS."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [sys.executable, str(HERE / "measure_memory.py"), "--provider", provider, "--batch", str(batch)]
    command += ["--length", str(length), "--vocab", str(vocab), "--dtype", dtype, "--device", device]
    command += ["--options", json.dumps(options)]
    completed = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"memory measurement failed for {provider}:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.fixture
def record_row():
    def record(row: dict) -> None:
        _ROWS.append(row)

    return record


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    terminalreporter.write_sep("=", "bs_kernels: fwd+bwd time and peak memory above the inputs")
    header = f"{'shape':<24} {'provider':<20} {'median ms':>10} {'vs reference':>13} {'peak MiB':>10} {'x logits':>9}"
    terminalreporter.write_line(header)
    reference_ms = {row["shape"]: row["median_ms"] for row in _ROWS if row["provider"] == "reference"}
    for row in sorted(_ROWS, key=lambda r: (r["shape"], r["median_ms"])):
        speedup = reference_ms.get(row["shape"], float("nan")) / row["median_ms"]
        terminalreporter.write_line(
            f"{row['shape']:<24} {row['provider']:<20} {row['median_ms']:>10.1f} {speedup:>12.2f}x "
            f"{row['peak_mib']:>10.1f} {row['peak_vs_logits']:>9.2f}"
        )
