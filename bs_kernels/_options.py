"""The BS-T options as one frozen object, and the checks of every public option.

Each check raises ``ValueError`` or ``TypeError`` whose message names the argument and the offending value, so a
bad call fails at the API boundary instead of deep inside a kernel. Below the public functions the options travel
as one :class:`BSOptions`; the checks of the tensors themselves are in _rows.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The Hugging Face label of a position that does not count; the default ignore_index of every entry point.
IGNORE_INDEX = -100

REDUCTIONS = ("sequence_mean", "token_mean", "sum", "none")

# The statistics are float32 (float64 only for float64 inputs): q = softmax(v / belief_temperature) needs the
# temperature and its reciprocal to be finite and nonzero in float32, whatever the dtype of the logits. The float32
# normal range [2^-126, float32 max] guarantees both (a subnormal such as 5e-324 is 0 in float32).
MIN_BELIEF_TEMPERATURE = torch.finfo(torch.float32).tiny
MAX_BELIEF_TEMPERATURE = torch.finfo(torch.float32).max

# Labels are compared with ignore_index as int64 tensors; a larger Python int cannot be converted to one.
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
IMPLS = ("auto", "reference", "torch", "native", "triton")


@dataclass(frozen=True)
class BSOptions:
    """What defines a BS-T loss (docs/math.md): target t = lam * q + (1 - lam) * e_y, and how it is reduced.

    ``top_k = 0`` (only with ``lam = 0``) means no beliefs at all: the row value is the forget log-prob log p(y);
    that is :meth:`forget_logprobs`, never a user's choice (the public functions require top_k >= 1).
    Execution choices that do not change the value (impl, shift, inplace_backward, accumulate_in_fp32) are not here.
    """

    lam: float = 0.2
    top_k: int = 20
    belief_temperature: float = 1.0
    detach_belief: bool = True
    ignore_index: int = IGNORE_INDEX
    reduction: str = "sequence_mean"

    def __post_init__(self) -> None:
        check_lam(self.lam)
        if not (type(self.top_k) is int and self.top_k == 0 and self.lam == 0):
            check_top_k(self.top_k)
        check_belief_temperature(self.belief_temperature)
        check_bool(self.detach_belief, "detach_belief")
        check_ignore_index(self.ignore_index)
        check_reduction(self.reduction)
        object.__setattr__(self, "lam", float(self.lam))
        object.__setattr__(self, "belief_temperature", float(self.belief_temperature))

    @classmethod
    def forget_logprobs(cls, ignore_index: int = IGNORE_INDEX) -> BSOptions:
        """The options of a forget log-prob pass: no beliefs, per-position values."""
        return cls(lam=0.0, top_k=0, ignore_index=ignore_index, reduction="none")

    @property
    def label_weight(self) -> float:
        """The coefficient 1 - lam of e_y in the target (and in dl/dz)."""
        return 1.0 - self.lam

    def belief_count(self, vocab_size: int) -> int:
        """k for a vocabulary of ``vocab_size``: top_k, or the whole vocabulary when top_k >= V."""
        return min(self.top_k, vocab_size)


def loss_options(
    *,
    lam: object,
    top_k: object,
    belief_temperature: object,
    detach_belief: object,
    ignore_index: object,
    reduction: object,
    impl: object,
) -> BSOptions:
    """Every option of a BS-T loss entry point (bs_token_loss, BSTokenLoss, bs_linear_loss), checked in one place."""
    check_lam(lam)
    check_top_k(top_k)
    options = BSOptions(
        lam=lam,
        top_k=top_k,
        belief_temperature=belief_temperature,
        detach_belief=detach_belief,
        ignore_index=ignore_index,
        reduction=reduction,
    )
    check_impl(impl)
    return options


def forget_options(*, ignore_index: object, impl: object) -> BSOptions:
    """The options of a forget log-prob entry point (forget_logprobs, linear_forget_logprobs), checked."""
    check_ignore_index(ignore_index)
    check_impl(impl)
    return BSOptions.forget_logprobs(ignore_index)


def _is_real_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_bool(value: object, name: str) -> None:
    """A flag must be a real bool: a truthy string or tensor would silently pick a code path."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_flags(**flags: object) -> None:
    """check_bool on each keyword: the execution flags of an entry point (shift, return_stats, ...), by name."""
    for name, value in flags.items():
        check_bool(value, name)


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
    """A real number in the float32 normal range [2^-126, float32 max] (a NaN fails both comparisons).

    Plain comparisons only: torch.compile(dynamic=True) traces these checks, and it cannot trace math.isfinite.
    """
    if not _is_real_number(belief_temperature):
        raise TypeError(f"belief_temperature must be a positive float, got {belief_temperature!r}")
    if not (MIN_BELIEF_TEMPERATURE <= float(belief_temperature) <= MAX_BELIEF_TEMPERATURE):
        raise ValueError(
            f"belief_temperature must be in [{MIN_BELIEF_TEMPERATURE:.6g}, {MAX_BELIEF_TEMPERATURE:.6g}] (finite, "
            f"> 0, and in float32 neither 0 nor with an infinite reciprocal), got {belief_temperature!r}"
        )


def check_reduction(reduction: object) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_impl(impl: object) -> None:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def check_ignore_index(ignore_index: object) -> None:
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if not (INT64_MIN <= ignore_index <= INT64_MAX):
        raise ValueError(f"ignore_index must fit in int64 (labels are int64 tensors), got {ignore_index!r}")


def check_loss_options(
    *,
    lam: object = 0.2,
    top_k: object = 20,
    belief_temperature: object = 1.0,
    detach_belief: object = True,
    ignore_index: object = IGNORE_INDEX,
    reduction: object = "sequence_mean",
    impl: object = "auto",
) -> None:
    """Check BS-T options the way every loss entry point does, without building anything.

    For code that takes the options long before the first loss (a configuration, a command line): it raises the
    same ``ValueError`` / ``TypeError``, naming the argument and the value, that ``bs_token_loss`` would.
    """
    loss_options(
        lam=lam,
        top_k=top_k,
        belief_temperature=belief_temperature,
        detach_belief=detach_belief,
        ignore_index=ignore_index,
        reduction=reduction,
        impl=impl,
    )
