"""bs_kernels: fused BS-T ("LLM Unlearning with LLM Beliefs") losses and forget log-probs.

from bs_kernels import bs_token_loss, forget_logprobs
loss = bs_token_loss(logits, labels)   # logits [B, T, V], labels [B, T] with IGNORE_INDEX (-100) = ignored

reduce_token_values(values, valid, reduction) reduces per-position values [B, T'] (valid [B, T'] bool) exactly as
the losses do ("sequence_mean", "token_mean", "sum" or "none"), for objectives built from forget_logprobs.

Tensor parallelism: bs_token_loss / forget_logprobs accept logits that are a DTensor sharded over the vocabulary
(Shard(-1)), bs_linear_loss an lm_head weight sharded Shard(0); vocab_parallel_bs_token_loss(local_logits, labels,
vocab_start, group) and vocab_parallel_linear_loss are the plain-tensor forms (bs_kernels/vocab_parallel.py).
"""

from ._options import IGNORE_INDEX, REDUCTIONS, check_loss_options
from ._rows import reduce_token_values
from .backends import resolve_impl, unavailable_reason
from .hf import CausalLMPatch, patch_causal_lm
from .linear import bs_linear_loss, linear_forget_logprobs
from .loss import BSTokenLoss, BSTokenStats, bs_token_loss, forget_logprobs
from .vocab_parallel import vocab_parallel_bs_token_loss, vocab_parallel_forget_logprobs, vocab_parallel_linear_loss

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "REDUCTIONS",
    "BSTokenLoss",
    "BSTokenStats",
    "CausalLMPatch",
    "bs_linear_loss",
    "bs_token_loss",
    "check_loss_options",
    "forget_logprobs",
    "linear_forget_logprobs",
    "patch_causal_lm",
    "reduce_token_values",
    "resolve_impl",
    "unavailable_reason",
    "vocab_parallel_bs_token_loss",
    "vocab_parallel_forget_logprobs",
    "vocab_parallel_linear_loss",
]
