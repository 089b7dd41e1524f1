"""impl="reference": BS-T stated as plainly as PyTorch allows (docs/math.md), differentiated by autograd.

It materialises what the authors' trainer materialises (log-softmax, the [N, V] soft target, their product), so it
is both the specification the tests compare every backend with and the "what users had before" benchmark baseline.
Cost: about seven [N, V] float32 tensors alive in backward.
"""

from __future__ import annotations

import torch

from ._dtypes import compute_dtype
from ._options import BSOptions
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
    # q is shift-invariant: shift by the (constant) largest belief first, since v / tau of a large v would round.
    # topk sorts descending, so that is the first column ([N, 0] when there are no beliefs).
    top_belief = belief_logits.detach()[:, :1]
    top_belief = torch.where(torch.isfinite(top_belief), top_belief, torch.zeros_like(top_belief))
    belief_probs = torch.softmax((belief_logits - top_belief) / belief_temperature, dim=-1)
    if options.detach_belief:
        belief_probs = belief_probs.detach()

    # Soft target t = lam * q (on the top-k ids) + (1 - lam) * one_hot(label); zero on ignored rows.
    label_mass = ((1.0 - lam) * valid.to(z.dtype)).unsqueeze(-1)
    belief_mass = lam * belief_probs * valid.unsqueeze(-1)
    belief_target = torch.zeros_like(z).scatter(-1, belief_ids, belief_mass)  # [N, V]
    label_target = torch.zeros_like(z).scatter(-1, safe_labels, label_mass)  # [N, V]

    # <t, log pi> over the support of each part of t only: where it is 0 (masked -inf entries among them) the
    # product is 0 and so is its derivative, never 0 * (-inf) = NaN. A label whose logit is -inf has t > 0 and
    # log pi = -inf, so l = -inf there (lam < 1); the belief part keeps its finite derivative even then.
    def inner_product(part: torch.Tensor) -> torch.Tensor:
        return (part * log_probs.masked_fill(part.detach() == 0, 0.0)).sum(-1)

    row_loss = inner_product(label_target) + inner_product(belief_target)
    token_logprobs = torch.where(valid, log_probs.gather(-1, safe_labels).squeeze(-1), torch.zeros_like(row_loss))

    # A counted row whose logsumexp is not finite (a NaN or +inf logit, or no finite logit) has no distribution: its
    # value and log p(y) are NaN, and so is every entry of its gradient: d(NaN * sum z)/dz = NaN, taken on those rows
    # only (the inner where keeps the 0 * NaN of the unselected branch away from every other row).
    row_max = z.detach().amax(-1)
    finite_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    log_sum = torch.logsumexp(z.detach() - finite_max.unsqueeze(-1), dim=-1)
    no_distribution = valid & ~(torch.isfinite(row_max) & torch.isfinite(log_sum))
    nan = torch.full_like(row_loss, float("nan"))
    nan_on_their_logits = nan * torch.where(no_distribution.unsqueeze(-1), z, 0.0).sum(-1)
    row_loss = torch.where(no_distribution, nan_on_their_logits, row_loss)
    token_logprobs = torch.where(no_distribution, nan, token_logprobs)
    return RowOutputs(
        row_loss=row_loss,
        token_logprobs=token_logprobs.detach(),
        belief_ids=belief_ids,
        belief_probs=belief_probs.detach(),
        row_max=torch.where(no_distribution, torch.full_like(row_max, float("nan")), finite_max),
        log_sum=torch.where(torch.isfinite(log_sum), log_sum, torch.zeros_like(log_sum)),
        belief_weights=(lam * belief_probs).detach(),
    )
