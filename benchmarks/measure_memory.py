"""Peak memory of one fwd+bwd step above the inputs, measured in a fresh process (one provider per process).

CPU: peak resident set size (VmHWM, reset through /proc/self/clear_refs after a warm-up step) minus the resident
size once the inputs exist. CUDA: torch.cuda.max_memory_allocated minus the allocation after the inputs exist.
Prints one JSON line: {"provider": ..., "peak_bytes_above_inputs": ..., "logits_bytes": ...}.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from providers import make_step  # noqa: E402


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_inputs(batch: int, length: int, vocab: int, dtype: torch.dtype, device: torch.device):
    generator = torch.Generator(device="cpu").manual_seed(0)
    logits = torch.randn(batch, length, vocab, generator=generator).to(device=device, dtype=dtype) * 3
    labels = torch.randint(0, vocab, (batch, length), generator=generator).to(device)
    labels[:, : length // 8] = -100  # a prompt
    return logits.requires_grad_(True), labels


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--provider", required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--length", type=int, required=True)
    parser.add_argument("--vocab", type=int, required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--options", default="{}", help="JSON of bs_token_loss options")
    args = parser.parse_args()
    device = torch.device(args.device)
    logits, labels = make_inputs(args.batch, args.length, args.vocab, getattr(torch, args.dtype), device)
    step = make_step(args.provider, json.loads(args.options))
    step(logits, labels)  # warm-up: compilation, lazy allocations
    logits.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(logits, labels)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        pathlib.Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        base = _status_kib("VmRSS") * 1024
        step(logits, labels)
        peak = _status_kib("VmHWM") * 1024 - base
    print(
        json.dumps(
            {
                "provider": args.provider,
                "peak_bytes_above_inputs": peak,
                "logits_bytes": logits.numel() * logits.element_size(),
            }
        )
    )


if __name__ == "__main__":
    main()
