"""Static cost model of impl="triton", CPU only: is each path the launcher can take bound by instruction issue or by
HBM on an H200, and does it keep enough bytes in flight?

For each kernel variant (a launch configuration of bs_kernels/backends/triton_kernels.py):
1. compile it for sm_90 with the ptxas that Triton ships (no GPU needed) and read its registers and local memory
   (spills) with the bundled cuobjdump;
2. disassemble the cubin with the bundled nvdisasm, build the control-flow graph of the SASS and count the
   instructions each thread issues on every code path of the loop over the vocabulary (skip a block, merge its
   candidates, visit a lane, ...), one SASS instruction = one issue slot of a warp; divergence fallbacks (BRA.DIV)
   are cold; the code outside that loop is counted once per program, every branch of it (an upper bound), and the
   split forward's merge kernel, straight-line, once per row;
3. replay the kernel's branch decisions in numpy on rows of a data model (random N(0, 9) rows, or real SmolLM2
   logits at TOFU answer positions; both rounded to bf16) to count how often each path runs;
4. combine: lane-instructions per logit = (instructions per thread per row) * threads / V.
A path is issue-bound when its issue time (132 SMs x 4 schedulers x 32 lanes x 1.98 GHz, every scheduler busy: a
lower bound) exceeds its HBM time (one read of the bf16 logits at 4.8 TB/s): above 13.9 lane-instructions per logit
(27.8 for the backward, which reads and writes).

The launcher table has one row per (V, k, N) for N = 256 to 8192 and k = 0, 20, 100: every forward path's cost, the
launcher's choice (bold) with its bytes in flight by the launcher's own model (bs_kernels/backends/triton_launch.py;
the bucket kernel's by the same rule at its registers) and the split forward's merge traffic, and the backward.

The numbers are a static estimate, not a measurement: no latency, no occupancy, no memory-system model; they say
which resource a kernel exhausts first if it is well fed. `bash benchmarks/gpu_check.sh` measures the real thing.

    python benchmarks/triton_cost.py                      # the tables of benchmarks/RESULTS.md (a few minutes)
    python benchmarks/triton_cost.py --data random        # random rows only (no model)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable

import numpy as np
import torch

from bs_kernels.backends import triton_plan as plan

# H200 SXM: 132 SMs, 4 schedulers per SM each issuing one warp instruction per clock, 1.98 GHz boost, 4.8 TB/s HBM3e.
H200 = {"sms": 132, "schedulers": 4, "clock_hz": 1.98e9, "hbm_bytes_per_s": 4.8e12}
ROWS_AT = 8192  # N of the benchmark shape
LOGIT_BYTES = 2  # bf16


def issue_budget_per_logit(gpu: dict = H200) -> float:
    """Lane-instructions per logit at which issue time equals HBM time."""
    lanes_per_s = gpu["sms"] * gpu["schedulers"] * 32 * gpu["clock_hz"]
    return lanes_per_s / (gpu["hbm_bytes_per_s"] / LOGIT_BYTES)


# ------------------------------------------------------------------------------------------------ compile + SASS


def nvidia_tool(name: str) -> pathlib.Path:
    import triton

    path = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    if not path.is_file():
        raise FileNotFoundError(f"this Triton ({triton.__version__}) ships no {name} at {path}")
    return path


def compile_kernel(
    kernel, signature: dict, constants: dict, num_warps: int, aligned: tuple[int, ...] = (), capability: int = 90
):
    """triton.compile for sm_<capability> without a GPU; ``aligned``: argument positions specialised as multiples of
    16 (as Triton does at launch for pointers, V and strides that are)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    signature = {**signature, **{name: "constexpr" for name in constants}}
    attrs = {(index,): [["tt.divisibility", 16]] for index in aligned}
    source = ASTSource(kernel, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps})


def _run_tool(name: str, cubin: bytes, *args: str) -> str:
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "kernel.cubin"
        path.write_bytes(cubin)
        result = subprocess.run([str(nvidia_tool(name)), *args, str(path)], capture_output=True, text=True, check=True)
    return result.stdout


def disassemble(cubin: bytes) -> str:
    return _run_tool("nvdisasm", cubin, "-c")


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, LOCAL, SHARED of the cubin's one function (cuobjdump -res-usage)."""
    text = _run_tool("cuobjdump", cubin, "-res-usage")
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|LOCAL|SHARED):(\d+)", text)}


_INSTRUCTION = re.compile(r"/\*[0-9a-f]+\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")


@dataclasses.dataclass
class Block:
    label: str | None
    instructions: list[str]  # opcodes (with modifiers), e.g. "LDG.E.128", "BAR.SYNC.DEFER_BLOCKING"
    successors: list[int] = dataclasses.field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.instructions)

    @property
    def barriers(self) -> int:
        return sum(opcode.startswith("BAR") for opcode in self.instructions)


