"""Hugging Face causal LMs: the BS-T loss computed from the final hidden states inside the model's own forward.

    handle = bs_kernels.patch_causal_lm(model)          # model may be wrapped by PEFT / DDP / FSDP / DeepSpeed
    out = model(input_ids, attention_mask=mask, labels=labels, bs_loss=dict(lam=0.2, top_k=20))
    out.loss.backward()                                  # out.logits is None: [B, T, V] never existed
    handle.remove()                                      # or: with bs_kernels.patch_causal_lm(model): ...

How: the causal LM inside any wrappers gets an instance-level ``forward`` that, only when called with ``bs_loss``,
runs the decoder (``model.base_model``), then :func:`bs_kernels.linear.bs_linear_loss` on its last hidden state and
the output embedding's weight (and bias); without ``bs_loss`` it is the original forward, unchanged. Because the
loss runs inside the causal LM's forward, a wrapper's forward (DDP's gradient hooks, FSDP's unsharding, DeepSpeed's
engine, PEFT's adapters) runs around it exactly as it does for the stock loss. Under DeepSpeed ZeRO-3 the head
weight is registered as an external parameter of the causal LM, so ZeRO-3 gathers it around that forward.

Only architectures whose logits are exactly ``lm_head(last_hidden_state)`` are accepted (_ARCHITECTURES): models
that scale or soft-cap the logits (Gemma 2, Cohere, Granite) or add router losses (Mixtral) would silently get a
different loss, so they raise instead. Limits: with FSDP, keep the lm_head in the root (or the decoder's) FSDP unit
rather than wrapping it alone, since its forward is never called; a LoRA adapter on the lm_head itself is refused.

transformers is imported lazily, only when a patched model builds its output.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import types
from typing import Any

from torch import nn

from .linear import bs_linear_loss

# model_type values whose causal LM computes logits = lm_head(last_hidden_state) and a plain CE loss on them
# (checked against transformers' modeling files): the fused loss is then exactly the stock computation.
_ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "smollm3", "phi3", "olmo2", "gpt2", "gpt_neox"})

# bs_linear_loss options a caller may pass through ``bs_loss=dict(...)``.
_LOSS_OPTIONS = frozenset(
    {
        "lam",
        "top_k",
        "ignore_index",
        "reduction",
        "detach_belief",
        "belief_temperature",
        "impl",
        "return_stats",
        "accumulate_in_fp32",
    }
)
# Arguments of the causal LM's forward that concern its logits or its own loss, never the decoder.
_HEAD_ARGUMENTS = ("labels", "logits_to_keep", "num_logits_to_keep", "return_dict", "shift_labels")


def _unwrap_causal_lm(model: nn.Module) -> nn.Module:
    """The Hugging Face causal LM inside DDP/FSDP/DeepSpeed (``.module``), torch.compile (``._orig_mod``) and PEFT.

    Wrappers are peeled before the model test because FSDP, DeepSpeed's engine and torch.compile forward unknown
    attributes (``config``, ``get_output_embeddings``) to the module they wrap: patching the wrapper itself would
    compute the loss outside the wrapper's forward.
    """
    current = model
    for _ in range(16):
        if _is_peft(current):
            current = current.get_base_model()
            continue
        inner = getattr(current, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(current, "_orig_mod", None)
        if isinstance(inner, nn.Module) and inner is not current:
            current = inner
            continue
        break
    if hasattr(current, "config") and callable(getattr(current, "get_output_embeddings", None)):
        return current
    raise TypeError(
        f"patch_causal_lm needs a Hugging Face causal LM (optionally wrapped by PEFT, DDP, FSDP, DeepSpeed or "
        f"torch.compile); got {type(model).__name__}"
    )


def _is_peft(module: nn.Module) -> bool:
    return hasattr(module, "get_base_model") and hasattr(module, "peft_config")


def _check_architecture(causal_lm: nn.Module) -> None:
    model_type = getattr(causal_lm.config, "model_type", None)
    if model_type not in _ARCHITECTURES:
        raise ValueError(
            f"patch_causal_lm does not support model_type={model_type!r} ({type(causal_lm).__name__}); supported: "
            f"{sorted(_ARCHITECTURES)}. Others may transform the logits (soft-capping, scaling) or add losses, which "
            "the fused loss would silently drop."
        )
    head = causal_lm.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise TypeError(
            f"the output embedding of {type(causal_lm).__name__} is a {type(head).__name__}, not an nn.Linear "
            "(an adapter or quantised layer on the lm_head?); the fused loss needs the plain weight"
        )


@functools.cache
def _output_class():
    """CausalLMOutputWithPast plus the BS-T stats (created on first use so that transformers is imported lazily)."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    @dataclasses.dataclass
    class BSCausalLMOutput(CausalLMOutputWithPast):
        """``loss`` from bs_linear_loss, ``logits`` None, ``bs_stats`` a BSTokenStats when return_stats=True."""

        bs_stats: Any = None

    return BSCausalLMOutput


