"""The weight and bias gradients of the fused lm_head, summed over row chunks (linear.py's step 4).

grad_W = sum over chunks of g_c^T h_c is the one sum over chunks whose precision is a choice: for a bf16/fp16 weight
it goes to a float32 accumulator by default (accumulate_in_fp32), formed by the GEMM each device offers for it.
"""

from __future__ import annotations

import torch

from . import _chunks


def accumulation_dtype(dtype: torch.dtype, accumulate_in_fp32: bool) -> torch.dtype:
    """float32 for bf16/fp16 weights when asked (the default), else the weight's own dtype (float64 stays float64)."""
    if dtype == torch.float64 or not accumulate_in_fp32:
        return dtype
    return torch.float32


# Whether CUDA's mixed-precision GEMM (bf16/fp16 operands, float32 output: torch.addmm(..., out_dtype=)) works in
# this build; set to False on the first failure, after which the blocked fallback below is used.
_cuda_mixed_gemm_works = True
# Which of add_weight_grad's GEMMs ran last (benchmarks report it beside their timings): None before the first.
_last_weight_grad_gemm: str | None = None


def weight_grad_gemm_path() -> str | None:
    """How the last grad_W update was formed: "same dtype", "cuda mixed (addmm out_dtype)", "cuda blocked fallback
    (bf16 partial products)" or "cpu upcast"; None before any fused-linear backward."""
    return _last_weight_grad_gemm


def add_weight_grad(accumulator, grad_logits, hidden_chunk, *, first: bool) -> None:
    """accumulator [V, H] (=, or += when not first) grad_logits[C, V].T @ hidden_chunk[C, H].

    Same dtype: one GEMM straight into the accumulator. A low-precision chunk with a float32 accumulator:
    - CUDA: one GEMM with bf16/fp16 operands accumulating into the float32 output (cuBLAS, via out_dtype), no
      rounding of the partial product; if this build lacks it, blocks of the vocabulary whose bf16 partial products
      are rounded once before the float32 sum (bounded temporaries, like Liger's float32 accumulation mode).
    - CPU: the chunk is upcast (a [C, V] float32 temporary, within the chunk bound) and multiplied in float32, so the
      sum over chunks is exact float32 accumulation: CPU BLAS offers no bf16 x bf16 -> float32 GEMM here.
    """
    global _cuda_mixed_gemm_works, _last_weight_grad_gemm
    beta = 0.0 if first else 1.0  # beta = 0 ignores the (uninitialised) accumulator, NaNs included
    if accumulator.dtype == grad_logits.dtype:
        _last_weight_grad_gemm = "same dtype"
        torch.addmm(accumulator, grad_logits.t(), hidden_chunk, beta=beta, out=accumulator)
        return
    if accumulator.device.type == "cuda":
        if first:  # the mixed GEMM below is used with its default beta = 1 only, so start from zeros
            accumulator.zero_()
        if _cuda_mixed_gemm_works:
            try:
                torch.addmm(accumulator, grad_logits.t(), hidden_chunk, out_dtype=accumulator.dtype, out=accumulator)
                _last_weight_grad_gemm = "cuda mixed (addmm out_dtype)"
                return
            except (RuntimeError, TypeError, NotImplementedError):
                _cuda_mixed_gemm_works = False
        _last_weight_grad_gemm = "cuda blocked fallback (bf16 partial products)"
        block = max(1, _chunks.CHUNK_ELEMENTS // max(hidden_chunk.shape[1], 1))
        for start in range(0, accumulator.shape[0], block):
            columns = slice(start, start + block)
            accumulator[columns].add_(torch.mm(grad_logits[:, columns].t(), hidden_chunk))
        return
    _last_weight_grad_gemm = "cpu upcast"
    torch.addmm(
        accumulator,
        grad_logits.t().to(accumulator.dtype),
        hidden_chunk.to(accumulator.dtype),
        beta=beta,
        out=accumulator,
    )


class GradAccumulators:
    """Where step 4 writes: grad_h rows [M, H], grad_W [V, H] and grad_b [V] (float32 for low-precision weights)."""

    def __init__(
        self, hidden_rows, weight, bias, accumulation_dtype, needs_hidden: bool, needs_weight: bool, needs_bias: bool
    ) -> None:
        self.hidden = torch.empty_like(hidden_rows) if needs_hidden else None
        # grad_W starts unwritten: the first chunk stores its product, later chunks add theirs (no [V, H] memset).
        self.weight = torch.empty_like(weight, dtype=accumulation_dtype) if needs_weight else None
        self.weight_written = False
        self.bias = torch.zeros_like(bias, dtype=accumulation_dtype) if needs_bias else None

    def add_chunk(self, rows: slice, grad_logits, hidden_chunk, weight) -> None:
        if self.hidden is not None:
            torch.mm(grad_logits, weight, out=self.hidden[rows])
        if self.weight is not None:
            add_weight_grad(self.weight, grad_logits, hidden_chunk, first=not self.weight_written)
            self.weight_written = True
        if self.bias is not None:
            self.bias.add_(grad_logits.sum(0, dtype=self.bias.dtype))

    def results(self, weight, bias):
        if self.weight is not None and not self.weight_written:  # no valid row at all: the gradient is zero
            self.weight.zero_()
        grad_weight = None if self.weight is None else self.weight.to(weight.dtype)
        grad_bias = None if self.bias is None else self.bias.to(bias.dtype)
        return self.hidden, grad_weight, grad_bias