def parse_sass(text: str) -> list[Block]:
    """Basic blocks of nvdisasm -c output with their successors (branch targets and fall-through).

    BRA.DIV (the fallback when a warp is divergent at a warp-synchronous shuffle) is treated as never taken.
    """
    blocks: list[Block] = []
    targets: list[tuple[str | None, bool]] = []  # per block: (branch target, falls through)
    current = Block(None, [])

    def close(target: str | None, falls_through: bool) -> None:
        nonlocal current
        if current.instructions or current.label is not None:
            blocks.append(current)
            targets.append((target, falls_through))
        current = Block(None, [])

    for line in text.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            close(None, True)
            current = Block(label.group(1), [])
            continue
        match = _INSTRUCTION.search(line)
        if not match:
            continue
        predicate, opcode, operands = match.groups()
        if opcode == "NOP":
            continue
        current.instructions.append(opcode)
        if opcode == "BRA.DIV":
            close(None, True)
        elif opcode == "BRA" or opcode.startswith("BRA."):
            target = re.search(r"\(?(\.L_x_\d+)\)?", operands)
            close(target.group(1) if target else None, predicate is not None)
        elif opcode == "EXIT" or opcode == "RET" or opcode.startswith("RET."):
            close(None, predicate is not None)
    close(None, False)
    index = {block.label: i for i, block in enumerate(blocks) if block.label}
    for i, (block, (target, falls_through)) in enumerate(zip(blocks, targets)):
        if target is not None and target in index:
            block.successors.append(index[target])
        if falls_through and i + 1 < len(blocks):
            block.successors.append(i + 1)
    return blocks


@dataclasses.dataclass
class LoopPath:
    """One pass of the outer loop's body, from its header to its latch, each inner loop entered at most once."""

    blocks: tuple[int, ...]
    count: int  # instructions per thread on this pass (an inner loop's body counted once)
    barriers: int
    inner: tuple[int, ...]  # headers of the inner loops the pass goes through
    loads: Counter


@dataclasses.dataclass
class KernelPaths:
    outside: int  # instructions per thread outside the outer loop (run once per program; an upper bound)
    paths: list[LoopPath]
    inner_cycle: dict[int, tuple[int, int]]  # inner loop header -> (instructions, barriers) of one more iteration
    loop_barriers: int  # BAR instructions anywhere in the outer loop


def _reachable(blocks: list[Block], start: int = 0) -> set[int]:
    seen, stack = set(), [start]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(blocks[node].successors)
    return seen


def _back_edges(blocks: list[Block]) -> list[tuple[int, int]]:
    edges, state = [], {}

    def visit(node: int) -> None:
        state[node] = 1
        for successor in blocks[node].successors:
            if state.get(successor) == 1:
                edges.append((node, successor))
            elif successor not in state:
                visit(successor)
        state[node] = 2

    sys.setrecursionlimit(max(10_000, sys.getrecursionlimit()))
    visit(0)
    return edges


def _natural_loop(blocks: list[Block], latch: int, header: int) -> set[int]:
    predecessors: dict[int, list[int]] = {}
    for i, block in enumerate(blocks):
        for successor in block.successors:
            predecessors.setdefault(successor, []).append(i)
    body, stack = {header, latch}, [latch] if latch != header else []
    while stack:
        node = stack.pop()
        for predecessor in predecessors.get(node, []):
            if predecessor not in body:
                body.add(predecessor)
                stack.append(predecessor)
    return body


def loop_paths(blocks: list[Block], max_paths: int = 4096) -> KernelPaths:
    """Every header-to-latch pass of the largest loop (the loop over the vocabulary), inner loops entered once."""
    reachable = _reachable(blocks)
    back = _back_edges(blocks)
    if not back:
        raise ValueError("the kernel has no loop")
    loops = {edge: _natural_loop(blocks, *edge) for edge in back}
    (outer_latch, outer_header), outer_body = max(loops.items(), key=lambda item: len(item[1]))
    inner_edges = {edge: body for edge, body in loops.items() if edge != (outer_latch, outer_header)}
    back_set = set(back)
    paths: list[LoopPath] = []

    def walk(node: int, trail: list[int]) -> None:
        if len(paths) >= max_paths:
            raise ValueError(f"more than {max_paths} paths through the loop")
        trail.append(node)
        if node == outer_latch:
            chosen = tuple(trail)
            loads = Counter(op for i in chosen for op in blocks[i].instructions if op.startswith(("LDG", "LD.")))
            inner = tuple(sorted({header for (_, header) in inner_edges if header in chosen}))
            count = sum(blocks[i].count for i in chosen)
            paths.append(LoopPath(chosen, count, sum(blocks[i].barriers for i in chosen), inner, loads))
        else:
            for successor in blocks[node].successors:
                if successor in outer_body and (node, successor) not in back_set and successor not in trail:
                    walk(successor, trail)
        trail.pop()

    walk(outer_header, [])
    inner_cycle = {}
    for (latch, header), body in inner_edges.items():
        if not body <= outer_body:
            continue
        # One more iteration: the longest header-to-latch path inside the inner loop.
        best = (0, 0)

        def inner_walk(node: int, count: int, bars: int, seen: frozenset, latch=latch, body=body) -> None:
            nonlocal best
            count, bars = count + blocks[node].count, bars + blocks[node].barriers
            if node == latch:
                best = max(best, (count, bars))
                return
            for successor in blocks[node].successors:
                if successor in body and (node, successor) not in back_set and successor not in seen:
                    inner_walk(successor, count, bars, seen | {successor})

        inner_walk(header, 0, 0, frozenset({header}))
        inner_cycle[header] = best
    outside = sum(blocks[i].count for i in reachable - outer_body)
    loop_barriers = sum(blocks[i].barriers for i in outer_body)
    return KernelPaths(outside, paths, inner_cycle, loop_barriers)


