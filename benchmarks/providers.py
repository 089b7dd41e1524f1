"""Benchmark providers: the package's backends and the baselines they are compared with, under one naming scheme.

A provider's name is ``base`` or ``base:variant``:
- ``base`` is an ``impl`` value (``reference``, ``torch``, ``native``, ``triton``: the package's entry point called
  with that impl and its defaults) or a peer: ``compile`` (torch.compile of the reference), ``liger``
  (Liger-Kernel), ``eager`` (linear case: the logits materialised by F.linear, then a loss on them).
- ``variant`` names the one thing that differs from the base.

Logits case, a loss of logits [B, T, V] and labels [B, T] (``bs_token_loss``):
  reference        impl="reference": the authors' materialising formula, what users had before
  compile          torch.compile of the reference
  torch, native, triton   impl=...
  native:avx2      native with its kernels capped to AVX2+FMA (BS_KERNELS_NATIVE_ISA=avx2): machines without AVX-512
  native:sse2      native capped to the SSE2 baseline (BS_KERNELS_NATIVE_ISA=default)
  native:two-pass  native without the one-pass gradient (BS_KERNELS_NATIVE_TWO_PASS=1, bs_kernels/one_pass.py):
                   forward reads the logits, backward reads them again and writes the gradient
  native:no-pool   native with every gradient in fresh memory (BS_KERNELS_NATIVE_GRAD_POOL=0): what it cost before
                   the kernels kept the last freed gradient's block for the next (csrc/bs_token_native.cpp)
  triton:inplace   triton with inplace_backward=True: the gradient overwrites the logits
  liger            Liger-Kernel's hard-label cross entropy (CUDA; it writes the gradient into the logits during its
                   forward). lam = 0 makes BS-T that work plus a top-k, so it is the cost floor.
Linear case, a loss of hidden [B, T, H], the lm_head weight [V, H] and labels [B, T] (``bs_linear_loss``):
  reference        impl="reference": logits = hidden @ weight.T, then the reference loss (the eager BS-T)
  eager:torch      materialised logits, then bs_token_loss(impl="torch"): what the logits kernels alone buy
  eager:ce         materialised logits, then F.cross_entropy in float32: the hard-label path of Hugging Face models
  torch, native, triton   impl=...: gradients formed in forward, 3 GEMMs per chunk
  torch:recompute  impl="torch", reduction="none", token mean taken outside: backward recomputes the logits (4 GEMMs)
  native:two-pass  impl="native", each chunk's gradient formed by a second pass over it (BS_KERNELS_NATIVE_TWO_PASS=1)
  torch:no-fp32-acc, triton:no-fp32-acc   accumulate_in_fp32=False: grad_W summed in the weight's dtype, as Liger does
  liger            Liger-Kernel's fused linear cross entropy (CUDA)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F
from harness import Bench, loss_backward, tensor_bytes

import bs_kernels
from bs_kernels.one_pass import TWO_PASS_ENV

LOGITS_PROVIDERS = (
    "reference",
    "compile",
    "torch",
    "native",
    "native:two-pass",
    "native:no-pool",
    "native:avx2",
    "native:sse2",
    "triton",
    "triton:inplace",
    "liger",
)
LINEAR_PROVIDERS = (
    "reference",
    "eager:torch",
    "eager:ce",
    "torch",
    "torch:recompute",
    "torch:no-fp32-acc",
    "native",
    "native:two-pass",
    "triton",
    "triton:no-fp32-acc",
    "liger",
)
OPTIONS = {"lam": 0.2, "top_k": 20}
NATIVE_ISA = {"avx2": "avx2", "sse2": "default"}  # variant -> BS_KERNELS_NATIVE_ISA
NO_POOL = {"BS_KERNELS_NATIVE_GRAD_POOL": "0"}

# (batch, length, vocab): SmolLM2's and Llama-3's vocabularies; 1 024 positions at V = 128 256 keep the reference's
# ~7 GB of float32 temporaries within a 24 GiB machine.
LOGITS_SHAPES = {"smollm2": (4, 512, 49_152), "llama3": (2, 512, 128_256)}
# (batch, length, hidden, vocab): SmolLM2-135M's lm_head.
LINEAR_SHAPES = {"smollm2": (8, 512, 576, 49_152)}
TINY_LOGITS_SHAPES = {"tiny": (2, 32, 4_096)}
TINY_LINEAR_SHAPES = {"tiny": (2, 32, 64, 4_096)}
PROMPT_FRACTION = 8  # the first length // 8 labels of each sequence are ignored (-100), as a prompt is


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    loss: Callable[..., torch.Tensor]  # logits case: (logits, labels); linear case: (hidden, weight, labels)
    objective: str = "bs_t"  # or "cross_entropy": the exact loss it is checked against
    overwrites_input: bool = False  # writes the gradient into the logits: restore them before every call
    environ: dict[str, str] = dataclasses.field(default_factory=dict)


def unavailable(name: str, device: torch.device | str) -> str | None:
    """None if provider ``name`` can run on ``device``, else why not."""
    device = torch.device(device)
    base = name.partition(":")[0]
    if base in ("reference", "compile", "eager"):
        return None
    if base == "liger":
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return "Liger-Kernel runs on CUDA (or on the CPU under TRITON_INTERPRET=1)"
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
        return None
    return bs_kernels.unavailable_reason(base, device)


def _unknown(name: str, names: tuple[str, ...]) -> ValueError:
    return ValueError(f"unknown provider {name!r}; choose from {', '.join(names)}")


def provider_list(names: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse ``type``: comma-separated provider names, each one of ``names``."""

    def parse(text: str) -> list[str]:
        chosen = text.split(",")
        unknown = [name for name in chosen if name not in names]
        if unknown:
            raise argparse.ArgumentTypeError(f"unknown providers {unknown}; choose from {', '.join(names)}")
        return chosen

    return parse


