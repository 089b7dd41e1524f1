"""bs_kernels: fused BS-T ("LLM Unlearning with LLM Beliefs") losses and forget log-probs.

from bs_kernels import bs_token_loss, forget_logprobs
loss = bs_token_loss(logits, labels)   # logits [B, T, V], labels [B, T] with IGNORE_INDEX (-100) = ignored

reduce_token_values(values, valid, reduction) reduces per-position values [B, T'] (valid [B, T'] bool) exactly as
the losses do ("sequence_mean", "token_mean", "sum" or "none"), for objectives built from forget_logprobs.
"""

from ._options import IGNORE_INDEX, REDUCTIONS
from ._rows import reduce_token_values
from .backends import resolve_impl, unavailable_reason
from .hf import CausalLMPatch, patch_causal_lm
from .linear import bs_linear_loss, linear_forget_logprobs
from .loss import BSTokenLoss, BSTokenStats, bs_token_loss, forget_logprobs

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "REDUCTIONS",
    "BSTokenLoss",
    "BSTokenStats",
    "CausalLMPatch",
    "bs_linear_loss",
    "bs_token_loss",
    "forget_logprobs",
    "linear_forget_logprobs",
    "patch_causal_lm",
    "reduce_token_values",
    "resolve_impl",
    "unavailable_reason",
]
