"""impl="reference": BS-T stated as plainly as PyTorch allows (shared/SPEC.md), differentiated by autograd.

It materialises what the authors' trainer materialises (log-softmax, the [N, V] soft target, their product), so it
is both the specification the tests compare every backend with and the "what users had before" benchmark baseline.
Cost: about six [N, V] float32 tensors alive in backward.
"""

from __future__ import annotations

import torch

from ._options import BSOptions
from .backends.contract import compute_dtype
from .epilogue import RowOutputs


def reference_rows(logits: torch.Tensor, labels: torch.Tensor, options: BSOptions) -> RowOutputs:
    """Per-row BS-T values for logits [N, V] and labels [N] (int64, -1 = ignored); differentiable by autograd.

    options.top_k == 0 gives the forget log-prob log p(y) as the row value (lam is then 0).
    """
    lam, belief_temperature = options.lam, options.belief_temperature
    valid = labels >= 0
    # Ignored rows contribute nothing; zeroing them keeps rows that are entirely -inf (padding) from making NaN.
    z = torch.where(valid.unsqueeze(-1), logits.to(compute_dtype(logits.dtype)), 0.0)
    safe_labels = labels.clamp(min=0).unsqueeze(-1)

    log_probs = torch.log_softmax(z, dim=-1)  # [N, V]
    belief_logits, belief_ids = torch.topk(z, options.belief_count(z.shape[-1]), dim=-1)  # [N, k]
    belief_probs = torch.softmax(belief_logits / belief_temperature, dim=-1)
    if options.detach_belief:
        belief_probs = belief_probs.detach()

    # Soft target t = lam * q (on the top-k ids) + (1 - lam) * one_hot(label); zero on ignored rows.
    label_mass = ((1.0 - lam) * valid.to(z.dtype)).unsqueeze(-1)
    belief_mass = lam * belief_probs * valid.unsqueeze(-1)
    target = torch.zeros_like(z).scatter(-1, belief_ids, belief_mass)
    target = target.scatter_add(-1, safe_labels, label_mass)  # [N, V]

    # -inf logits have log pi = -inf and t = 0 there; their product is 0, not NaN.
    finite_log_probs = log_probs.masked_fill(torch.isneginf(log_probs), 0.0)
    row_loss = (target * finite_log_probs).sum(-1)

    token_logprobs = torch.where(valid, log_probs.gather(-1, safe_labels).squeeze(-1), torch.zeros_like(row_loss))
    lse = torch.logsumexp(z, dim=-1).detach()
    return RowOutputs(
        row_loss=row_loss,
        token_logprobs=token_logprobs.detach(),
        belief_ids=belief_ids,
        belief_probs=belief_probs.detach(),
        lse=torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse)),
        belief_weights=(lam * belief_probs).detach(),
    )
