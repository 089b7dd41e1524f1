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


@dataclass(frozen=True)
class SplitForwardConfig:
    """The split-vocabulary forward: each row's columns cut into ``slices`` slices of whole per-lane blocks, one
    program per (row, slice) running the per-lane loop over its slice (bs_rows_forward_split_kernel), then one
    program per row merging the slices' partials (bs_rows_merge_kernel)."""

    lanes: LaneForwardConfig
    slices: int  # >= 1; fewer run when V holds fewer blocks

    def slice_len(self, vocab_size: int, dtype: torch.dtype) -> int:
        block_v = self.lanes.block_v(dtype)
        return _cdiv(_cdiv(vocab_size, self.slices), block_v) * block_v


# Which forward, from two models (benchmarks/triton_cost.py; benchmarks/RESULTS.md has the table of every path):
# - issue: lane-instructions per logit from the SASS with its paths replayed on random and on real logits; the
#   H200 issues 13.9 per logit in the time HBM delivers one bf16 logit. The per-lane kernel is under that at any N
#   at k <= 64 (8-11 at k = 20, 6 at k = 0) and 5-10x cheaper than the bucket kernel at k = 100 (20-38 against
#   190-240, both issue-bound there); above k = 128 neither has been costed and the bucket kernel, exact up to
#   k = 1024, keeps that range. A split row costs more: every slice fills its own top k from scratch (the warm
#   start of its first block, k <= 32, saves part of that), and each slice runs its program's code outside the
#   loop once, so a slice keeps at least SLICE_MIN_LOGITS logits (at V = 49 152, 2 slices: 14.8 per logit at k = 20
#   on random rows, 12.9 on SmolLM2's, 7.7 at k = 0; since z - m is formed before the exp2 (issue 26) the
#   block costs one FADD per logit more, which put the random-row k = 20 case over the budget), and rows are split
#   only at k <= 64.
# - bytes in flight (Little's law): HBM delivers its bandwidth only with bandwidth x latency bytes requested and not
#   yet returned: 4.8 TB/s x 600-800 ns = 2.9-3.8 MB on an H200; IN_FLIGHT_BYTES asks for 3 MiB. A one-warp program
#   has one block of loads in flight (issued together; the loop is not software-pipelined): groups x 32 lanes x
#   16 bytes, 2 KiB at 4 groups, 4 KiB at 8. Programs resident at once: per SM, the fewest of 32 CTAs, 64 warps and
#   65 536 registers / (registers per thread, rounded up to 8, x 32 lanes); registers per config as compiled for
#   sm_90 (tests/kernels/test_triton_sass.py checks the compiled count against LANES_REGISTERS).
# The launcher takes the first of: the 4-group per-lane kernel, the 8-group one, that one split into the fewest
# slices that reach IN_FLIGHT_BYTES, within the slice limits (SLICE_MIN_LOGITS, MAX_SLICES, and the merge's
# traffic, S x (8 + 8 k) bytes per row written and read again, at most MERGE_TRAFFIC of the logits' bytes). Below
# the slice limits it runs with fewer bytes in flight than asked (e.g. N = 256 rows of V = 49 152 at k = 20: 2
# slices, 2 MiB).
LANES_MAX_TOP_K = 128
SPLIT_MAX_TOP_K = 64
LANES_DEFAULT = LaneForwardConfig(groups=4, num_warps=1)
LANES_DEEP = LaneForwardConfig(groups=8, num_warps=1)
LANES_REGISTERS = {LANES_DEFAULT: 64, LANES_DEEP: 96}  # upper bounds, sm_90, k <= 128, 16/32-bit logits
# float64 logits take the 4-group kernel for the deep one too: 8 groups of float64 keys need a 16-byte stack frame
# on sm_90 (tests/kernels/test_triton_sass.py).
H200_SMS = 132
IN_FLIGHT_BYTES = 3 << 20
SLICE_MIN_LOGITS = 24_576
MAX_SLICES = 16
MERGE_TRAFFIC = 0.02


def deep_lanes(element_size: int) -> LaneForwardConfig:
    """The per-lane config with the most bytes in flight per program for this element size."""
    return LANES_DEEP if element_size < 8 else LANES_DEFAULT


def program_bytes_in_flight(config: LaneForwardConfig) -> int:
    """Bytes one program of the per-lane loop has requested at once: one block of 16-byte vectors."""
    return config.groups * 32 * config.num_warps * 16


def resident_programs(config: LaneForwardConfig) -> int:
    """Programs of LANES_DEFAULT or LANES_DEEP an H200 holds at once (CTA, warp and register limits per SM)."""
    registers = -(-LANES_REGISTERS[config] // 8) * 8 * 32 * config.num_warps
    return H200_SMS * min(32, 64 // config.num_warps, 65_536 // registers)


def bytes_in_flight(config: LaneForwardConfig | SplitForwardConfig, num_rows: int) -> int:
    """The launcher's Little's-law model: bytes requested from HBM at once by a launch over num_rows rows."""
    lanes, slices = (config.lanes, config.slices) if isinstance(config, SplitForwardConfig) else (config, 1)
    return min(num_rows * slices, resident_programs(lanes)) * program_bytes_in_flight(lanes)


def max_slices(vocab_size: int, top_k: int, element_size: int) -> int:
    """The most slices a row of this V and k is split into (the limits above)."""
    stats_bytes = 8 if element_size == 8 else 4
    merge_bytes_per_slice = 2 * (2 * stats_bytes + 8 * top_k)  # written by the split kernel, read by the merge
    by_merge = int(MERGE_TRAFFIC * vocab_size * element_size // merge_bytes_per_slice)
    by_cost = vocab_size // SLICE_MIN_LOGITS
    return max(1, min(MAX_SLICES, by_merge, by_cost))


# Tests set this (a ForwardConfig, LaneForwardConfig or SplitForwardConfig) to route every launch, the public API's
# included, through one path at sizes the interpreter can run; None: forward_config decides.
_FORWARD_OVERRIDE: ForwardConfig | LaneForwardConfig | SplitForwardConfig | None = None


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


def forward_config(
    vocab_size: int, top_k: int, num_rows: int = 0, element_size: int = 2
) -> ForwardConfig | LaneForwardConfig | SplitForwardConfig:
    """The forward's kernel and block sizes (the choice is explained above LANES_MAX_TOP_K): for k <= 128 the
    per-lane kernel, split along V (k <= 64) when the rows alone keep too few bytes in flight; else the bucket kernel,
    whole small rows in one block, 4096 logits per step for large vocabularies."""
    if top_k <= LANES_MAX_TOP_K:
        deep = deep_lanes(element_size)
        for lanes in (LANES_DEFAULT, deep):
            if bytes_in_flight(lanes, num_rows) >= IN_FLIGHT_BYTES:
                return lanes
        if top_k > SPLIT_MAX_TOP_K:
            return deep
        wanted = _cdiv(IN_FLIGHT_BYTES, max(num_rows, 1) * program_bytes_in_flight(deep))
        slices = min(wanted, max_slices(vocab_size, top_k, element_size))
        return deep if slices <= 1 else SplitForwardConfig(deep, slices)
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
    slices = _cdiv(vocab_size, slice_len)
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
