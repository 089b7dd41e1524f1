"""DTensor adapter: bs_token_loss / forget_logprobs / bs_linear_loss on tensors sharded over the vocabulary.

A DTensor's placement says which vocabulary range each rank holds (the call record that every call exchanges first,
vocab_parallel.py's "Agreement", still checks that the ranks agree on the call):
- logits [..., V] sharded ``Shard(-1)`` (the output of ``ColwiseParallel(use_local_output=False)`` on the lm_head);
- an lm_head weight [V, H] (and bias [V]) sharded ``Shard(0)`` (what ColwiseParallel makes of the lm_head's
  parameters), for the fused form and patch_causal_lm.
The shard must be on one mesh dimension with every other mesh dimension Replicate; labels (and hidden states for the
fused form) may be plain tensors or replicated DTensors. DTensor's Shard splits like torch.chunk: ceil(V / P) ids
per rank, the last ranks shorter or empty. The work is done on the local shards by bs_kernels/vocab_parallel.py
(its docstring states the algorithm and the communication); ``to_local`` carries the gradient back, so the
DTensor inputs receive their sharded gradients. Results are plain tensors, the same on every rank.

The entry points (loss.py, linear.py) dispatch a DTensor here before checking anything and hand over their own
checks (options, flags, the labels' type, the sequence_mean rule) as ``checked_options``: it runs first in this
rank's local check, before the call record's exchange (vocab_parallel.agree), so a rank whose arguments fail it
makes every rank raise at once instead of raising alone while the others wait in the exchange. The error messages
are those of a plain tensor.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ._options import BSOptions
from ._rows import is_dtensor
from ._vocab_checks import CheckedCall, agree, check_linear_call, check_token_call
from ._vocab_shards import VocabShards
from .vocab_parallel import sharded_linear_loss, sharded_token_loss


def vocab_placement(tensor, dim: int, name: str) -> VocabShards:
    """The shards' layout a DTensor sharded on ``dim`` (the vocabulary) declares. Its placements are the same on
    every rank, so a placement error here is raised by every rank alike, before any collective."""
    placements, mesh = tensor.placements, tensor.device_mesh
    dim = dim % tensor.dim()
    sharded_mesh_dims = [index for index, placement in enumerate(placements) if not placement.is_replicate()]
    if len(sharded_mesh_dims) != 1 or not placements[sharded_mesh_dims[0]].is_shard(dim):
        raise ValueError(
            f"{name} must be a DTensor sharded over the vocabulary: Shard({dim}) on one mesh dimension and "
            f"Replicate on the others (ColwiseParallel(use_local_output=False) on the lm_head gives this); got "
            f"placements {placements}"
        )
    mesh_dim = sharded_mesh_dims[0]
    return VocabShards.even_chunks(
        tensor.shape[dim], mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim), mesh.get_group(mesh_dim)
    )


def vocab_sharded_local(tensor, dim: int, name: str, shards: VocabShards) -> torch.Tensor:
    """The local shard of a DTensor sharded on ``dim``, checked against the even split (a local check)."""
    local = tensor.to_local()
    dim = dim % tensor.dim()
    if local.shape[dim] != shards.size:
        raise ValueError(
            f"{name}: this rank's shard has {local.shape[dim]} vocabulary entries, but an even Shard({dim}) split of "
            f"{tensor.shape[dim]} over {shards.world} ranks gives it {shards.size}"
        )
    return local


def replicated_local(value, name: str):
    """A plain tensor as it is; a DTensor's local tensor if it is replicated on every mesh dimension."""
    if not is_dtensor(value):
        return value
    if not all(placement.is_replicate() for placement in value.placements):
        raise ValueError(f"{name} must be replicated over the mesh (the same on every rank), got {value.placements}")
    return value.to_local()


def dtensor_token_loss(
    logits,
    labels,
    checked_options: Callable[[], BSOptions],
    *,
    impl: str,
    shift: bool,
    return_stats: bool,
    inplace_backward: bool,
):
    """bs_token_loss (or forget_logprobs, with its option checks) on logits sharded Shard(-1)."""
    layout = vocab_placement(logits, -1, "logits")

    def check() -> CheckedCall:
        options = checked_options()
        local = vocab_sharded_local(logits, -1, "logits", layout)
        return check_token_call(
            local,
            replicated_local(labels, "labels"),
            layout.start,
            options,
            impl=impl,
            shift=shift,
            return_stats=return_stats,
        )

    checked, shards = agree(check, logits.to_local(), layout.group)
    return sharded_token_loss(
        checked, shards, checked.record.options, return_stats=return_stats, inplace_backward=inplace_backward
    )


def dtensor_linear_loss(
    hidden,
    weight,
    bias,
    labels,
    checked_options: Callable[[], BSOptions],
    *,
    impl: str,
    shift: bool,
    return_stats: bool,
):
    """bs_linear_loss (or linear_forget_logprobs, with its option checks) with the lm_head weight (and bias) sharded
    Shard(0)."""
    layout = vocab_placement(weight, 0, "weight")
    if bias is not None and (not is_dtensor(bias) or vocab_placement(bias, 0, "bias") != layout):
        raise ValueError("bias must be a DTensor sharded over the vocabulary like the weight (Shard(0), same mesh)")
    local_weight = weight.to_local()
    local_bias = None if bias is None else bias.to_local()
    local_hidden = None

    def check() -> CheckedCall:
        nonlocal local_hidden
        options = checked_options()
        vocab_sharded_local(weight, 0, "weight", layout)
        if bias is not None:
            vocab_sharded_local(bias, 0, "bias", layout)
        local_hidden = replicated_local(hidden, "hidden")
        return check_linear_call(
            local_hidden,
            local_weight,
            local_bias,
            replicated_local(labels, "labels"),
            layout.start,
            options,
            impl=impl,
            shift=shift,
            return_stats=return_stats,
        )

    checked, shards = agree(check, local_weight, layout.group)
    return sharded_linear_loss(
        local_hidden, local_weight, local_bias, checked, shards, checked.record.options, return_stats=return_stats
    )
