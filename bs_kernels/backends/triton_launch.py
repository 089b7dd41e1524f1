"""impl="triton": launchers for the one-pass forward and the (row, column-block) backward in triton_kernels.py.

Two forward kernels: the per-lane kernel (one warp per row, no block barrier; for many rows and k <= 64) and the
bucket kernel (a row over up to 16 warps; for few rows, where one warp per row would leave the GPU idle, and large k).

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
from dataclasses import dataclass
from types import ModuleType

import torch

from .._dtypes import compute_dtype
from .contract import RawRowStats

NAME = "triton"

KERNELS_MODULE = "bs_kernels.backends.triton_kernels"
MAX_TOP_K = 1024  # K_PAD must fit in one forward block (<= MAX_BLOCK_V) and stay in registers
MAX_BLOCK_V = 4096
MAX_VOCAB = {torch.float64: 1 << 20}  # float64 keys keep 20 index bits; 16/32-bit inputs keep 32
DEFAULT_MAX_VOCAB = (1 << 31) - 1
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class ForwardConfig:
    block_v: int  # logits per loop step (power of two, >= the padded k)
    buckets: int  # candidate buckets per block (power of two, padded k <= buckets <= block_v)
    num_warps: int


@dataclass(frozen=True)
class LaneForwardConfig:
    """The per-lane forward (bs_rows_forward_lanes_kernel): each of the 32 * num_warps lanes of a row's program
    streams groups vectors of vec contiguous logits per step (block_v = groups * 32 * num_warps * vec)."""

    groups: int  # power of two
    num_warps: int  # power of two; 1 keeps every reduction inside one warp (no block barrier)
    vec: int | None = None  # power of two; None = one 16-byte load (8 bf16/fp16, 4 fp32, 2 fp64)

    def vector(self, dtype: torch.dtype) -> int:
        return self.vec if self.vec is not None else 16 // _ELEMENT_SIZE[dtype]

    def block_v(self, dtype: torch.dtype) -> int:
        return self.groups * 32 * self.num_warps * self.vector(dtype)


_ELEMENT_SIZE = {torch.float16: 2, torch.bfloat16: 2, torch.float32: 4, torch.float64: 8}
# The per-lane forward for k up to LANES_MAX_TOP_K when a launch has at least LANES_MIN_ROWS rows; otherwise the
# bucket forward, which spreads a row over up to 16 warps. Why 2048 rows: a warp keeps one 2 KiB block of logits in
# flight (the loop is not software-pipelined), and covering ~0.7 us of HBM latency at 4.8 TB/s (H200) takes ~3.4 MB
# in flight, i.e. ~1700 warps; at N = 8192 the SMs hold 32 one-warp programs each (8 MiB in flight). Above k = 64 each
# accepted key costs a reduction over K_PAD / 32 keys per lane (and there are ~k ln(V / k) of them); that range has
# not been costed, so the bucket kernel keeps it.
# From benchmarks/triton_cost.py (static SASS counts, benchmarks/RESULTS.md), not yet from a GPU timing.
LANES_MAX_TOP_K = 64
LANES_MIN_ROWS = 2048
LANES_DEFAULT = LaneForwardConfig(groups=4, num_warps=1)


@dataclass(frozen=True)
class BackwardConfig:
    block_v: int  # logits per program (power of two)
    num_warps: int


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


def next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def _on_device(tensor: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (a no-op context on the CPU)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _log2(power_of_two: int) -> int:
    return power_of_two.bit_length() - 1


def forward_config(vocab_size: int, top_k: int, num_rows: int = 0) -> ForwardConfig | LaneForwardConfig:
    """The forward's kernel and block sizes: the per-lane kernel for many rows and small k; else the bucket kernel,
    whole small rows in one block, 4096 logits per step for large vocabularies."""
    if num_rows >= LANES_MIN_ROWS and top_k <= LANES_MAX_TOP_K:
        return LANES_DEFAULT
    padded_k = next_power_of_two(max(top_k, 1))
    block_v = max(min(next_power_of_two(vocab_size), MAX_BLOCK_V), padded_k, 16)
    # About 16 logits per bucket: two candidates rarely share one once the k-th best has settled.
    buckets = min(block_v, max(padded_k, block_v // 16))
    # 16 warps at 4096: 8 logits per thread keep the top-k network under 128 registers without spills (sm_90,
    # Triton 3.6 and 3.9); 8 warps spilled a little with Triton 3.6.
    num_warps = 16 if block_v >= 4096 else 8 if block_v >= 2048 else 4
    return ForwardConfig(block_v=block_v, buckets=buckets, num_warps=num_warps)


def backward_config(vocab_size: int) -> BackwardConfig:
    block_v = max(min(next_power_of_two(vocab_size), MAX_BLOCK_V), 16)
    num_warps = 8 if block_v >= 2048 else 4
    return BackwardConfig(block_v=block_v, num_warps=num_warps)


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
    config = config or forward_config(vocab_size, top_k, num_rows)
    if isinstance(config, LaneForwardConfig):
        _lanes_forward(logits, labels, top_k, config, (row_max, log_sum, label_logits, belief_logits, belief_ids))
        return RawRowStats(row_max, log_sum, label_logits, belief_logits, belief_ids)
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
        kernels.bs_rows_backward_kernel[(num_rows, _cdiv(vocab_size, config.block_v))](
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


def _cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)
