"""Static cost model of the impl="triton" forward, CPU only: is it bound by instruction issue or by HBM on an H200?

For each kernel variant (a launch configuration of bs_kernels/backends/triton_kernels.py):
1. compile it for sm_90 with the ptxas that Triton ships (no GPU needed) and read its registers and local memory
   (spills) with the bundled cuobjdump;
2. disassemble the cubin with the bundled nvdisasm, build the control-flow graph of the SASS and count the
   instructions each thread issues on every code path of the loop over the vocabulary (skip a block, merge its
   candidates, ...), one SASS instruction = one issue slot of a warp; divergence fallbacks (BRA.DIV) are cold;
3. replay the kernel's branch decisions in numpy on rows of a data model (random N(0, 9) rows, or real SmolLM2
   logits at TOFU answer positions; both rounded to bf16) to count how often each path runs;
4. combine: lane-instructions per logit = (instructions per thread per row) * threads / V, and at N = 8192 rows the
   issue-bound time (every SM issuing one warp instruction per scheduler per clock: a lower bound) next to the HBM
   time (one read of the bf16 logits at the H200's peak bandwidth).
A variant is issue-bound when its issue time exceeds its HBM time: at 132 SMs x 4 schedulers x 32 lanes x 1.98 GHz
against 4.8 TB/s of 2-byte logits, that is above about 14 lane-instructions per logit.

The numbers are a static estimate, not a measurement: no latency, no occupancy, no memory-system model; they say
which resource a kernel exhausts first if it is well fed. `bash benchmarks/gpu_check.sh` measures the real thing.

    python benchmarks/triton_cost.py                      # the table of benchmarks/RESULTS.md (a few minutes)
    python benchmarks/triton_cost.py --data random        # random rows only (no model)
    python benchmarks/triton_cost.py --variants current   # the current kernels only
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


def compile_for_hopper(kernel, signature: dict, constants: dict, num_warps: int, aligned: tuple[int, ...] = ()):
    """triton.compile for sm_90 without a GPU; ``aligned``: argument positions specialised as multiples of 16."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default
    signature = {**signature, **{name: "constexpr" for name in constants}}
    attrs = {(index,): [["tt.divisibility", 16]] for index in aligned}
    source = ASTSource(kernel, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


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


def forward_signature(dtype: str = "bf16") -> dict[str, str]:
    return {
        "logits_ptr": f"*{dtype}",
        "labels_ptr": "*i64",
        "row_max_ptr": "*fp32",
        "log_sum_ptr": "*fp32",
        "label_logits_ptr": "*fp32",
        "belief_logits_ptr": "*fp32",
        "belief_ids_ptr": "*i64",
        "vocab_size": "i32",
        "logits_row_stride": "i32",
    }


@dataclasses.dataclass
class Variant:
    name: str
    kernel_name: str  # attribute of bs_kernels.backends.triton_kernels
    constants: dict
    num_warps: int
    block_v: int
    top_k: int
    # names each LoopPath (or returns None when the path's shape is not the one expected) from the compiled paths
    name_paths: Callable[[KernelPaths], dict[str, tuple[int, int]]]
    # (row of float32 values, vocab) -> Counter of path names run on that row (a "name:r" key counts r rounds)
    replay: Callable[[np.ndarray], Counter]
    signature: dict = dataclasses.field(default_factory=forward_signature)
    aligned: tuple[int, ...] = (0, 7, 8)


def name_bucket_paths(paths: KernelPaths) -> dict[str, tuple[int, int]]:
    """The current forward's loop: skip (block max), keys but no candidate, the full network, bucket rounds."""
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


def replay_current(block_v: int, buckets: int, top_k: int, max_rounds: int = 4):
    """The branch decisions of the current forward (triton_kernels.py, before the per-lane rewrite) on one row."""
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


def current_variants() -> list[Variant]:
    out = []
    for block_v, warps in ((4096, 16), (2048, 8), (1024, 4), (512, 2), (256, 1)):
        buckets = max(32, block_v // 16)
        out.append(
            Variant(
                name=f"current k=20 BLOCK_V={block_v} {warps}w" + (" (default)" if block_v == 4096 else ""),
                kernel_name="bs_rows_forward_kernel",
                constants=dict(
                    K=20,
                    LOG_K_PAD=5,
                    LOG_BLOCK_V=block_v.bit_length() - 1,
                    LOG_BUCKETS=buckets.bit_length() - 1,
                    IS_FP64=False,
                ),
                num_warps=warps,
                block_v=block_v,
                top_k=20,
                name_paths=name_bucket_paths,
                replay=replay_current(block_v, buckets, 20),
            )
        )
    out.append(
        Variant(
            name="current k=0 BLOCK_V=4096 16w",
            kernel_name="bs_rows_forward_kernel",
            constants=dict(K=0, LOG_K_PAD=0, LOG_BLOCK_V=12, LOG_BUCKETS=8, IS_FP64=False),
            num_warps=16,
            block_v=4096,
            top_k=0,
            name_paths=name_bucket_paths,
            replay=replay_current(4096, 256, 0),
        )
    )
    return out


def name_lane_paths(paths: KernelPaths) -> dict[str, tuple[int, int]]:
    """The per-lane forward's loop: every block (log-sum-exp and the lane test), plus per lane visited and per key
    accepted into the top. Costs are increments over the block's own (a visit's path minus the block's path)."""
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


def replay_lanes(groups: int, lanes: int, vec: int, top_k: int):
    """The branch decisions of bs_rows_forward_lanes_kernel on one row: blocks, lanes visited, keys accepted."""
    block_v = groups * lanes * vec
    element = np.arange(groups * vec)
    lane_offsets = (element // vec) * (lanes * vec) + element % vec
    lane_ids = np.arange(lanes)

    def replay(row: np.ndarray) -> Counter:
        vocab = row.shape[0]
        ran: Counter = Counter()
        slots = np.arange(top_k, dtype=np.int64)
        top = MIN_KEY + 1 + slots
        kth = top.min() if top_k else MIN_KEY
        for start in range(0, vocab, block_v):
            # The partial last block runs outside the loop (its code is in KernelPaths.outside).
            ran["block"] += start + block_v <= vocab
            if top_k == 0:
                continue
            z = np.full(block_v, -np.inf, np.float32)
            z[: min(block_v, vocab - start)] = row[start : start + block_v]
            lane_max = z.reshape(groups, lanes, vec).max(axis=(0, 2))
            lane_keys = _ordered_keys(lane_max, lane_ids)
            pending = np.where((lane_keys >> 32) >= (kth >> 32), lane_keys, MIN_KEY)
            first = True
            while True:
                next_lane = pending.max()
                if next_lane == MIN_KEY or (next_lane >> 32) < (kth >> 32):
                    break
                ran["first visit" if first else "another visit"] += 1
                first = False
                pending[pending == next_lane] = MIN_KEY
                cols = start + int(next_lane & (lanes - 1)) * vec + lane_offsets
                cols = cols[cols < vocab]
                for offer in np.sort(_ordered_keys(row[cols], cols))[::-1]:
                    if offer <= kth:
                        break
                    top[np.argmin(top)] = offer
                    kth = top.min()
                    ran["accepted offer"] += 1
        return ran

    return replay


def lane_variants() -> list[Variant]:
    from bs_kernels.backends import triton_launch as launcher

    out = []
    for top_k in (20, 0):
        for groups, warps in ((2, 1), (4, 1), (8, 1), (4, 2)):
            config = launcher.LaneForwardConfig(groups=groups, num_warps=warps)
            block_v, vec = config.block_v(torch.bfloat16), config.vector(torch.bfloat16)
            out.append(
                Variant(
                    name=f"per-lane k={top_k} BLOCK_V={block_v} {warps}w"
                    + (" (default)" if config == launcher.LANES_DEFAULT else ""),
                    kernel_name="bs_rows_forward_lanes_kernel",
                    constants=launcher.lanes_constants(config, torch.bfloat16, top_k),
                    num_warps=warps,
                    block_v=block_v,
                    top_k=top_k,
                    name_paths=name_lane_paths,
                    replay=replay_lanes(groups, 32 * warps, vec, top_k),
                )
            )
    return out


VARIANT_SETS: dict[str, Callable[[], list[Variant]]] = {"current": current_variants, "lanes": lane_variants}


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
    variant: Variant
    usage: dict[str, int]
    spills: int
    paths: dict[str, tuple[int, int]]
    outside: int
    loop_barriers: int
    wide_loads: bool


def compile_variant(variant: Variant) -> Compiled:
    kernels = __import__("bs_kernels.backends.triton_kernels", fromlist=["_"])
    kernel = getattr(kernels, variant.kernel_name)
    compiled = compile_for_hopper(kernel, variant.signature, variant.constants, variant.num_warps, variant.aligned)
    cubin = compiled.asm["cubin"]
    blocks = parse_sass(disassemble(cubin))
    paths = loop_paths(blocks)
    loads = Counter()
    for path in paths.paths:
        loads.update(path.loads)
    return Compiled(
        variant=variant,
        usage=resource_usage(cubin),
        spills=count_spill_instructions(blocks),
        paths=variant.name_paths(paths),
        outside=paths.outside,
        loop_barriers=paths.loop_barriers,
        wide_loads=any(op.startswith("LDG") and op.endswith(".128") for op in loads),
    )


def row_instructions(compiled: Compiled, ran: Counter) -> int:
    """Instructions per thread for one row: the code outside the loop plus every path's count times its runs."""
    return compiled.outside + sum(compiled.paths[name][0] * times for name, times in ran.items())


def evaluate(compiled: Compiled, rows: np.ndarray) -> dict:
    variant = compiled.variant
    ran: Counter = Counter()
    for row in rows:
        ran.update(variant.replay(row))
    vocab = rows.shape[1]
    threads = variant.num_warps * 32
    per_row = row_instructions(compiled, ran) / len(rows)
    per_logit = per_row * threads / vocab
    issue_s = ROWS_AT * per_row * variant.num_warps / (H200["sms"] * H200["schedulers"] * H200["clock_hz"])
    hbm_s = ROWS_AT * vocab * LOGIT_BYTES / H200["hbm_bytes_per_s"]
    blocks_per_row = -(-vocab // variant.block_v)
    frequency = {name: times / len(rows) for name, times in sorted(ran.items())}
    return dict(
        per_logit=per_logit,
        issue_ms=issue_s * 1e3,
        hbm_ms=hbm_s * 1e3,
        frequency=frequency,
        blocks_per_row=blocks_per_row,
    )


def markdown(results: list[tuple[Compiled, str, int, dict]]) -> str:
    lines = [
        "| variant | registers | spills (LDL/STL) | BAR in loop | 16-byte loads | SASS per thread per path "
        "(instructions, barriers) | data | V | runs per row | lane-instr. per logit | issue-bound ms | HBM ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for compiled, data, vocab, result in results:
        paths = "; ".join(f"{name} {count} ({bars})" for name, (count, bars) in compiled.paths.items())
        runs = ", ".join(f"{name} {times:.1f}" for name, times in result["frequency"].items())
        bound = "**" if result["issue_ms"] > result["hbm_ms"] else ""
        lines.append(
            f"| {compiled.variant.name} | {compiled.usage.get('REG')} | {compiled.spills} | {compiled.loop_barriers} "
            f"| {'yes' if compiled.wide_loads else 'no'} | {paths} | {data} | {vocab:,} | {runs} "
            f"| {bound}{result['per_logit']:.1f}{bound} | {result['issue_ms']:.2f} | {result['hbm_ms']:.2f} |"
        )
    return "\n".join(lines)


def summary(results: list[tuple[Compiled, str, int, dict]]) -> str:
    """One row per variant: resources, SASS per path, and lane-instructions per logit on every data model."""
    columns = list(dict.fromkeys(f"{data}, V = {vocab:,}" for _, data, vocab, _ in results))
    by_variant: dict[str, dict] = {}
    for compiled, data, vocab, result in results:
        entry = by_variant.setdefault(compiled.variant.name, {"compiled": compiled, "cells": {}, "issue": {}})
        entry["cells"][f"{data}, V = {vocab:,}"] = result["per_logit"]
        if vocab == max(v for _, _, v, _ in results):
            entry["issue"][data] = (result["issue_ms"], result["hbm_ms"])
    lines = [
        "| variant | registers | LDL/STL | BAR in loop | SASS per thread: path instructions (barriers) | "
        + " | ".join(columns)
        + " | issue-bound / HBM ms at N = 8192, largest V (per data model, in column order) |",
        "|---|---|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    for name, entry in by_variant.items():
        compiled = entry["compiled"]
        paths = "; ".join(f"{path} {count} ({bars})" for path, (count, bars) in compiled.paths.items())
        cells = " | ".join(f"{entry['cells'][c]:.1f}" if c in entry["cells"] else "-" for c in columns)
        issue = "; ".join(f"{issue:.2f} / {hbm:.2f}" for issue, hbm in entry["issue"].values())
        lines.append(
            f"| {name} | {compiled.usage.get('REG')} | {compiled.spills} | {compiled.loop_barriers} | {paths} "
            f"| {cells} | {issue} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANT_SETS), help=f"from {', '.join(VARIANT_SETS)}")
    parser.add_argument("--data", default="random,smollm2", help="random and/or smollm2")
    parser.add_argument("--rows", type=int, default=48, help="random rows per vocabulary")
    parser.add_argument("--answers", type=int, default=24, help="TOFU forget10 answers run through SmolLM2")
    parser.add_argument("--max-rows", type=int, default=256, help="at most this many SmolLM2 rows are replayed")
    parser.add_argument("--json", type=pathlib.Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    variants = [v for name in args.variants.split(",") for v in VARIANT_SETS[name]()]
    data: list[tuple[str, np.ndarray]] = []
    for name in args.data.split(","):
        if name == "random":
            data += [("random N(0,9)", random_rows(vocab, args.rows)) for vocab in (49_152, 128_256)]
        elif name == "smollm2":
            rows = smollm2_rows(args.answers)
            rows = rows[np.random.default_rng(0).permutation(len(rows))[: args.max_rows]]
            data += [("SmolLM2 on TOFU", rows), ("SmolLM2 on TOFU, rows laid end to end", widen_rows(rows, 128_256))]
        else:
            raise SystemExit(f"--data: unknown data model {name!r} (random, smollm2)")
    print(f"budget: {issue_budget_per_logit():.1f} lane-instructions per logit (H200: issue time = HBM time)")
    results = []
    for variant in variants:
        compiled = compile_variant(variant)
        for data_name, rows in data:
            result = evaluate(compiled, rows)
            results.append((compiled, data_name, rows.shape[1], result))
            print(
                f"{variant.name:40s} {data_name:40s} V={rows.shape[1]:7d} {result['per_logit']:7.1f} per logit  "
                f"issue {result['issue_ms']:6.2f} ms  HBM {result['hbm_ms']:5.2f} ms",
                flush=True,
            )
    print()
    print(summary(results))
    print()
    print(markdown(results))
    if args.json:
        payload = [
            dict(
                variant=c.variant.name,
                registers=c.usage.get("REG"),
                spills=c.spills,
                paths=c.paths,
                data=d,
                vocab=v,
                loop_barriers=c.loop_barriers,
                **r,
            )
            for c, d, v, r in results
        ]
        args.json.write_text(json.dumps(payload, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
