"""Input builders shared by the loss tests (every impl runs the same cases)."""

from __future__ import annotations

import torch


def random_case(
    batch: int,
    length: int,
    vocab: int,
    *,
    dtype: torch.dtype = torch.float64,
    ignored_prefix: int = 2,
    scale: float = 3.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal-LM style logits [B, T, V] and labels [B, T]: the first ``ignored_prefix`` labels (the prompt) are -100.

    Logits are drawn from a continuous distribution, so top-k ids are tie-free.
    """
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=generator, dtype=torch.float64) * scale
    labels = torch.randint(0, vocab, (batch, length), generator=generator)
    labels[:, :ignored_prefix] = -100
    return logits.to(dtype), labels


def with_masked_vocabulary(logits: torch.Tensor, labels: torch.Tensor, fraction: float = 0.5) -> torch.Tensor:
    """Set a random ``fraction`` of the vocabulary to -inf at every position, except the positions' labels.

    With shift=True position t predicts labels[:, t + 1], so it is that label that stays finite.
    """
    generator = torch.Generator().manual_seed(1)
    masked = torch.rand(logits.shape, generator=generator) < fraction
    next_labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], dim=1)
    keep = next_labels.clamp(min=0).unsqueeze(-1)
    masked.scatter_(-1, keep, False)
    return logits.masked_fill(masked, float("-inf"))


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone().requires_grad_(True)
