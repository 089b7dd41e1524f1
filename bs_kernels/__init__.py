"""bs_kernels: fused BS-T ("LLM Unlearning with LLM Beliefs") losses and forget log-probs.

from bs_kernels import bs_token_loss, forget_logprobs
loss = bs_token_loss(logits, labels)   # logits [B, T, V], labels [B, T] with -100 = ignored
"""

from .backends import resolve_impl, unavailable_reason
from .hf import CausalLMPatch, patch_causal_lm
from .linear import bs_linear_loss, linear_forget_logprobs
from .loss import BSTokenLoss, BSTokenStats, bs_token_loss, forget_logprobs

__version__ = "0.1.0"

__all__ = [
    "BSTokenLoss",
    "BSTokenStats",
    "CausalLMPatch",
    "bs_linear_loss",
    "bs_token_loss",
    "forget_logprobs",
    "linear_forget_logprobs",
    "patch_causal_lm",
    "resolve_impl",
    "unavailable_reason",
]
