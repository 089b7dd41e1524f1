"""Argument validation shared by every public entry point.

Each check raises ``ValueError`` or ``TypeError`` whose message names the argument and the offending value, so a
bad call fails at the API boundary instead of deep inside a kernel.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# The Hugging Face label of a position that does not count; the default ignore_index of every entry point.
IGNORE_INDEX = -100

REDUCTIONS = ("sequence_mean", "token_mean", "sum", "none")
IMPLS = ("auto", "reference", "torch", "native", "triton")


@dataclass(frozen=True)
class BSOptions:
    """The BS-T hyperparameters (see shared/SPEC.md): target t = lam * q + (1 - lam) * e_y."""

    lam: float = 0.2
    top_k: int = 20
    belief_temperature: float = 1.0
    detach_belief: bool = True

    def __post_init__(self) -> None:
        check_lam(self.lam)
        check_top_k(self.top_k)
        check_belief_temperature(self.belief_temperature)
        if not isinstance(self.detach_belief, bool):
            raise TypeError(f"detach_belief must be a bool, got {self.detach_belief!r}")


def check_loss_options(
    *,
    lam: object,
    top_k: object,
    belief_temperature: object,
    detach_belief: object,
    ignore_index: object,
    reduction: object,
    impl: object,
) -> None:
    """Every option of a BS-T loss entry point (bs_token_loss, BSTokenLoss, bs_linear_loss), checked in one place."""
    BSOptions(lam=lam, top_k=top_k, belief_temperature=belief_temperature, detach_belief=detach_belief)
    check_ignore_index(ignore_index)
    check_reduction(reduction)
    check_impl(impl)


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_lam(lam: object) -> None:
    if not _is_real_number(lam):
        raise TypeError(f"lam must be a float in [0, 1], got {lam!r}")
    if not (0.0 <= float(lam) <= 1.0):
        raise ValueError(f"lam must be in [0, 1], got {lam!r}")


def check_top_k(top_k: object) -> None:
    if not isinstance(top_k, int) or isinstance(top_k, bool):
        raise TypeError(f"top_k must be an int >= 1, got {top_k!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k!r}")


def check_belief_temperature(belief_temperature: object) -> None:
    if not _is_real_number(belief_temperature):
        raise TypeError(f"belief_temperature must be a positive float, got {belief_temperature!r}")
    if not (float(belief_temperature) > 0.0 and math.isfinite(float(belief_temperature))):
        raise ValueError(f"belief_temperature must be a finite value > 0, got {belief_temperature!r}")


def check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_impl(impl: object) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_ignore_index(ignore_index: object) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")


def check_logits_dtype(logits: torch.Tensor, name: str = "logits") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating tensor (float32, bfloat16, float16, float64), got {logits.dtype}")


def check_labels_dtype(labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")


def check_label_range(labels: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Labels must be ignore_index or a vocabulary id; anything else would index out of bounds in a kernel."""
    counted = labels != ignore_index
    out_of_range = counted & ((labels < 0) | (labels >= vocab_size))
    if bool(out_of_range.any()):
        bad = int(labels[out_of_range][0])
        raise ValueError(
            f"labels contains {bad}, which is outside [0, {vocab_size}) and is not ignore_index={ignore_index}"
        )


def normalize_labels(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """int64 labels with every ignored position set to -1: the one convention all backends see."""
    labels = labels.to(torch.int64)
    return torch.where(labels == ignore_index, torch.full_like(labels, -1), labels)


def stats_dtype(logits_dtype: torch.dtype) -> torch.dtype:
    """Statistics and the returned loss are float32, or float64 for float64 input (SPEC.md)."""
    return torch.float64 if logits_dtype == torch.float64 else torch.float32
