"""The local half of a vocabulary-parallel call and its agreement step (vocab_parallel.py, "Agreement").

check_token_call / check_linear_call run every argument check of one rank that needs no other rank and build the call
record (_vocab_call.py); agree runs them, then the call's first collective (VocabShards.agreed), then the one check
that needs the group's V. The order is the point: every local check runs BEFORE the record is exchanged, so a rank
whose check fails sends a failure record instead of leaving the other ranks waiting in a collective.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from types import ModuleType
from typing import NamedTuple

import torch

from . import _options as opts
from ._options import BSOptions
from ._rows import (
    RowLayout,
    check_floating,
    check_label_range,
    check_labels,
    check_sequence_reduction,
    row_labels,
)
from ._vocab_call import CallRecord
from ._vocab_shards import VocabShards, announce_failure, check_vocab_start, record_device, shard_backend
from .autograd import refuse_functorch


class CheckedCall(NamedTuple):
    """One rank's arguments after every check that needs no other rank (the logits or the fused form)."""

    vocab_start: int
    local_size: int
    record: CallRecord  # what the other ranks must match
    labels: torch.Tensor  # as given: their range is checked once the group's V is known
    rows_labels: torch.Tensor  # [N] int64, -1 = ignored
    layout: RowLayout
    backend: ModuleType | None  # the per-shard kernel; None for an empty shard
    rows: torch.Tensor | None = None  # the logits form's [N, V_p] rows


def agree(check: Callable[[], CheckedCall], anchor: object, group) -> tuple[CheckedCall, VocabShards]:
    """This rank's local checks, then the call's first collective (VocabShards.agreed), then the label range.

    A rank whose checks fail still takes part in that collective with a failure record, so the other ranks raise
    a ValueError quoting its message instead of waiting in an all_gather until the process group's timeout; it
    then raises its own error. ``anchor`` is the tensor beside which the record travels.
    """
    try:
        checked = check()
    except Exception as error:
        # No usable group (none initialised, a bad group argument): no rank can be waiting, this error is the news.
        with contextlib.suppress(Exception):
            announce_failure(error, group, record_device(anchor, group))
        raise
    shards = VocabShards.agreed(
        checked.vocab_start, checked.local_size, checked.record, group, record_device(anchor, group)
    )
    # Needs the group's V; the same verdict on every rank, since their labels agree (compared by checksum).
    check_label_range(checked.labels, shards.vocab_size, checked.record.options.ignore_index)
    return checked, shards


def check_local_labels(labels: torch.Tensor, ignore_index: int) -> None:
    """The part of the label range check that needs no V: no negative label other than ignore_index."""
    if labels.device.type == "meta":
        return
    negative = (labels != ignore_index) & (labels < 0)
    if bool(negative.any()):
        raise ValueError(
            f"labels contains {int(labels[negative][0])}, which is negative and is not ignore_index={ignore_index}"
        )


def check_token_call(
    local_logits, labels, vocab_start: int, options: BSOptions, *, impl: str, shift: bool, return_stats: bool
) -> CheckedCall:
    """Every check of a logits-form call that needs no other rank; the rows [N, V_p] of the shard."""
    check_floating(local_logits, "local_logits")
    opts.check_flags(shift=shift, return_stats=return_stats)
    refuse_functorch(impl)
    check_vocab_start(vocab_start)
    if local_logits.dim() < 1:
        raise ValueError(f"logits must have a vocabulary dimension, got shape {tuple(local_logits.shape)}")
    check_labels(local_logits, labels, shift=shift, name="logits")
    check_sequence_reduction(labels, shift=shift, reduction=options.reduction)
    check_local_labels(labels, options.ignore_index)
    rows_labels, layout = row_labels(labels, shift=shift, ignore_index=options.ignore_index)
    if local_logits.stride(-1) != 1:
        local_logits = local_logits.contiguous()
    local_size = local_logits.shape[-1]
    record = CallRecord("logits", local_logits.dtype, shift, 0, options, labels)
    backend = shard_backend(impl, local_logits.device, local_size)
    rows = local_logits.reshape(rows_labels.shape[0], local_size)
    return CheckedCall(vocab_start, local_size, record, labels, rows_labels, layout, backend, rows)


def check_linear_call(
    hidden,
    local_weight,
    local_bias,
    labels,
    vocab_start: int,
    options: BSOptions,
    *,
    impl: str,
    shift: bool,
    return_stats: bool,
) -> CheckedCall:
    """Every check of a fused-form call that needs no other rank."""
    check_floating(hidden, "hidden")
    check_floating(local_weight, "weight")
    opts.check_flags(shift=shift, return_stats=return_stats)
    refuse_functorch(impl)
    check_vocab_start(vocab_start)
    if local_weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != local_weight.shape[1]:
        raise ValueError(
            f"weight must be this rank's [V_p, H] rows of the lm_head with H = hidden's last dimension; got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(local_weight.shape)}"
        )
    if hidden.dtype != local_weight.dtype or hidden.device != local_weight.device:
        raise TypeError(
            f"hidden ({hidden.dtype}, {hidden.device}) and weight ({local_weight.dtype}, "
            f"{local_weight.device}) must have the same dtype and device"
        )
    if local_bias is not None:
        check_floating(local_bias, "bias")
        if (
            local_bias.shape != local_weight.shape[:1]
            or local_bias.dtype != local_weight.dtype
            or local_bias.device != local_weight.device
        ):
            raise ValueError(
                f"bias must be [V_p] = [{local_weight.shape[0]}] of the weight's dtype and device, got "
                f"{tuple(local_bias.shape)} {local_bias.dtype} on {local_bias.device}"
            )
    check_labels(hidden, labels, shift=shift, name="hidden")
    check_sequence_reduction(labels, shift=shift, reduction=options.reduction)
    check_local_labels(labels, options.ignore_index)
    rows_labels, layout = row_labels(labels, shift=shift, ignore_index=options.ignore_index)
    local_size = local_weight.shape[0]
    record = CallRecord("lm_head", hidden.dtype, shift, hidden.shape[-1], options, labels)
    backend = shard_backend(impl, hidden.device, local_size)
    return CheckedCall(vocab_start, local_size, record, labels, rows_labels, layout, backend)
