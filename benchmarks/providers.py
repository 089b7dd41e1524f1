"""Benchmark providers for the BS-T loss, named like the ``impl`` values, plus the baselines users compare with.

Each provider is ``make(options) -> step`` where ``step(logits, labels)`` runs forward + backward once.
"reference" is what users had before (the authors' materialising formula), "compiled_reference" is
torch.compile of it, "torch"/"native"/"triton" are the package's backends, "liger" is Liger-Kernel's hard-label cross
entropy (CUDA only; lam = 0 makes BS-T that work plus a top-k, so it is the cost floor).
"""

from __future__ import annotations

import functools

import torch

import bs_kernels


def _impl_step(impl: str, options: dict):
    def step(logits, labels):
        loss = bs_kernels.bs_token_loss(logits, labels, impl=impl, **options)
        loss.backward()
        return loss

    return step


def _compiled_reference_step(options: dict):
    compiled = torch.compile(functools.partial(bs_kernels.bs_token_loss, impl="reference", **options))

    def step(logits, labels):
        loss = compiled(logits, labels)
        loss.backward()
        return loss

    return step


def _liger_step(options: dict):
    from liger_kernel.transformers import LigerCrossEntropyLoss

    loss_fn = LigerCrossEntropyLoss(ignore_index=-100)

    def step(logits, labels):
        vocab = logits.shape[-1]
        shifted = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
        loss = loss_fn(logits.reshape(-1, vocab), shifted.reshape(-1))
        loss.backward()
        return loss

    return step


def available(name: str, device: torch.device) -> str | None:
    """None if the provider can run on ``device``, else why not."""
    if name in ("reference", "compiled_reference"):
        return None
    if name == "liger":
        if device.type != "cuda":
            return "Liger-Kernel runs on CUDA only"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
        return None
    return bs_kernels.unavailable_reason(name, device)


def make_step(name: str, options: dict):
    if name == "compiled_reference":
        return _compiled_reference_step(options)
    if name == "liger":
        return _liger_step(options)
    return _impl_step(name, options)


PROVIDERS = ("reference", "compiled_reference", "torch", "native", "triton", "liger")