def count_spill_instructions(blocks: list[Block]) -> int:
    return sum(op.startswith(("LDL", "STL")) for block in blocks for op in block.instructions)


# ------------------------------------------------------------------------------------------------ the variants

_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}


_ALIGNED_INTS = ("vocab_size", "logits_row_stride", "grad_row_stride", "slice_len")


def _aligned(types: dict[str, str]) -> tuple[int, ...]:
    """Positions of the pointers and of V, the row strides and the slice length (multiples of 16 at V = 128 256)."""
    return tuple(i for i, (name, kind) in enumerate(types.items()) if kind.startswith("*") or name in _ALIGNED_INTS)


def signature(kernel_name: str, dtype: str = "bf16") -> tuple[dict[str, str], tuple[int, ...]]:
    """A kernel's argument types as the launcher passes them, and the positions Triton specialises as multiples of
    16 at the benchmark's shape (pointers, V = 128 256, its row stride, the slice length)."""
    stats = "*fp64" if dtype == "fp64" else "*fp32"
    rows = {
        "row_max_ptr": stats,
        "log_sum_ptr": stats,
        "label_logits_ptr": stats,
        "belief_logits_ptr": stats,
        "belief_ids_ptr": "*i64",
    }
    if kernel_name in ("bs_rows_forward_kernel", "bs_rows_forward_lanes_kernel"):
        types = {
            "logits_ptr": f"*{dtype}",
            "labels_ptr": "*i64",
            **rows,
            "vocab_size": "i32",
            "logits_row_stride": "i32",
        }
        return types, _aligned(types)
    partials = {"partial_max_ptr": stats, "partial_sum_ptr": stats, "partial_keys_ptr": "*i64"}
    if kernel_name == "bs_rows_forward_split_kernel":
        types = {
            "logits_ptr": f"*{dtype}",
            **partials,
            "vocab_size": "i32",
            "logits_row_stride": "i32",
            "slice_len": "i32",
        }
        return types, _aligned(types)
    if kernel_name == "bs_rows_merge_kernel":
        types = {
            "logits_ptr": f"*{dtype}",
            "labels_ptr": "*i64",
            **partials,
            **rows,
            "logits_row_stride": "i32",
            "slices": "i32",
        }
        return types, _aligned(types)
    if kernel_name == "bs_rows_backward_kernel":
        types = {
            "grad_ptr": f"*{dtype}",
            "logits_ptr": f"*{dtype}",
            "row_max_ptr": stats,
            "log_sum_ptr": stats,
            "grad_rows_ptr": stats,
            "vocab_size": "i32",
            "logits_row_stride": "i32",
            "grad_row_stride": "i32",
        }
        return types, _aligned(types)
    if kernel_name == "bs_rows_backward_fixup_kernel":
        per_row = ("row_max_ptr", "log_sum_ptr", "grad_rows_ptr", "label_coefs_ptr", "label_logits_ptr")
        types = {
            "grad_ptr": f"*{dtype}",
            "labels_ptr": "*i64",
            **{name: stats for name in per_row},
            "belief_ids_ptr": "*i64",
            "belief_weights_ptr": stats,
            "belief_logits_ptr": stats,
            "grad_row_stride": "i32",
            "K": "i32",
        }
        return types, ()  # its stores are scattered: nothing to specialise
    raise ValueError(f"unknown kernel {kernel_name!r}")


def forward_signature(dtype: str = "bf16") -> dict[str, str]:
    return signature("bs_rows_forward_lanes_kernel", dtype)[0]


@dataclasses.dataclass(frozen=True)
class Launch:
    """One compiled kernel the launcher can start: its name in triton_kernels.py, compile-time arguments, warps."""

    kernel_name: str
    constants: tuple  # sorted (name, value) pairs
    num_warps: int
    dtype: str = "bf16"

    @property
    def constants_dict(self) -> dict:
        return dict(self.constants)


def launch(kernel_name: str, constants: dict, num_warps: int, dtype: str = "bf16") -> Launch:
    return Launch(kernel_name, tuple(sorted(constants.items())), num_warps, dtype)