def logits_provider(name: str, options: dict | None = None) -> Provider:
    """Provider ``name`` of the logits case; ``options`` are bs_token_loss keyword arguments (lam, top_k, shift)."""
    options = dict(OPTIONS if options is None else options)
    base, _, variant = name.partition(":")
    if name in ("reference", "torch", "native", "triton"):
        return Provider(name, functools.partial(bs_kernels.bs_token_loss, impl=name, **options))
    if base == "native" and variant in NATIVE_ISA:
        loss = functools.partial(bs_kernels.bs_token_loss, impl="native", **options)
        return Provider(name, loss, environ={"BS_KERNELS_NATIVE_ISA": NATIVE_ISA[variant]})
    if name == "native:two-pass":
        loss = functools.partial(bs_kernels.bs_token_loss, impl="native", **options)
        return Provider(name, loss, environ={TWO_PASS_ENV: "1"})
    if name == "native:no-pool":
        return Provider(name, functools.partial(bs_kernels.bs_token_loss, impl="native", **options), environ=NO_POOL)
    if name == "triton:inplace":
        loss = functools.partial(bs_kernels.bs_token_loss, impl="triton", inplace_backward=True, **options)
        return Provider(name, loss, overwrites_input=True)
    if name == "compile":
        return Provider(name, torch.compile(functools.partial(bs_kernels.bs_token_loss, impl="reference", **options)))
    if name == "liger":
        return Provider(name, _liger_cross_entropy(options), objective="cross_entropy", overwrites_input=True)
    raise _unknown(name, LOGITS_PROVIDERS)


