"""Row chunks of the fused lm_head forms (linear.py, vocab_parallel.py): their size, their logits, their scatter.

Both fused forms walk the valid rows in chunks of C rows so that one [C, V] logits block is the largest temporary
(the bound is stated in linear.py's docstring); the chunk size, the chunk's logits GEMM and the scatter of per-row
results back to every position are the same for both.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

# Elements of one logits chunk: 2^25 = 32 Mi (128 MiB in float32). Big enough that the GEMMs stay efficient (682 rows
# at V = 49 152, 261 rows at V = 128 256, where each chunk re-reads W), small enough that the temporaries stay a
# small fraction of what the eager path holds (its [N, V] logits, gradient and loss temporaries).
CHUNK_ELEMENTS = 1 << 25
# CUDA: chunks of a multiple of GEMM_ROW_TILE rows (cuBLAS tiles are 64-256 rows: 261 rows at V = 128 256 would waste
# up to ~30% of the last tile row's work), and FP32_ACCUMULATOR_CHUNKS times larger chunks when grad_W goes to the
# float32 accumulator: every chunk's mixed GEMM reads and writes the whole [V, H] float32 accumulator (2.1 GB at
# V = 128 256, H = 4096), so 4x fewer chunks cut that traffic 4x, for a larger logits chunk (256 MiB in bf16).
GEMM_ROW_TILE = 128
FP32_ACCUMULATOR_CHUNKS = 4


def rows_per_chunk(num_rows: int, vocab_size: int, *, cuda: bool = False, fp32_accumulator: bool = False) -> int:
    """Rows C per chunk so that a [C, V] logits block has at most CHUNK_ELEMENTS elements (at least one row); on CUDA
    rounded down to a multiple of GEMM_ROW_TILE rows where that many fit, FP32_ACCUMULATOR_CHUNKS x the elements
    when a float32 grad_W accumulator is used."""
    elements = CHUNK_ELEMENTS * (FP32_ACCUMULATOR_CHUNKS if cuda and fp32_accumulator else 1)
    rows = elements // max(vocab_size, 1)
    if cuda and rows >= GEMM_ROW_TILE:
        rows -= rows % GEMM_ROW_TILE
    return max(1, min(num_rows, rows))


def row_chunks(num_rows: int, vocab_size: int, device: torch.device, fp32_accumulator: bool = False) -> Iterator[slice]:
    """The row slices of consecutive chunks, rows_per_chunk rows each (the last may be shorter)."""
    step = rows_per_chunk(num_rows, vocab_size, cuda=device.type == "cuda", fp32_accumulator=fp32_accumulator)
    for start in range(0, num_rows, step):
        yield slice(start, start + step)


def chunk_logits(hidden_chunk: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[C, H] x [V, H] (+ [V]) -> [C, V] contiguous logits in the input dtype."""
    if bias is None:
        return torch.mm(hidden_chunk, weight.t())
    return torch.addmm(bias, hidden_chunk, weight.t())


def scatter_rows(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[M, ...] values of the valid rows -> [N, ...] with zeros on ignored rows (differentiable)."""
    full = values.new_zeros((valid.shape[0], *values.shape[1:]))
    return full.index_put((valid,), values)