def _loss_options(bs_loss: object) -> dict:
    if bs_loss is True:
        return {}
    if not isinstance(bs_loss, dict):
        raise TypeError(f"bs_loss must be True or a dict of bs_linear_loss options, got {bs_loss!r}")
    unknown = set(bs_loss) - _LOSS_OPTIONS
    if unknown:
        raise TypeError(f"bs_loss has unknown options {sorted(unknown)}; allowed: {sorted(_LOSS_OPTIONS)}")
    return dict(bs_loss)


def _bs_forward(causal_lm: nn.Module, original_forward, bs_loss, args, kwargs):
    """Decoder -> last hidden state -> bs_linear_loss with the head weight; a causal-LM output with logits=None."""
    options = _loss_options(bs_loss)
    bound = inspect.signature(original_forward).bind(*args, **kwargs)
    arguments = dict(bound.arguments)
    for name, parameter in inspect.signature(original_forward).parameters.items():
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and name in arguments:
            arguments.update(arguments.pop(name))
    head_arguments = {name: arguments.pop(name, None) for name in _HEAD_ARGUMENTS}
    labels, shift = head_arguments["labels"], True
    if head_arguments["shift_labels"] is not None:  # already shifted (e.g. by sequence parallelism)
        labels, shift = head_arguments["shift_labels"], False
    if labels is None:
        raise ValueError("bs_loss needs labels (or shift_labels): the loss is computed from them")

    decoder_outputs = causal_lm.base_model(**arguments)
    hidden = decoder_outputs[0]  # last_hidden_state, [B, T, H]
    head = causal_lm.get_output_embeddings()
    _register_with_zero3(causal_lm, head)
    result = bs_linear_loss(hidden, head.weight, labels, bias=head.bias, shift=shift, **options)
    loss, stats = result if options.get("return_stats") else (result, None)

    output_class = _output_class()
    fields = {field.name for field in dataclasses.fields(output_class)}
    # The decoder's cache, hidden states and attentions pass through (a tuple-returning decoder has no names for them).
    named_outputs = decoder_outputs.items() if hasattr(decoder_outputs, "items") else ()
    passed_on = {key: value for key, value in named_outputs if key in fields and key != "loss"}
    output = output_class(loss=loss, logits=None, bs_stats=stats, **passed_on)
    return output.to_tuple() if head_arguments["return_dict"] is False else output


def _register_with_zero3(causal_lm: nn.Module, head: nn.Module) -> None:
    """Under DeepSpeed ZeRO-3, make the causal LM's own forward hooks fetch the head's partitioned parameters.

    The head's forward never runs, so ZeRO-3 would not gather its weight. Gathering it by hand inside the forward
    (GatheredParameters) fails on leaving the block ("Cannot free a ZeRO-3 parameter while it is still active in
    submodules"); registering it as an external parameter of the causal LM lets ZeRO-3 fetch and release it with the
    module, forward and backward. A no-op for parameters without ZeRO-3's ``ds_id`` marker.
    """
    parameters = [p for p in (head.weight, getattr(head, "bias", None)) if p is not None and hasattr(p, "ds_id")]
    if not parameters:
        return
    import deepspeed

    for parameter in parameters:
        deepspeed.zero.register_external_parameter(causal_lm, parameter)