def _liger_cross_entropy(options: dict) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    from liger_kernel.transformers import LigerCrossEntropyLoss

    ignore_index = options.get("ignore_index", -100)
    loss_fn = LigerCrossEntropyLoss(ignore_index=ignore_index, reduction="mean")

    def loss(logits, labels):
        if options.get("shift", True):  # position t predicts label t + 1; the last position has none
            labels = torch.cat([labels[..., 1:], torch.full_like(labels[..., :1], ignore_index)], dim=-1)
        return loss_fn(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

    return loss


def linear_provider(name: str, options: dict | None = None) -> Provider:
    """Provider ``name`` of the linear case; ``options`` are bs_linear_loss keyword arguments (lam, top_k)."""
    options = dict(OPTIONS if options is None else options)
    base, _, variant = name.partition(":")
    if name in ("reference", "torch", "native", "triton"):
        return Provider(name, functools.partial(bs_kernels.bs_linear_loss, impl=name, **options))
    if name == "native:two-pass":
        loss = functools.partial(bs_kernels.bs_linear_loss, impl="native", **options)
        return Provider(name, loss, environ={TWO_PASS_ENV: "1"})
    if base in ("torch", "triton") and variant == "no-fp32-acc":
        return Provider(
            name, functools.partial(bs_kernels.bs_linear_loss, impl=base, accumulate_in_fp32=False, **options)
        )
    if name == "torch:recompute":

        def recompute(hidden, weight, labels):
            values = bs_kernels.bs_linear_loss(hidden, weight, labels, impl="torch", reduction="none", **options)
            return values.sum() / (labels[:, 1:] != -100).sum()

        return Provider(name, recompute)
    if name == "eager:torch":

        def eager_torch(hidden, weight, labels):
            return bs_kernels.bs_token_loss(F.linear(hidden, weight), labels, impl="torch", **options)

        return Provider(name, eager_torch)
    if name == "eager:ce":

        def eager_ce(hidden, weight, labels):
            logits = F.linear(hidden, weight)[:, :-1]
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1))

        return Provider(name, eager_ce, objective="cross_entropy")
    if name == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger_loss = LigerFusedLinearCrossEntropyLoss()

        def liger(hidden, weight, labels):
            return liger_loss(weight, hidden[:, :-1].reshape(-1, hidden.shape[-1]), labels[:, 1:].reshape(-1))

        return Provider(name, liger, objective="cross_entropy")
    raise _unknown(name, LINEAR_PROVIDERS)


def _labels(batch: int, length: int, vocab: int, generator: torch.Generator, device) -> torch.Tensor:
    labels = torch.randint(0, vocab, (batch, length), generator=generator, device=device)
    labels[:, : max(1, length // PROMPT_FRACTION)] = -100
    return labels


def logits_inputs(batch: int, length: int, vocab: int, dtype=torch.float32, device="cpu", seed: int = 0):
    """logits [B, T, V] = randn * 3 (requires grad; never zeros, so no shortcut applies) and labels [B, T]."""
    generator = torch.Generator(device=device).manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=generator, device=device) * 3).to(dtype)
    return logits.requires_grad_(True), _labels(batch, length, vocab, generator, device)


def linear_inputs(batch: int, length: int, hidden_size: int, vocab: int, dtype=torch.float32, device="cpu", seed=0):
    """hidden [B, T, H] = randn, weight [V, H] = randn / sqrt(H) (so the logits are O(1)), labels [B, T]."""
    generator = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(batch, length, hidden_size, generator=generator, device=device).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=generator, device=device) / hidden_size**0.5).to(dtype)
    labels = _labels(batch, length, vocab, generator, device)
    return hidden.requires_grad_(True), weight.requires_grad_(True), labels


def logits_bench(provider: Provider, logits: torch.Tensor, labels: torch.Tensor, pristine=None) -> Bench:
    """fwd+bwd of ``provider`` on these logits; a provider that overwrites them gets them back from ``pristine``
    (a copy made here when not given) before every call."""
    if provider.overwrites_input and pristine is None:
        pristine = logits.detach().clone()

    def reset():
        logits.grad = None
        if provider.overwrites_input:
            with torch.no_grad():
                logits.copy_(pristine)

    return Bench(
        forward=lambda: provider.loss(logits, labels),
        backward=loss_backward,
        reset=reset,
        environ=provider.environ,
        grad_bytes=tensor_bytes(logits),
    )


def linear_bench(provider: Provider, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor) -> Bench:
    def reset():
        hidden.grad = None
        weight.grad = None

    return Bench(
        forward=lambda: provider.loss(hidden, weight, labels),
        backward=loss_backward,
        reset=reset,
        environ=provider.environ,
        grad_bytes=tensor_bytes(hidden, weight),
    )


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name)


def logits_case(provider: str, batch: int, length: int, vocab: int, dtype="float32", device="cpu", options=None):
    """A Bench from plain arguments: what harness.peak_memory rebuilds in a fresh process."""
    logits, labels = logits_inputs(batch, length, vocab, _dtype(dtype), device)
    return logits_bench(logits_provider(provider, options), logits, labels)


def linear_case(
    provider: str, batch: int, length: int, hidden: int, vocab: int, dtype="float32", device="cpu", options=None
):
    """A Bench from plain arguments: what harness.peak_memory rebuilds in a fresh process."""
    inputs = linear_inputs(batch, length, hidden, vocab, _dtype(dtype), device)
    return linear_bench(linear_provider(provider, options), *inputs)
