"""impl="triton": launchers for the one-pass forward and the (row, column-block) backward in triton_kernels.py.

Three forward paths (forward_config picks one from the rows, V and k; the model behind the choice is stated there):
the per-lane kernel (one warp per row, no block barrier; k <= 128), the split-vocabulary forward (the per-lane loop
over S slices of each row in S programs, then a merge kernel; k <= 64 when rows are too few to keep HBM busy), and
the bucket kernel (a row over up to 16 warps; k > 128, up to 1024, a range whose cost has not been modelled).

Runs on CUDA tensors. On the CPU it runs only under the Triton interpreter (``TRITON_INTERPRET=1`` in the
environment before the kernels module is first imported; slow, meant for tests). Triton reads that variable when a
``@triton.jit`` function is created, so the kernels module is imported lazily, at the first launch, never when this
module is imported (the backend registry imports it just to ask ``unavailable_reason``).

Each launcher validates shapes, dtypes and strides, allocates the outputs and picks the block sizes; ``config``
overrides the picked sizes (tests use tiny blocks to run many blocks per row; benchmarks sweep them).
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from types import ModuleType

import torch

from .._dtypes import compute_dtype
from .contract import RawRowStats
from .triton_plan import (
    BackwardConfig,
    ForwardConfig,
    LaneForwardConfig,
    SplitForwardConfig,
    backward_config,
    cdiv,
    forward_config,
    next_power_of_two,
)

NAME = "triton"

KERNELS_MODULE = "bs_kernels.backends.triton_kernels"
MAX_TOP_K = 1024  # K_PAD must fit in one forward block (<= MAX_BLOCK_V) and stay in registers
MAX_VOCAB = {torch.float64: 1 << 20}  # float64 keys keep 20 index bits; 16/32-bit inputs keep 32
DEFAULT_MAX_VOCAB = (1 << 31) - 1
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Tests set this (a ForwardConfig, LaneForwardConfig or SplitForwardConfig) to route every launch, the public API's
# included, through one path at sizes the interpreter can run; None: forward_config decides.
_FORWARD_OVERRIDE: ForwardConfig | LaneForwardConfig | SplitForwardConfig | None = None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _kernels_compiled_for_gpu() -> bool:
    """True when the kernels module was imported without the interpreter (its kernels cannot run on the CPU)."""
    module = sys.modules.get(KERNELS_MODULE)
    return module is not None and type(module.bs_rows_forward_kernel).__name__ != "InterpretedFunction"


def unavailable_reason(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as error:
        # Not a base dependency (pyproject.toml): CUDA builds of torch ship their own Triton, CPU-only ones do not.
        return (
            f'impl="triton" needs the triton package ({error}): a CUDA build of torch brings it; elsewhere install it '
            'with pip install "bs-kernels[triton]" (or "triton>=3.4"; on a CPU it runs only under TRITON_INTERPRET=1)'
        )
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return 'impl="triton" was given CUDA tensors but torch.cuda.is_available() is False'
        return None
    if device.type == "cpu":
        if not _interpreting():
            return (
                'impl="triton" runs on CUDA tensors; on the CPU only under the Triton interpreter: set '
                "TRITON_INTERPRET=1 in the environment before starting Python (slow; for tests)"
            )
        if _kernels_compiled_for_gpu():
            return (
                'impl="triton": TRITON_INTERPRET=1 was set after the Triton kernels were created; set it before '
                "starting Python"
            )
        return None
    return f'impl="triton" runs on CUDA tensors (or the CPU under TRITON_INTERPRET=1), not on {device.type}'


def _load_kernels() -> ModuleType:
    return importlib.import_module(KERNELS_MODULE)


def _log2(power_of_two: int) -> int:
    return power_of_two.bit_length() - 1


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a no-op context on the CPU)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _check_rows(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(f"logits must be a [N, V] tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f'impl="triton" supports logits of dtype {SUPPORTED_DTYPES}, got {logits.dtype}')
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(f"logits must have unit stride along V, got strides {logits.stride()}")
    max_vocab = MAX_VOCAB.get(logits.dtype, DEFAULT_MAX_VOCAB)
    if logits.shape[1] > max_vocab:
        raise ValueError(
            f'impl="triton" supports a vocabulary of at most {max_vocab} for {logits.dtype} logits, got '
            f'{logits.shape[1]}; use impl="torch"'
        )
    if labels.dtype != torch.int64 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must be int64 of shape [{logits.shape[0]}], got {labels.dtype} of shape {tuple(labels.shape)}"
        )
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits are on {logits.device}")


def forward(
    logits: torch.Tensor, labels: torch.Tensor, top_k: int, *, config: ForwardConfig | None = None
) -> RawRowStats:
    """One pass per row: m and log_sum [N] (RawRowStats), z_y [N], the top_k largest logits [N, k] (descending)
    and their ids [N, k] int64.

    logits [N, V] (unit stride along V, any row stride), labels [N] int64 with -1 = ignored, 0 <= top_k <= V.
    """
    _check_rows(logits, labels)
    num_rows, vocab_size = logits.shape
    if not isinstance(top_k, int) or not (0 <= top_k <= min(vocab_size, MAX_TOP_K)):
        raise ValueError(
            f'top_k must be an int in [0, min(V, {MAX_TOP_K})] for impl="triton", got {top_k!r} (V = {vocab_size})'
        )
    stats_dtype = compute_dtype(logits.dtype)
    device = logits.device
    row_max = torch.empty(num_rows, dtype=stats_dtype, device=device)
    log_sum = torch.empty(num_rows, dtype=stats_dtype, device=device)
    label_logits = torch.empty(num_rows, dtype=stats_dtype, device=device)
    belief_logits = torch.empty(num_rows, top_k, dtype=stats_dtype, device=device)
    belief_ids = torch.empty(num_rows, top_k, dtype=torch.int64, device=device)
    if num_rows == 0:
        return RawRowStats(row_max, log_sum, label_logits, belief_logits, belief_ids)

    padded_k = next_power_of_two(max(top_k, 1))
    config = config or _FORWARD_OVERRIDE or forward_config(vocab_size, top_k, num_rows, logits.element_size())
    outputs = (row_max, log_sum, label_logits, belief_logits, belief_ids)
    if isinstance(config, (LaneForwardConfig, SplitForwardConfig)):
        if isinstance(config, SplitForwardConfig):
            _split_forward(logits, labels, top_k, config, outputs)
        else:
            _lanes_forward(logits, labels, top_k, config, outputs)
        return RawRowStats(*outputs)
    _check_block(config.block_v, "config.block_v")
    _check_block(config.buckets, "config.buckets")
    if not (padded_k <= config.buckets <= config.block_v):
        raise ValueError(
            f"config must satisfy padded k ({padded_k}) <= buckets ({config.buckets}) <= block_v ({config.block_v})"
        )
    with _on_device(logits):
        _load_kernels().bs_rows_forward_kernel[(num_rows,)](
            logits,
            labels,
            row_max,
            log_sum,
            label_logits,
            belief_logits,
            belief_ids,
            vocab_size,
            logits.stride(0),
            K=top_k,
            LOG_K_PAD=_log2(padded_k),
            LOG_BLOCK_V=_log2(config.block_v),
            LOG_BUCKETS=_log2(config.buckets),
            IS_FP64=logits.dtype == torch.float64,
            num_warps=config.num_warps,
        )
    return RawRowStats(row_max, log_sum, label_logits, belief_logits, belief_ids)


def lanes_constants(config: LaneForwardConfig, dtype: torch.dtype, top_k: int) -> dict:
    """The compile-time arguments of bs_rows_forward_lanes_kernel for a config (also used to compile it offline)."""
    return dict(
        K=top_k,
        LOG_K_PAD=_log2(next_power_of_two(max(top_k, 1))),
        LOG_GROUPS=_log2(config.groups),
        LOG_LANES=_log2(32 * config.num_warps),
        LOG_VEC=_log2(config.vector(dtype)),
        IS_FP64=dtype == torch.float64,
    )


def _lanes_forward(logits, labels, top_k: int, config: LaneForwardConfig, outputs) -> None:
    for name in ("groups", "num_warps"):
        _check_block(getattr(config, name), f"config.{name}")
    _check_block(config.vector(logits.dtype), "config.vec")
    constants = lanes_constants(config, logits.dtype, top_k)
    with _on_device(logits):
        _load_kernels().bs_rows_forward_lanes_kernel[(logits.shape[0],)](
            logits, labels, *outputs, logits.shape[1], logits.stride(0), **constants, num_warps=config.num_warps
        )


def _split_forward(logits, labels, top_k: int, config: SplitForwardConfig, outputs) -> None:
    if not isinstance(config.slices, int) or isinstance(config.slices, bool) or config.slices < 1:
        raise ValueError(f"config.slices must be a positive int, got {config.slices!r}")
    for name in ("groups", "num_warps"):
        _check_block(getattr(config.lanes, name), f"config.lanes.{name}")
    _check_block(config.lanes.vector(logits.dtype), "config.lanes.vec")
    num_rows, vocab_size = logits.shape
    slice_len = config.slice_len(vocab_size, logits.dtype)
    slices = cdiv(vocab_size, slice_len)
    stats_dtype = compute_dtype(logits.dtype)
    partial_max = torch.empty(num_rows, slices, dtype=stats_dtype, device=logits.device)
    partial_sum = torch.empty(num_rows, slices, dtype=stats_dtype, device=logits.device)
    partial_keys = torch.empty(num_rows, slices, top_k, dtype=torch.int64, device=logits.device)
    kernels = _load_kernels()
    with _on_device(logits):
        kernels.bs_rows_forward_split_kernel[(num_rows, slices)](
            logits,
            partial_max,
            partial_sum,
            partial_keys,
            vocab_size,
            logits.stride(0),
            slice_len,
            **lanes_constants(config.lanes, logits.dtype, top_k),
            num_warps=config.lanes.num_warps,
        )
        kernels.bs_rows_merge_kernel[(num_rows,)](
            logits,
            labels,
            partial_max,
            partial_sum,
            partial_keys,
            *outputs,
            logits.stride(0),
            slices,
            **merge_constants(slices, logits.dtype, top_k),
            num_warps=1,
        )


def merge_constants(slices: int, dtype: torch.dtype, top_k: int) -> dict:
    """The compile-time arguments of bs_rows_merge_kernel (also used to compile it offline)."""
    return dict(
        K=top_k,
        LOG_K_PAD=_log2(next_power_of_two(max(top_k, 1))),
        LOG_SLICES_PAD=_log2(next_power_of_two(slices)),
        IS_FP64=dtype == torch.float64,
    )


def _check_block(size: int, name: str) -> None:
    if not isinstance(size, int) or size < 1 or size & (size - 1):
        raise ValueError(f"{name} must be a power of two, got {size!r}")


def backward(
    grad_rows: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    belief_ids: torch.Tensor,
    belief_weights: torch.Tensor,
    label_weight: float,
    inplace: bool,
    *,
    config: BackwardConfig | None = None,
) -> torch.Tensor:
    """grad[i] = grad_rows[i] * (-pi_i + label_weight e_{y_i} + sum_j belief_weights[i, j] e_{belief_ids[i, j]}).

    grad_rows, row_max, log_sum [N] and belief_weights [N, k] in the compute dtype (float32, float64 for float64
    logits); belief_ids [N, k] integer. Returns [N, V] in the logits' dtype: a new contiguous tensor, or ``logits``
    itself (overwritten) when ``inplace``.
    """
    _check_rows(logits, labels)
    num_rows, vocab_size = logits.shape
    stats_dtype = compute_dtype(logits.dtype)
    top_k = belief_ids.shape[-1] if belief_ids.dim() == 2 else -1
    for name, tensor, shape in (
        ("grad_rows", grad_rows, (num_rows,)),
        ("row_max", row_max, (num_rows,)),
        ("log_sum", log_sum, (num_rows,)),
        ("belief_ids", belief_ids, (num_rows, top_k)),
        ("belief_weights", belief_weights, (num_rows, top_k)),
    ):
        if tuple(tensor.shape) != shape or tensor.device != logits.device:
            raise ValueError(
                f"{name} must have shape {shape} on {logits.device}, got {tuple(tensor.shape)} on {tensor.device}"
            )
    if belief_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"belief_ids must be int32 or int64, got {belief_ids.dtype}")

    grad = logits if inplace else torch.empty_like(logits, memory_format=torch.contiguous_format)
    if num_rows == 0:
        return grad
    grad_rows = grad_rows.to(stats_dtype).contiguous()
    row_max = row_max.to(stats_dtype).contiguous()
    log_sum = log_sum.to(stats_dtype).contiguous()
    belief_ids = belief_ids.to(torch.int64).contiguous()
    belief_weights = belief_weights.to(stats_dtype).contiguous()
    # The fixup recomputes the label and belief entries from their logits: read them now, before an inplace
    # dense launch overwrites them (N * (k + 1) values).
    label_logits = logits.gather(1, labels.clamp(min=0).unsqueeze(1)).squeeze(1).to(stats_dtype)
    belief_logits = logits.gather(1, belief_ids).to(stats_dtype)
    label_coefs = grad_rows * label_weight

    config = config or backward_config(vocab_size)
    _check_block(config.block_v, "config.block_v")
    kernels = _load_kernels()
    with _on_device(logits):
        kernels.bs_rows_backward_kernel[(num_rows, cdiv(vocab_size, config.block_v))](
            grad,
            logits,
            row_max,
            log_sum,
            grad_rows,
            vocab_size,
            logits.stride(0),
            grad.stride(0),
            BLOCK_V=config.block_v,
            num_warps=config.num_warps,
        )
        kernels.bs_rows_backward_fixup_kernel[(num_rows,)](
            grad,
            labels,
            row_max,
            log_sum,
            grad_rows,
            label_coefs,
            label_logits,
            belief_ids,
            belief_weights,
            belief_logits,
            grad.stride(0),
            top_k,
            K_PAD=next_power_of_two(max(top_k, 1)),
            num_warps=1,
        )
    return grad