def config_launches(config, top_k: int, vocab_size: int, dtype: str = "bf16") -> list[Launch]:
    """The forward kernels a launcher config starts (the split forward: its kernel and its merge)."""
    from bs_kernels.backends import triton_launch as launcher

    torch_dtype = _TYPES[dtype]
    if isinstance(config, launcher.SplitForwardConfig):
        slice_len = config.slice_len(vocab_size, torch_dtype)
        slices = -(-vocab_size // slice_len)
        return [
            launch(
                "bs_rows_forward_split_kernel",
                launcher.lanes_constants(config.lanes, torch_dtype, top_k),
                config.lanes.num_warps,
                dtype,
            ),
            launch("bs_rows_merge_kernel", launcher.merge_constants(slices, torch_dtype, top_k), 1, dtype),
        ]
    if isinstance(config, launcher.LaneForwardConfig):
        constants = launcher.lanes_constants(config, torch_dtype, top_k)
        return [launch("bs_rows_forward_lanes_kernel", constants, config.num_warps, dtype)]
    log = lambda value: value.bit_length() - 1  # noqa: E731
    padded_k = 1 << max(0, (top_k - 1).bit_length())
    constants = dict(
        K=top_k,
        LOG_K_PAD=log(padded_k),
        LOG_BLOCK_V=log(config.block_v),
        LOG_BUCKETS=log(config.buckets),
        IS_FP64=dtype == "fp64",
    )
    return [launch("bs_rows_forward_kernel", constants, config.num_warps, dtype)]


def backward_launches(vocab_size: int, top_k: int, dtype: str = "bf16") -> list[Launch]:
    from bs_kernels.backends import triton_launch as launcher

    config = launcher.backward_config(vocab_size)
    padded_k = 1 << max(0, (top_k - 1).bit_length())
    return [
        launch("bs_rows_backward_kernel", dict(BLOCK_V=config.block_v), config.num_warps, dtype),
        launch("bs_rows_backward_fixup_kernel", dict(K_PAD=padded_k), 1, dtype),
    ]


def launcher_launches() -> list[Launch]:
    """Every kernel the launcher can pick, by representative: the per-lane forward at k = 0, 1, 20, 64, 128 (K_PAD 1
    to 128; 4 and 8 groups, 16 groups at k <= 64), the split forward and its merge (2 and 16 slices) at k <= 64, the
    bucket forward at k = 129 and 1024 (K_PAD 256 to the largest), the backward; bf16, and fp32 / fp64 (other loads
    and key packing) at k = 20."""
    from bs_kernels.backends import triton_launch as launcher

    out: list[Launch] = []
    for dtype in ("bf16", "fp32", "fp64"):
        for top_k in (0, 1, 20, 64, 128) if dtype == "bf16" else (20,):
            deep = plan.deep_lanes(_TYPES[dtype].itemsize)
            deeper = plan.deeper_lanes(_TYPES[dtype].itemsize) if top_k <= plan.SPLIT_MAX_TOP_K else deep
            for lanes in dict.fromkeys((plan.LANES_DEFAULT, deep, deeper)):
                out += config_launches(lanes, top_k, 128_256, dtype)
            if top_k <= plan.SPLIT_MAX_TOP_K:
                for slices in (2, 16):
                    split = launcher.SplitForwardConfig(deep, slices)
                    out += config_launches(split, top_k, slices * 16_384, dtype)
    for top_k in (plan.LANES_MAX_TOP_K + 1, 1024):
        out += config_launches(launcher.forward_config(128_256, top_k, 8192), top_k, 128_256)
    for top_k in (20, 1024):
        out += backward_launches(128_256, top_k)
    return list(dict.fromkeys(out))


@dataclasses.dataclass
class Variant:
    name: str
    launch: Launch  # the kernel whose loop is costed
    block_v: int
    top_k: int
    # names each LoopPath (or returns None when the path's shape is not the one expected) from the compiled paths
    name_paths: Callable[[KernelPaths], dict[str, tuple[int, int]]]
    # (row of float32 values, vocab) -> Counter of path names run on that row (a "name:r" key counts r rounds)
    replay: Callable[[np.ndarray], Counter]
    programs_per_row: Callable[[int], int] = lambda vocab: 1  # the split forward: its slices at this V
    merge: Callable[[int], Launch] | None = None  # run once per row after the kernel, at this V (code counted whole)


def name_bucket_paths(paths: KernelPaths) -> dict[str, tuple[int, int]]:
    """The bucket forward's loop: skip (block max), keys but no candidate, the full network, bucket rounds."""
    plain = sorted((p for p in paths.paths if not p.inner), key=lambda p: p.count)
    rounds = [p for p in paths.paths if p.inner]
    named = {"skip": (plain[0].count, plain[0].barriers)}
    if len(plain) >= 3:
        named["keys, none"] = (plain[1].count, plain[1].barriers)
    if len(plain) >= 2:
        named["full network"] = (plain[-1].count, plain[-1].barriers)
    if rounds:
        (header,) = rounds[0].inner
        named["bucket rounds"] = (rounds[0].count, rounds[0].barriers)
        named["+ one round"] = paths.inner_cycle[header]
    return named


def _ordered_keys(values: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """The kernel's int64 keys for float32 values: order-preserving value bits above the column."""
    bits = values.astype(np.float32).view(np.int32).astype(np.int64)
    ordered = np.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (ordered << 32) | cols.astype(np.int64)


MIN_KEY = np.iinfo(np.int64).min
MIN_TICKET = -(2**31)


def _cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def replay_buckets(block_v: int, buckets: int, top_k: int, max_rounds: int = 4):
    """The branch decisions of the bucket forward (bs_rows_forward_kernel) on one row."""
    k_pad = 1 << max(0, (top_k - 1).bit_length())

    def replay(row: np.ndarray) -> Counter:
        vocab = row.shape[0]
        ran: Counter = Counter()
        top = np.full(k_pad, MIN_KEY, np.int64)
        kth = MIN_KEY
        for start in range(0, vocab, block_v):
            z = np.full(block_v, -np.inf, np.float32)
            z[: min(block_v, vocab - start)] = row[start : start + block_v]
            cols = np.arange(start, start + block_v)
            if top_k == 0:
                ran["skip"] += 1
                continue
            if _ordered_keys(np.array([z.max()]), np.array([vocab - 1]))[0] <= kth:
                ran["skip"] += 1
                continue
            keys = np.where(cols < vocab, _ordered_keys(z, cols), MIN_KEY)
            candidates = np.where(keys > kth, keys, MIN_KEY).reshape(buckets, -1)
            if (candidates != MIN_KEY).sum(1).max() > max_rounds:
                ran["full network"] += 1
                top = np.sort(np.concatenate([top, candidates.ravel()]))[::-1][:k_pad]
                kth = top[top_k - 1]
                continue
            rounds = 0
            while candidates.max() != MIN_KEY:
                rounds += 1
                bucket_best = candidates.max(1)
                top = np.sort(np.concatenate([top, bucket_best]))[::-1][:k_pad]
                kth = top[top_k - 1]
                taken = candidates == bucket_best[:, None]
                candidates = np.where(taken | (candidates <= kth), MIN_KEY, candidates)
            if rounds == 0:
                ran["keys, none"] += 1
            else:
                ran["bucket rounds"] += 1
                ran["+ one round"] += rounds - 1
        return ran

    return replay


def name_lane_paths(paths: KernelPaths) -> dict[str, tuple[int, int]]:
    """The per-lane loop: every block (log-sum-exp and the lane test), plus per lane visited and per key accepted
    into the top. Costs are increments over the block's own (a visit's path minus the block's path)."""
    plain = [p for p in paths.paths if not p.inner]
    if len(plain) != 1:
        raise ValueError(f"expected one path without inner loops, got {len(plain)}")
    named = {"block": (plain[0].count, plain[0].barriers)}
    visits = [p for p in paths.paths if len(p.inner) == 1]
    offers = [p for p in paths.paths if len(p.inner) == 2]
    if visits and offers:
        visit_header = visits[0].inner[0]
        (offer_header,) = set(offers[0].inner) - {visit_header}
        offer = paths.inner_cycle[offer_header]
        named["first visit"] = (visits[0].count - plain[0].count, visits[0].barriers - plain[0].barriers)
        cycle = paths.inner_cycle[visit_header]
        named["another visit"] = (cycle[0] - offer[0], cycle[1] - offer[1])
        named["accepted offer"] = offer
    return named


def replay_lanes(groups: int, lanes: int, vec: int, top_k: int, slices: int = 1):
    """The branch decisions of the per-lane loop on one row (over each of its slices for the split forward): loop
    blocks, lanes visited, keys accepted. The first whole block of a row or slice (with the warm start for
    k <= lanes) and the partial last block run outside the loop: their straight-line code is in the kernel's
    code outside the loop; their visits and offers are counted here at the loop's costs."""
    block_v = groups * lanes * vec
    element = np.arange(groups * vec)
    lane_offsets = (element // vec) * (lanes * vec) + element % vec
    lane_ids = np.arange(lanes)
    warm = 0 < top_k <= lanes

    def replay(row: np.ndarray) -> Counter:
        vocab = row.shape[0]
        ran: Counter = Counter()
        slice_len = _cdiv(_cdiv(vocab, slices), block_v) * block_v  # as SplitForwardConfig.slice_len
        for slice_start in range(0, vocab, slice_len):
            end = min(vocab, slice_start + slice_len)
            top = MIN_KEY + 1 + np.arange(top_k, dtype=np.int64)
            kth = top.min() if top_k else MIN_KEY
            has_full = end - slice_start >= block_v
            for start in range(slice_start, end, block_v):
                first = start == slice_start and has_full
                ran["block"] += start + block_v <= end and not first
                if top_k == 0:
                    continue
                z = np.full(block_v, -np.inf, np.float32)
                z[: min(block_v, end - start)] = row[start : min(end, start + block_v)]
                lane_keys = _ordered_keys(z.reshape(groups, lanes, vec).max(axis=(0, 2)), lane_ids)
                floor = MIN_KEY
                if first and warm:
                    floor = ((np.sort(lane_keys)[::-1][top_k - 1] >> 32) << 32) - 1
                bound = max(kth, floor)
                lane_high = lane_keys >> 32
                pending = np.where(lane_high >= bound >> 32, (lane_high & -lanes) | lane_ids, MIN_TICKET)
                first_visit = True
                while True:
                    ticket = int(pending.max())
                    if ticket == MIN_TICKET or (ticket | (lanes - 1)) < bound >> 32:
                        break
                    ran["first visit" if first_visit else "another visit"] += 1
                    first_visit = False
                    lane = ticket & (lanes - 1)
                    pending[lane] = MIN_TICKET
                    cols = start + lane * vec + lane_offsets
                    cols = cols[cols < end]
                    for offer in np.sort(_ordered_keys(row[cols], cols))[::-1]:
                        if offer <= bound:
                            break
                        top[np.argmin(top)] = offer
                        kth = top.min()
                        bound = max(kth, floor)
                        ran["accepted offer"] += 1
        return ran

    return replay


def _config_name(config, top_k: int) -> str:
    from bs_kernels.backends import triton_launch as launcher

    if isinstance(config, launcher.SplitForwardConfig):
        return f"split-V k={top_k} {config.slices} slices x {config.lanes.groups} groups"
    if isinstance(config, launcher.LaneForwardConfig):
        return f"per-lane k={top_k} {config.groups} groups {config.num_warps}w"
    return f"bucket k={top_k} BLOCK_V={config.block_v} {config.num_warps}w"


def config_variant(config, top_k: int) -> Variant:
    """The cost-model variant of a launcher config (bf16)."""
    from bs_kernels.backends import triton_launch as launcher

    name = _config_name(config, top_k)
    if isinstance(config, launcher.SplitForwardConfig):
        lanes = config.lanes
        split, _ = config_launches(config, top_k, 1 << 20)
        vec = lanes.vector(torch.bfloat16)

        def programs(vocab: int, config=config) -> int:
            return -(-vocab // config.slice_len(vocab, torch.bfloat16))

        def merge(vocab: int, config=config) -> Launch:
            return config_launches(config, top_k, vocab)[1]

        return Variant(
            name,
            split,
            lanes.block_v(torch.bfloat16),
            top_k,
            name_lane_paths,
            replay_lanes(lanes.groups, 32 * lanes.num_warps, vec, top_k, config.slices),
            programs,
            merge,
        )
    (kernel,) = config_launches(config, top_k, 1 << 20)
    if isinstance(config, launcher.LaneForwardConfig):
        vec = config.vector(torch.bfloat16)
        return Variant(
            name,
            kernel,
            config.block_v(torch.bfloat16),
            top_k,
            name_lane_paths,
            replay_lanes(config.groups, 32 * config.num_warps, vec, top_k),
        )
    return Variant(
        name, kernel, config.block_v, top_k, name_bucket_paths, replay_buckets(config.block_v, config.buckets, top_k)
    )


ROWS = (256, 512, 1024, 2048, 4096, 8192)
TOP_KS = (0, 20, 100)


def table_configs(vocabs: tuple[int, ...]) -> dict[tuple[int, int, int], dict[str, object]]:
    """(V, k, N) -> the forward configs costed for it: the launcher's choice and the alternatives."""
    from bs_kernels.backends import triton_launch as launcher

    out = {}
    for vocab in vocabs:
        for top_k in TOP_KS:
            # The bucket kernel as the launcher configures it (its block sizes depend on k only above k = 256).
            bucket = launcher.forward_config(vocab, max(top_k, plan.LANES_MAX_TOP_K + 1), 0)
            for rows in ROWS:
                chosen = launcher.forward_config(vocab, top_k, rows)
                wanted = -(-plan.IN_FLIGHT_BYTES // (rows * plan.program_bytes_in_flight(plan.LANES_DEEP)))
                slices = min(wanted, plan.max_slices(vocab, top_k, 2))
                configs = {
                    "bucket": bucket,
                    "per-lane 4": plan.LANES_DEFAULT,
                    "per-lane 8": plan.LANES_DEEP,
                    "per-lane 16": plan.LANES_DEEPER,
                }
                if top_k <= plan.SPLIT_MAX_TOP_K and slices > 1:
                    configs["split-V"] = launcher.SplitForwardConfig(plan.LANES_DEEP, slices)
                out[vocab, top_k, rows] = {"chosen": chosen, **configs}
    return out


# ------------------------------------------------------------------------------------------------ data models


def random_rows(vocab: int, rows: int, seed: int = 0) -> np.ndarray:
    """N(0, 9) logits rounded to bf16 (the GPU benchmark's data), as float32."""
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator) * 3).to(torch.bfloat16).float().numpy()


def smollm2_rows(answers: int, seed: int = 0) -> np.ndarray:
    """SmolLM2-135M-Instruct's logits (V = 49 152) at the answer positions of TOFU forget10, rounded to bf16."""
    from bs_unlearn.data import read_qa_records, tokenize_qa
    from bs_unlearn.models import load_model_and_tokenizer

    # The TOFU folder: BS_TOFU_DIR, else shared/data/tofu beside the repository (where the tests look too).
    default = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
    tofu = pathlib.Path(os.environ.get("BS_TOFU_DIR", default)) / "forget10.jsonl"
    model, tokenizer = load_model_and_tokenizer("default")
    model.eval()
    rows = []
    with torch.no_grad():
        for record in read_qa_records(tofu, max_examples=answers, seed=seed):
            example = tokenize_qa(tokenizer, record["question"], record["answer"])
            input_ids = torch.tensor([example["input_ids"]])
            labels = torch.tensor(example["labels"])
            logits = model(input_ids=input_ids).logits[0, :-1]  # position j predicts token j + 1
            rows.append(logits[labels[1:] != -100].to(torch.bfloat16).float())
    return torch.cat(rows).numpy()


def widen_rows(rows: np.ndarray, vocab: int) -> np.ndarray:
    """Rows of a larger vocabulary made of consecutive real rows laid end to end (row i, i + 1, ...), cut to V."""
    copies = -(-vocab // rows.shape[1])
    wide = [np.concatenate([rows[(i + c) % len(rows)] for c in range(copies)])[:vocab] for i in range(len(rows))]
    return np.stack(wide)


# ------------------------------------------------------------------------------------------------ the model


@dataclasses.dataclass
class Compiled:
    launch: Launch
    usage: dict[str, int]
    spills: int
    blocks: list[Block]
    wide_loads: bool  # a 16-byte global load anywhere

    @property
    def total(self) -> int:
        """Instructions per thread over all of the kernel's code, each counted once (straight-line kernels)."""
        return sum(block.count for block in self.blocks)


_COMPILED: dict[tuple[Launch, int], Compiled] = {}


def compile_launch(kernel_launch: Launch, capability: int = 90) -> Compiled:
    key = (kernel_launch, capability)
    if key not in _COMPILED:
        kernels = __import__("bs_kernels.backends.triton_kernels", fromlist=["_"])
        kernel = getattr(kernels, kernel_launch.kernel_name)
        types, aligned = signature(kernel_launch.kernel_name, kernel_launch.dtype)
        compiled = compile_kernel(
            kernel, types, kernel_launch.constants_dict, kernel_launch.num_warps, aligned, capability
        )
        cubin = compiled.asm["cubin"]
        blocks = parse_sass(disassemble(cubin))
        wide = any(op.startswith("LDG") and op.endswith(".128") for block in blocks for op in block.instructions)
        _COMPILED[key] = Compiled(kernel_launch, resource_usage(cubin), count_spill_instructions(blocks), blocks, wide)
    return _COMPILED[key]


def _compile_pair(pair: tuple[Launch, int]) -> Compiled:
    return compile_launch(*pair)


def compile_launches(pairs: list[tuple[Launch, int]], workers: int) -> None:
    """Fills compile_launch's cache for every (launch, capability) of ``pairs``, ``workers`` compiles at a time.

    Each compile is one core's work (Triton's passes and ptxas), and the CI test compiles some two hundred: worker
    processes (spawned, so no torch or OpenMP state is forked) do them side by side and send back what was read."""
    todo = [pair for pair in dict.fromkeys(pairs) if pair not in _COMPILED]
    if workers <= 1 or len(todo) <= 1:
        for pair in todo:
            _compile_pair(pair)
        return
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        for pair, compiled in zip(todo, pool.map(_compile_pair, todo)):
            _COMPILED[pair] = compiled


@dataclasses.dataclass
class LoopCost:
    variant: Variant
    compiled: Compiled
    paths: dict[str, tuple[int, int]]
    outside: int
    loop_barriers: int


def loop_cost(variant: Variant) -> LoopCost:
    compiled = compile_launch(variant.launch)
    paths = loop_paths(compiled.blocks)
    return LoopCost(variant, compiled, variant.name_paths(paths), paths.outside, paths.loop_barriers)


def evaluate(cost: LoopCost, rows: np.ndarray) -> dict:
    """Lane-instructions per logit of a forward on rows (float32 values of bf16 logits), and the replay's counts."""
    variant = cost.variant
    vocab = rows.shape[1]
    ran: Counter = Counter()
    for row in rows:
        ran.update(variant.replay(row))
    per_row = sum(cost.paths[name][0] * times for name, times in ran.items()) / len(rows)
    per_row += cost.outside * variant.programs_per_row(vocab)
    threads = variant.launch.num_warps * 32
    lane_instructions = per_row * threads
    if variant.merge is not None:
        merge = compile_launch(variant.merge(vocab))
        lane_instructions += merge.total * merge.launch.num_warps * 32
    frequency = {name: times / len(rows) for name, times in sorted(ran.items())}
    return dict(per_logit=lane_instructions / vocab, frequency=frequency)


def issue_ms(per_logit: float, rows: int, vocab: int) -> float:
    """The issue-bound time of rows x vocab logits at per_logit lane-instructions each (every scheduler busy)."""
    lanes_per_s = H200["sms"] * H200["schedulers"] * 32 * H200["clock_hz"]
    return per_logit * rows * vocab / lanes_per_s * 1e3


def hbm_ms(rows: int, vocab: int, passes: int = 1) -> float:
    return passes * rows * vocab * LOGIT_BYTES / H200["hbm_bytes_per_s"] * 1e3


def backward_per_logit(vocab: int, top_k: int) -> tuple[float, dict]:
    """The backward (dense kernel + fixup), all code counted once per program: lane-instructions per logit."""
    dense, fixup = (compile_launch(item) for item in backward_launches(vocab, top_k))
    block_v = dict(dense.launch.constants)["BLOCK_V"]
    per_logit = dense.total * dense.launch.num_warps * 32 / block_v + fixup.total * 32 / vocab
    return per_logit, {"dense": dense, "fixup": fixup}


def bucket_in_flight(compiled: Compiled, config, rows: int) -> int:
    """The bucket kernel's bytes in flight by the launcher's model: one block per resident CTA."""
    registers = -(-compiled.usage["REG"] // 8) * 8 * 32 * config.num_warps
    per_sm = min(32, 64 // config.num_warps, 65_536 // registers)
    return min(rows, H200["sms"] * per_sm) * config.block_v * LOGIT_BYTES


def in_flight(config, rows: int, compiled: Compiled) -> int:
    from bs_kernels.backends import triton_launch as launcher

    if isinstance(config, launcher.ForwardConfig):
        return bucket_in_flight(compiled, config, rows)
    return plan.bytes_in_flight(config, rows)


def merge_traffic(config, vocab: int, top_k: int) -> float:
    """The split forward's partials (written, then read by the merge) over the logits' bytes; 0 for the others."""
    from bs_kernels.backends import triton_launch as launcher

    if not isinstance(config, launcher.SplitForwardConfig):
        return 0.0
    slices = -(-vocab // config.slice_len(vocab, torch.bfloat16))
    return 2 * slices * (8 + 8 * top_k) / (vocab * LOGIT_BYTES)


def variant_table(costs: dict[str, LoopCost], results: dict, data_names: list[str]) -> str:
    lines = [
        "| variant | registers | LDL/STL | BAR in loop | SASS per thread: path instructions (barriers); outside the "
        "loop | " + " | ".join(data_names) + " |",
        "|---|---|---|---|---|" + "---|" * len(data_names),
    ]
    for name, cost in costs.items():
        paths = "; ".join(f"{path} {count} ({bars})" for path, (count, bars) in cost.paths.items())
        cells = " | ".join(
            f"{results[name, data]['per_logit']:.1f}" if (name, data) in results else "-" for data in data_names
        )
        lines.append(
            f"| {name} | {cost.compiled.usage.get('REG')} | {cost.compiled.spills} | {cost.loop_barriers} | {paths}; "
            f"outside {cost.outside} | {cells} |"
        )
    return "\n".join(lines)


def launcher_table(configs: dict, costs: dict, results: dict, data: list[tuple[str, int]], backward: dict) -> str:
    """One row per (V, k, N): every forward path's lane-instructions per logit (per data model of that V, in order),
    the launcher's choice in bold with its bytes in flight, merge traffic, issue and HBM times, and the backward."""
    budget = issue_budget_per_logit()
    lines = [
        "| V | k | N | bucket | per-lane 4 groups | per-lane 8 groups | per-lane 16 groups | split-V | chosen | in "
        "flight (MB) | merge traffic | chosen: issue / HBM us | backward per logit (budget 2x) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (vocab, top_k, rows), entry in configs.items():
        names = {kind: _config_name(config, top_k) for kind, config in entry.items()}
        datas = [name for name, v in data if v == vocab]
        cells = []
        for kind in ("bucket", "per-lane 4", "per-lane 8", "per-lane 16", "split-V"):
            if kind not in entry:
                cells.append("-")
                continue
            values = "; ".join(f"{results[names[kind], d]['per_logit']:.1f}" for d in datas)
            if names[kind] == names["chosen"]:
                values = f"**{values}**"
            if kind == "split-V":
                values = f"{entry[kind].slices} slices: {values}"
            cells.append(values)
        chosen = names["chosen"]
        worst = max(results[chosen, d]["per_logit"] for d in datas)
        flight = in_flight(entry["chosen"], rows, costs[chosen].compiled) / 1e6
        traffic = merge_traffic(entry["chosen"], vocab, top_k)
        issue = issue_ms(worst, rows, vocab) * 1e3
        mark = "" if worst <= budget else " (issue-bound)"
        lines.append(
            f"| {vocab:,} | {top_k} | {rows} | " + " | ".join(cells) + f" | {chosen}{mark} | {flight:.1f} | "
            f"{traffic:.2%} | {issue:.0f} / {hbm_ms(rows, vocab) * 1e3:.0f} | {backward[vocab, top_k]:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="random,smollm2", help="random and/or smollm2")
    parser.add_argument("--rows", type=int, default=48, help="random rows per vocabulary")
    parser.add_argument("--answers", type=int, default=24, help="TOFU forget10 answers run through SmolLM2")
    parser.add_argument("--max-rows", type=int, default=256, help="at most this many SmolLM2 rows are replayed")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    data: list[tuple[str, np.ndarray]] = []
    for name in args.data.split(","):
        if name == "random":
            data += [(f"random N(0,9), V = {vocab:,}", random_rows(vocab, args.rows)) for vocab in (49_152, 128_256)]
        elif name == "smollm2":
            rows = smollm2_rows(args.answers)
            rows = rows[np.random.default_rng(0).permutation(len(rows))[: args.max_rows]]
            data += [
                ("SmolLM2 on TOFU, V = 49,152", rows),
                ("SmolLM2 rows laid end to end, V = 128,256", widen_rows(rows, 128_256)),
            ]
        else:
            raise SystemExit(f"--data: unknown data model {name!r} (random, smollm2)")
    data.sort(key=lambda item: item[1].shape[1])
    budget = issue_budget_per_logit()
    print(f"budget: {budget:.1f} lane-instructions per logit (H200: issue time = HBM time)", flush=True)
    vocabs = tuple(sorted({rows.shape[1] for _, rows in data}))
    configs = table_configs(vocabs)
    variants: dict[str, tuple[Variant, set[int]]] = {}
    for (vocab, top_k, _), entry in configs.items():
        for config in entry.values():
            variant = config_variant(config, top_k)
            variants.setdefault(variant.name, (variant, set()))[1].add(vocab)
    costs: dict[str, LoopCost] = {}
    results: dict[tuple[str, str], dict] = {}
    for name, (variant, vocab_set) in variants.items():
        costs[name] = cost = loop_cost(variant)
        for data_name, rows in data:
            if rows.shape[1] in vocab_set:
                results[name, data_name] = evaluate(cost, rows)
                print(
                    f"{name:48s} {data_name:44s} {results[name, data_name]['per_logit']:6.1f} per logit  "
                    f"{results[name, data_name]['frequency']}",
                    flush=True,
                )
    backward = {(vocab, top_k): backward_per_logit(vocab, top_k)[0] for vocab in vocabs for top_k in TOP_KS}
    named_data = [(name, rows.shape[1]) for name, rows in data]
    print()
    print(variant_table(costs, results, [name for name, _ in data]))
    print()
    print(launcher_table(configs, costs, results, named_data, backward))
    if args.json:
        payload = [dict(variant=name, data=data_name, **result) for (name, data_name), result in results.items()]
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