class _PatchedForward:
    """The instance-level ``forward`` of a patched causal LM.

    A callable object rather than a closure: it holds the model as an attribute, so ``copy.deepcopy`` of the model
    gives the copy a forward bound to the copy (deepcopy's memo maps the attribute to the new model; a closure would
    keep running the original's weights) and ``torch.save(model)`` can pickle it. The original forward is looked up
    at call time: the class's ``forward`` unless the instance already had its own (``previous``), kept as it was.
    """

    def __init__(self, causal_lm: nn.Module, previous) -> None:
        self.causal_lm = causal_lm
        self.previous = previous

    def original(self):
        if self.previous is not None:
            return self.previous
        return types.MethodType(type(self.causal_lm).forward, self.causal_lm)

    @property
    def __wrapped__(self):
        # inspect.signature follows this, so the Trainer still sees the model's own forward arguments.
        return self.original()

    @property
    def __name__(self) -> str:
        return "forward"

    def __call__(self, *args, bs_loss=None, **kwargs):
        original_forward = self.original()
        if bs_loss is None or bs_loss is False:
            return original_forward(*args, **kwargs)
        return _bs_forward(self.causal_lm, original_forward, bs_loss, args, kwargs)


class CausalLMPatch:
    """What :func:`patch_causal_lm` returns: ``remove()`` restores the original forward; also a context manager."""

    def __init__(self, causal_lm: nn.Module) -> None:
        self.causal_lm = causal_lm

    def remove(self) -> None:
        forward = self.causal_lm.__dict__.get("forward")
        if isinstance(forward, _PatchedForward):
            if forward.previous is None:
                del self.causal_lm.__dict__["forward"]
            else:
                self.causal_lm.__dict__["forward"] = forward.previous

    def __enter__(self) -> CausalLMPatch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


def patch_causal_lm(model: nn.Module) -> CausalLMPatch:
    """Let ``model(..., labels=labels, bs_loss=True | dict(...))`` compute the loss with bs_linear_loss.

    Args:
        model: a Hugging Face causal LM of a supported architecture (Llama/SmolLM2, Mistral, Qwen2/3, SmolLM3, Phi-3,
            OLMo 2, GPT-2, GPT-NeoX), bare or wrapped by PEFT, DDP, FSDP, DeepSpeed or torch.compile. The causal LM
            inside is patched (on the instance), so calls through every wrapper see it.

    With the patch, a forward called with ``bs_loss`` (True for the defaults, or a dict of bs_linear_loss options:
    lam, top_k, ignore_index, reduction, detach_belief, belief_temperature, impl, return_stats, accumulate_in_fp32)
    and ``labels`` [B, T]
    returns an output whose ``loss`` is ``bs_linear_loss(last_hidden_state, lm_head.weight, labels, bias=...)``,
    ``logits`` is None and ``bs_stats`` holds the BSTokenStats when return_stats=True. Per-token log p(label) for
    GA/NPO: ``bs_loss=dict(lam=0.0, reduction="none")``. Calls without ``bs_loss`` are untouched.

    Returns:
        A CausalLMPatch; ``.remove()`` or leaving ``with patch_causal_lm(model):`` undoes the patch. Patching twice
        is harmless (the second call returns a handle to the same patch).
    """
    causal_lm = _unwrap_causal_lm(model)
    _check_architecture(causal_lm)
    current = causal_lm.__dict__.get("forward")
    if not isinstance(current, _PatchedForward):
        causal_lm.forward = _PatchedForward(causal_lm, current)
    return CausalLMPatch(causal_lm)
