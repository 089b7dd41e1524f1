"""Loss terms of a Hugging Face causal LM from a batch, by default without its [B, T, V] logits.

The building blocks of the driver's objectives and of the drop-ins. Each function takes the (possibly DDP / FSDP /
DeepSpeed / PEFT-wrapped) model and a batch ``{"input_ids", "attention_mask", "labels"}`` ([B, T], labels -100 where
a position does not count) and returns the same value as the stock computation over materialised logits:

    bs_t_forget_loss(model, batch)        mean <t, log pi>, t = lam * q_topk + (1 - lam) * e_y   (BS-T; minimise)
    answer_logprob_loss(model, batch)     mean log p(label)   (gradient ascent's term; -it is the stock HF NLL)
    answer_token_logprobs(model, batch)   per-token log p(label) [B, T - 1] (NPO-style sequence sums)

How: ``bs_kernels.patch_causal_lm`` gives the causal LM a forward that, called with ``bs_loss=...``, runs only the
decoder and hands its last hidden state and the lm_head weight to ``bs_kernels.linear.bs_linear_loss``, so the
logits exist one row chunk at a time (bs_kernels/linear.py). The call still goes through every wrapper's forward
(DDP's hooks, FSDP's unsharding, DeepSpeed's gather of the head weight, PEFT's adapters). With ``fused=False``, and
for architectures the patch refuses (logit soft-capping, scaling, router losses), they compute ``model(...).logits``
and call ``bs_token_loss`` / ``forget_logprobs``: the same values, with the logits materialised.

``fused_labelled_calls(model)`` is the generic switch used by :class:`FusedLossMixin`: inside it, every
``model(..., labels=labels)`` call returns the stock token-mean NLL computed this way (and ``logits=None``).
"""

from __future__ import annotations

import contextlib
import functools

import torch

import bs_kernels
from bs_kernels.hf import patch_causal_lm

from ..fused import fused_model


def _model_inputs(batch: dict) -> dict:
    """The forward arguments of a batch (open-unlearning batches may carry extra keys such as ``index``)."""
    for name in ("input_ids", "labels"):
        if name not in batch:
            raise ValueError(f"batch needs {name!r}; got keys {sorted(batch)}")
    inputs = {"input_ids": batch["input_ids"], "labels": batch["labels"]}
    if batch.get("attention_mask") is not None:
        inputs["attention_mask"] = batch["attention_mask"]
    return inputs


def logits_of(model, batch: dict) -> torch.Tensor:
    """The materialised logits [B, T, V] of a batch (no labels passed, so the model adds no loss of its own)."""
    inputs = _model_inputs(batch)
    without_labels = {key: value for key, value in inputs.items() if key != "labels"}
    return model(**without_labels, use_cache=False).logits


def bs_t_forget_loss(
    model,
    batch: dict,
    *,
    lam: float = 0.2,
    top_k: int = 20,
    detach_belief: bool = True,
    belief_temperature: float = 1.0,
    reduction: str = "sequence_mean",
    impl: str = "auto",
    return_stats: bool = False,
    fused: bool = True,
):
    """The BS-T forget term <t, log pi> reduced over the answer tokens (<= 0, minimised).

    Same value and gradients as ``bs_kernels.bs_token_loss(model(**batch).logits, batch["labels"], ...)``.
    With ``return_stats`` also returns the BSTokenStats (per-position log p(label), belief ids and probs).
    ``fused=False`` takes the materialised-logits path.
    """
    inputs = _model_inputs(batch)
    options = dict(
        lam=lam,
        top_k=top_k,
        detach_belief=detach_belief,
        belief_temperature=belief_temperature,
        reduction=reduction,
        impl=impl,
        return_stats=return_stats,
    )
    if fused_model(model, fused):
        output = model(**inputs, use_cache=False, bs_loss=options)
        return (output.loss, output.bs_stats) if return_stats else output.loss
    return bs_kernels.bs_token_loss(logits_of(model, inputs), inputs["labels"], **options)


def answer_token_logprobs(model, batch: dict, *, impl: str = "auto", fused: bool = True) -> torch.Tensor:
    """Per-token log p(label) [B, T - 1] (0 where the shifted label is ignored), differentiable."""
    inputs = _model_inputs(batch)
    if fused_model(model, fused):
        # lam = 0 makes the BS-T value the plain log p(label); top_k = 1 keeps the unused top-k selection cheap.
        output = model(**inputs, use_cache=False, bs_loss=dict(lam=0.0, top_k=1, reduction="none", impl=impl))
        return output.loss
    return bs_kernels.forget_logprobs(logits_of(model, inputs), inputs["labels"], impl=impl)


def answer_logprob_loss(
    model, batch: dict, *, reduction: str = "token_mean", impl: str = "auto", fused: bool = True
) -> torch.Tensor:
    """Mean log p(label) over the answer tokens (token_mean: the Hugging Face pooled mean, i.e. -(stock NLL)).

    This is gradient ascent's forget term as open-unlearning writes it (``-model(**forget).loss``).
    """
    inputs = _model_inputs(batch)
    if fused_model(model, fused):
        output = model(**inputs, use_cache=False, bs_loss=dict(lam=0.0, top_k=1, reduction=reduction, impl=impl))
        return output.loss
    return bs_kernels.bs_token_loss(
        logits_of(model, inputs), inputs["labels"], lam=0.0, top_k=1, reduction=reduction, impl=impl
    )


def _stock_nll_forward(patched_forward, impl: str):
    """A forward that computes the stock causal-LM loss of a labelled call through the fused path."""

    @functools.wraps(patched_forward)
    def forward(*args, **kwargs):
        if kwargs.get("labels") is None or kwargs.get("bs_loss") is not None:
            return patched_forward(*args, **kwargs)
        # The stock loss: sum of -log p over valid shifted labels / num_items_in_batch when the Trainer passes it
        # (gradient-accumulation-aware), else their mean.
        num_items = kwargs.pop("num_items_in_batch", None)
        reduction = "token_mean" if num_items is None else "sum"
        output = patched_forward(*args, bs_loss=dict(lam=0.0, top_k=1, reduction=reduction, impl=impl), **kwargs)
        loss = -output.loss
        if num_items is not None:
            loss = loss / torch.as_tensor(num_items, device=loss.device, dtype=loss.dtype)
        output.loss = loss
        return output

    return forward


@contextlib.contextmanager
def fused_labelled_calls(model, *, impl: str = "auto"):
    """Within the context, ``model(..., labels=labels)`` returns the stock NLL (same value and gradients) computed
    without logits; the output's ``logits`` is None. Calls without labels are unchanged.

    Only for code that reads ``outputs.loss`` of its labelled calls (open-unlearning's GradAscent and GradDiff with
    the NLL retain term do); code that reads ``outputs.logits`` of a labelled call must use the functions above.
    Raises ValueError/TypeError (from patch_causal_lm) for an architecture the fused path does not support.
    """
    handle = patch_causal_lm(model)
    causal_lm = handle.causal_lm
    patched_forward = causal_lm.__dict__["forward"]
    causal_lm.forward = _stock_nll_forward(patched_forward, impl)
    try:
        yield
    finally:
        causal_lm.forward = patched_forward
