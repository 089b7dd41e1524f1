"""impl="triton": which kernel and block sizes a launch takes, and the models behind the choice.

The forward's three paths (per-lane, split-vocabulary, bucket) and the backward's blocks are chosen here from the
rows, V, k and the element size, by the cost model of benchmarks/triton_cost.py and the bytes-in-flight model stated
above LANES_MAX_TOP_K; triton_launch.py launches what this module picks. No Triton import: the choice can be asked
for (tests, the cost model) on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_BLOCK_V = 4096


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
        return cdiv(cdiv(vocab_size, self.slices), block_v) * block_v


# Which forward, from two models (benchmarks/triton_cost.py; benchmarks/RESULTS.md has the table of every path):
# - issue: lane-instructions per logit from the SASS with its paths replayed on random and on real logits; the
#   H200 issues 13.9 per logit in the time HBM delivers one bf16 logit. The per-lane kernel is under that at any N
#   at k <= 64 (8-13 at k = 20 with 4 to 16 groups, 7-8 at k = 0) and 5-10x cheaper than the bucket kernel at
#   k = 100 (20-46 against 190-240, both issue-bound there); above k = 128 neither has been costed and the bucket
#   kernel, exact up to k = 1024, keeps that range. A split row costs more: every slice fills its own top k from
#   scratch (the warm start of its first block, k <= 32, saves part of that), and each slice runs its program's
#   code outside the loop once, so a slice keeps at least SLICE_MIN_LOGITS logits (at V = 49 152, 2 slices of
#   8-group blocks: 14.8 per logit at k = 20 on random rows, over the budget, against 12.9 unsplit with 16 groups),
#   and rows are split only at k <= 64.
# - bytes in flight (Little's law): HBM delivers its bandwidth only with bandwidth x latency bytes requested and not
#   yet returned: 4.8 TB/s x 600-800 ns = 2.9-3.8 MB on an H200; IN_FLIGHT_BYTES asks for 3 MiB. A one-warp program
#   has one block of loads in flight (issued together; the loop is not software-pipelined): groups x 32 lanes x
#   16 bytes, 2 KiB at 4 groups, 4 KiB at 8, 8 KiB at 16. Programs resident at once: per SM, the fewest of 32 CTAs,
#   64 warps and 65 536 registers / (registers per thread, rounded up to 8, x 32 lanes); registers per config as
#   compiled for sm_90 (tests/kernels/test_triton_sass.py checks the compiled count against LANES_REGISTERS).
# The launcher takes the first of the 4-group and the 8-group per-lane kernels that reaches IN_FLIGHT_BYTES; at
# k > 64 (issue-bound: more bytes in flight buy nothing) the 8-group one. At k <= 64, the 16-group kernel if it
# reaches IN_FLIGHT_BYTES (it costs ~1 more per logit than 8 groups at k = 20: more lanes' worth of logits per visit),
# else the 8-group kernel split into the fewest slices that reach it, within the slice limits (SLICE_MIN_LOGITS,
# MAX_SLICES, and the merge's traffic, S x (8 + 8 k) bytes per row written and read again, at most MERGE_TRAFFIC of
# the logits' bytes), when that split keeps more bytes in flight than the 16-group kernel, else the 16-group kernel
# with fewer bytes in flight than asked (e.g. N = 256 rows of V = 49 152: 2 MiB either way; the 16-group kernel is
# the cheaper).
LANES_MAX_TOP_K = 128
SPLIT_MAX_TOP_K = 64
LANES_DEFAULT = LaneForwardConfig(groups=4, num_warps=1)
LANES_DEEP = LaneForwardConfig(groups=8, num_warps=1)
LANES_DEEPER = LaneForwardConfig(groups=16, num_warps=1)  # k <= SPLIT_MAX_TOP_K only
# Upper bounds, sm_90, 16/32-bit logits: k <= 128 (4 and 8 groups), k <= 64 (16 groups).
LANES_REGISTERS = {LANES_DEFAULT: 64, LANES_DEEP: 96, LANES_DEEPER: 200}
# float64 logits take the 4-group kernel for the deep ones too: 8 groups of float64 keys need a 16-byte stack frame
# on sm_90 (tests/kernels/test_triton_sass.py).
H200_SMS = 132
IN_FLIGHT_BYTES = 3 << 20
SLICE_MIN_LOGITS = 24_576
MAX_SLICES = 16
MERGE_TRAFFIC = 0.02


def deep_lanes(element_size: int) -> LaneForwardConfig:
    """The 8-group per-lane config for this element size (float64: the 4-group one)."""
    return LANES_DEEP if element_size < 8 else LANES_DEFAULT


def deeper_lanes(element_size: int) -> LaneForwardConfig:
    """The per-lane config with the most bytes in flight per program for this element size (k <= 64)."""
    return LANES_DEEPER if element_size < 8 else LANES_DEFAULT


def program_bytes_in_flight(config: LaneForwardConfig) -> int:
    """Bytes one program of the per-lane loop has requested at once: one block of 16-byte vectors."""
    return config.groups * 32 * config.num_warps * 16


def resident_programs(config: LaneForwardConfig) -> int:
    """Programs of a LANES_REGISTERS config an H200 holds at once (CTA, warp and register limits per SM)."""
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


@dataclass(frozen=True)
class BackwardConfig:
    block_v: int  # logits per program (power of two)
    num_warps: int


def next_power_of_two(value: int) -> int:
    return 1 << max(0, (value - 1).bit_length())


def forward_config(
    vocab_size: int, top_k: int, num_rows: int = 0, element_size: int = 2
) -> ForwardConfig | LaneForwardConfig | SplitForwardConfig:
    """The forward's kernel and block sizes (the choice is explained above LANES_MAX_TOP_K): for k <= 128 the
    per-lane kernel with 4, 8 or (k <= 64) 16 groups, or split along V (k <= 64) when the rows alone keep too few
    bytes in flight; else the bucket kernel, whole small rows in one block, 4096 logits per step for large
    vocabularies."""
    if top_k <= LANES_MAX_TOP_K:
        deep = deep_lanes(element_size)
        for lanes in (LANES_DEFAULT, deep):
            if bytes_in_flight(lanes, num_rows) >= IN_FLIGHT_BYTES:
                return lanes
        if top_k > SPLIT_MAX_TOP_K:
            return deep
        deeper = deeper_lanes(element_size)
        if bytes_in_flight(deeper, num_rows) >= IN_FLIGHT_BYTES:
            return deeper
        wanted = cdiv(IN_FLIGHT_BYTES, max(num_rows, 1) * program_bytes_in_flight(deep))
        slices = min(wanted, max_slices(vocab_size, top_k, element_size))
        split = SplitForwardConfig(deep, slices)
        return split if slices > 1 and bytes_in_flight(split, num_rows) > bytes_in_flight(deeper, num_rows) else deeper
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


def cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)
