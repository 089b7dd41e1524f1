"""impl="triton": the kernels under the Triton interpreter on the CPU, and at full size on CUDA.

Triton decides whether a kernel is interpreted when the @triton.jit function is created, from TRITON_INTERPRET.
So in an ordinary CPU run, test_interpreter_subprocess starts one pytest subprocess with TRITON_INTERPRET=1 that
runs this module's direct tests plus the shared parametrisation (tests/kernels/test_bs_token_loss.py,
test_hardening.py, test_fuzz.py) for impl="triton"; in that subprocess (or on a CUDA machine) the direct tests below
run in-process and the subprocess test skips.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch
from conftest import TOLERANCES

import bs_kernels
from bs_kernels import bs_token_loss, forget_logprobs
from bs_kernels._options import BSOptions
from bs_kernels.backends import torch_chunked, triton_plan
from bs_kernels.backends import triton_launch as triton_backend
from bs_kernels.epilogue import finish_rows

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
ON_CUDA = torch.cuda.is_available() and not INTERPRETING
DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
TRITON_REASON = bs_kernels.unavailable_reason("triton", DEVICE)
TESTS_DIR = pathlib.Path(__file__).resolve().parent

TRITON_INSTALLED = importlib.util.find_spec("triton") is not None

needs_triton = pytest.mark.skipif(
    TRITON_REASON is not None,
    reason=(
        "runs on CUDA, or on the CPU in the TRITON_INTERPRET=1 subprocess of test_interpreter_subprocess"
        if TRITON_INSTALLED
        else TRITON_REASON or ""
    ),
)
needs_cuda = pytest.mark.skipif(not ON_CUDA, reason="full-size checks need a CUDA GPU")

# Tiny blocks make a row of a few hundred logits span many blocks, so every top-k path runs (full block, buckets,
# skip) and V is not a multiple of the block.
SMALL_FORWARD = triton_backend.ForwardConfig(block_v=64, buckets=32, num_warps=4)
SMALL_BACKWARD = triton_backend.BackwardConfig(block_v=64, num_warps=4)
# The per-lane forward with 64-logit blocks (2 groups x 32 lanes x 1): many blocks and lanes visited per row.
SMALL_LANES = triton_backend.LaneForwardConfig(groups=2, num_warps=1, vec=1)
# Two warps, 16-byte vectors: the reductions span warps, and a lane's logits are not contiguous.
WIDE_LANES = triton_backend.LaneForwardConfig(groups=2, num_warps=2)
# The split-vocabulary forward with many slices per row: 64-logit blocks, one per slice (V = 300: 5 slices, the last
# partial); and 16-byte vectors, 3 slices of one block each (fp32; 2 in 16-bit dtypes).
SPLIT_SMALL = triton_backend.SplitForwardConfig(SMALL_LANES, slices=5)
SPLIT_VECTORS = triton_backend.SplitForwardConfig(triton_backend.LaneForwardConfig(groups=1, num_warps=1), slices=3)
FORWARD_CONFIGS = [None, SMALL_FORWARD, SMALL_LANES, WIDE_LANES, SPLIT_SMALL, SPLIT_VECTORS]
FORWARD_IDS = ["default_blocks", "small_blocks", "small_lanes", "wide_lanes", "split_small", "split_vectors"]


def _logits(rows: int, vocab: int, dtype=torch.float32, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, vocab, generator=generator, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def _labels(rows: int, vocab: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, (rows,), generator=generator)
    labels[::4] = -1  # every fourth row ignored
    return labels.to(DEVICE)


def _lse(raw):
    """The row's logsumexp from a forward's max and log_sum (-inf for a row of -inf, whatever the shift)."""
    return raw.row_max + raw.log_sum


def _assert_forward_matches(raw, expected, logits, top_k):
    """lse and z_y against the torch backend; beliefs: the exact top-k as sets (tie-free data), values by id."""
    tolerance = TOLERANCES[logits.dtype if logits.dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(_lse(raw), _lse(expected), **tolerance)
    torch.testing.assert_close(raw.label_logits, expected.label_logits, atol=0, rtol=0)
    assert raw.belief_ids.shape == (logits.shape[0], top_k) and raw.belief_ids.dtype == torch.int64
    torch.testing.assert_close(raw.belief_ids.sort(-1).values, expected.belief_ids.sort(-1).values, atol=0, rtol=0)
    exact_values = logits.gather(1, raw.belief_ids).to(raw.belief_logits.dtype)
    torch.testing.assert_close(raw.belief_logits, exact_values, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("top_k", [1, 3, 20, 64])
@pytest.mark.parametrize("config", FORWARD_CONFIGS, ids=FORWARD_IDS)
def test_forward_top_k_exact(top_k, config):
    logits = _logits(12, 300)
    labels = _labels(12, 300)
    if isinstance(config, triton_backend.ForwardConfig) and triton_backend.next_power_of_two(top_k) > config.buckets:
        config = triton_backend.ForwardConfig(block_v=128, buckets=64, num_warps=4)
    raw = triton_backend.forward(logits, labels, top_k, config=config)
    _assert_forward_matches(raw, torch_chunked.forward(logits, labels, top_k), logits, top_k)


# 256 logits per block in 32 buckets of 8: the first block of a row (8 candidates per bucket) runs the full network.
EIGHT_PER_BUCKET = triton_backend.ForwardConfig(block_v=256, buckets=32, num_warps=4)


@needs_triton
@pytest.mark.parametrize(
    "config",
    [SMALL_FORWARD, EIGHT_PER_BUCKET, SMALL_LANES, SPLIT_SMALL],
    ids=["2_per_bucket", "8_per_bucket", "small_lanes", "split_small"],
)
@pytest.mark.parametrize("order", ["ascending", "descending", "shuffled"])
def test_forward_every_merge_path(order, config):
    """Ascending rows put candidates in every logit of every block (bucket rounds with 2 per bucket, the full network
    with 8; every lane visited, each of its logits accepted), descending rows none after the first block (skipped
    from the block max or the lane maxima), shuffled rows a few per block (one or two bucket rounds; a few lanes);
    V = 1000 is a multiple of no block."""
    vocab = 1000
    base = torch.linspace(-5.0, 5.0, vocab, dtype=torch.float64)
    rows = [base, base.flip(0), base[torch.randperm(vocab, generator=torch.Generator().manual_seed(2))]]
    logits = torch.stack(rows * 2).to(torch.float32).to(DEVICE)
    logits = {"ascending": logits[[0, 3]], "descending": logits[[1, 4]], "shuffled": logits[[2, 5]]}[order]
    labels = torch.tensor([7, -1], device=DEVICE)
    raw = triton_backend.forward(logits, labels, 20, config=config)
    _assert_forward_matches(raw, torch_chunked.forward(logits, labels, 20), logits, 20)


@needs_triton
@pytest.mark.parametrize(
    "config",
    [
        None,
        triton_backend.LaneForwardConfig(groups=8, num_warps=4),
        triton_backend.SplitForwardConfig(triton_backend.LaneForwardConfig(groups=8, num_warps=4), slices=3),
    ],
    ids=["default_blocks", "lanes", "split"],
)
def test_index_field_holds_large_vocabulary(config):
    """Ids above 2^16 and 2^17 survive the packed keys (V = 262 144, the largest the contract promises)."""
    vocab = 262_144
    logits = -torch.arange(vocab, dtype=torch.float32).repeat(2, 1) / vocab  # descending: later blocks are skipped
    logits[0, [vocab - 1, 200_000, 70_000]] = torch.tensor([5.0, 4.0, 3.0])
    logits[1, vocab - 2] = 2.0
    logits = logits.to(DEVICE)
    labels = torch.tensor([vocab - 1, 131_073], device=DEVICE)
    raw = triton_backend.forward(logits, labels, 3, config=config)
    assert raw.belief_ids[0].tolist() == [vocab - 1, 200_000, 70_000]
    assert raw.belief_ids[1].tolist() == [vocab - 2, 0, 1]
    _assert_forward_matches(raw, torch_chunked.forward(logits, labels, 3), logits, 3)


@needs_triton
@pytest.mark.parametrize(
    "config", [SMALL_FORWARD, WIDE_LANES, SPLIT_VECTORS], ids=["small_blocks", "wide_lanes", "split_vectors"]
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_forward_dtypes(dtype, config):
    """Statistics in float32 (float64 for float64); top-k checked by value since 16-bit data has ties."""
    logits = _logits(9, 300, dtype=dtype)
    labels = _labels(9, 300)
    raw = triton_backend.forward(logits, labels, 20, config=config)
    expected = torch_chunked.forward(logits, labels, 20)
    assert raw.log_sum.dtype == expected.log_sum.dtype == raw.row_max.dtype
    tolerance = TOLERANCES[torch.float64 if dtype == torch.float64 else torch.float32]
    torch.testing.assert_close(_lse(raw), _lse(expected), **tolerance)
    torch.testing.assert_close(raw.label_logits, expected.label_logits, atol=0, rtol=0)
    torch.testing.assert_close(raw.belief_logits.sort(-1).values, expected.belief_logits.sort(-1).values)
    assert (raw.belief_ids.sort(-1).values.diff(dim=-1) > 0).all()  # k distinct ids per row
    torch.testing.assert_close(logits.gather(1, raw.belief_ids).to(raw.belief_logits.dtype), raw.belief_logits)


@needs_triton
@pytest.mark.parametrize("kernel", ["buckets", "lanes", "split"])
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # the interpreter's log(0)
def test_negative_infinite_logits(kernel):
    """Masked entries, a fully masked row and k above the number of finite entries: no NaN, same as torch."""
    logits = _logits(6, 150)
    generator = torch.Generator().manual_seed(3)
    masked = (torch.rand(6, 150, generator=generator) < 0.9).to(DEVICE)
    labels = torch.tensor([0, 1, 2, -1, 4, 5], device=DEVICE)
    masked[torch.arange(6, device=DEVICE), labels.clamp(min=0)] = False
    logits = logits.masked_fill(masked, float("-inf"))
    logits[3] = float("-inf")  # ignored row with no finite logit
    config = {"buckets": SMALL_FORWARD, "lanes": SMALL_LANES, "split": SPLIT_SMALL}[kernel]
    raw = triton_backend.forward(logits, labels, 20, config=config)
    expected = torch_chunked.forward(logits, labels, 20)
    torch.testing.assert_close(_lse(raw), _lse(expected))
    finite = torch.isfinite(raw.belief_logits)
    assert (finite.sum(-1) == torch.isfinite(logits).sum(-1).clamp(max=20)).all()
    torch.testing.assert_close(raw.belief_logits.sort(-1).values, expected.belief_logits.sort(-1).values)

    rows = finish_rows(raw, labels, BSOptions(lam=0.2, detach_belief=False))
    grad_rows = torch.where(labels >= 0, torch.ones_like(rows.log_sum), torch.zeros_like(rows.log_sum))
    args = (grad_rows, logits, labels, rows.row_max, rows.log_sum, rows.belief_ids, rows.belief_weights, 0.8)
    grad = triton_backend.backward(*args, False, config=SMALL_BACKWARD)
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(grad, torch_chunked.backward(*args, False))
    assert (grad[masked] == 0).all() and (grad[3] == 0).all()


def _backward_case(dtype, rows=10, vocab=300, top_k=20, label_in_beliefs=True):
    logits = _logits(rows, vocab, dtype=dtype)
    labels = _labels(rows, vocab)
    if label_in_beliefs:
        labels[1] = logits[1].argmax()  # the label's entry also carries a belief weight
    raw = torch_chunked.forward(logits, labels, top_k)
    rows_out = finish_rows(raw, labels, BSOptions(lam=0.2, detach_belief=False))
    generator = torch.Generator().manual_seed(4)
    grad_rows = torch.rand(rows, generator=generator, dtype=rows_out.log_sum.dtype).to(DEVICE) + 0.5
    grad_rows = torch.where(labels >= 0, grad_rows, torch.zeros_like(grad_rows))
    args = (
        grad_rows,
        logits,
        labels,
        rows_out.row_max,
        rows_out.log_sum,
        rows_out.belief_ids,
        rows_out.belief_weights,
        0.8,
    )
    return logits, args


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_backward_matches_torch_backend(dtype):
    """Both compute every entry in float32 (float64) and round once: equal up to one rounding of the output."""
    logits, args = _backward_case(dtype)
    grad = triton_backend.backward(*args, False, config=SMALL_BACKWARD)
    expected = torch_chunked.backward(*args, False)
    assert grad.dtype == dtype and grad.shape == logits.shape
    torch.testing.assert_close(grad, expected)
    assert (grad[args[2] < 0] == 0).all()  # ignored rows


@needs_triton
def test_backward_exact_against_float64():
    """float32 logits: every entry within float32 rounding of grad_row * (t - pi) built densely in float64."""
    logits, args = _backward_case(torch.float32)
    grad_rows, _, labels, row_max, log_sum, belief_ids, belief_weights, label_weight = args
    valid = (labels >= 0).double()
    pi = torch.exp(logits.double() - (row_max.double() + log_sum.double()).unsqueeze(1))
    target = torch.zeros_like(pi).scatter_add_(1, belief_ids, belief_weights.double())
    target[torch.arange(len(labels), device=DEVICE), labels.clamp(min=0)] += label_weight * valid
    expected = grad_rows.double().unsqueeze(1) * (target - pi)
    grad = triton_backend.backward(*args, False)
    torch.testing.assert_close(grad.double(), expected, atol=1e-7, rtol=1e-6)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_backward_inplace_and_row_stride(dtype):
    """Rows of a wider buffer (row stride 307 != V = 300); inplace writes into that storage, padding untouched."""
    _, args = _backward_case(dtype)
    storage = _logits(10, 307, dtype=dtype, seed=5)
    view = storage[:, :300]
    view.copy_(args[1])
    assert view.stride(0) == 307
    out_of_place = triton_backend.backward(args[0], view, *args[2:], False, config=SMALL_BACKWARD)
    assert out_of_place.is_contiguous()
    padding = storage[:, 300:].clone()
    result = triton_backend.backward(args[0], view, *args[2:], True, config=SMALL_BACKWARD)
    assert result.data_ptr() == view.data_ptr()
    torch.testing.assert_close(view, out_of_place, atol=0, rtol=0)
    torch.testing.assert_close(storage[:, 300:], padding, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize(
    "config", [SMALL_FORWARD, WIDE_LANES, SPLIT_VECTORS], ids=["small_blocks", "wide_lanes", "split_vectors"]
)
def test_forward_row_stride(config):
    storage = _logits(8, 333)
    view = storage[:, 5:305]
    labels = _labels(8, 300)
    raw = triton_backend.forward(view, labels, 20, config=config)
    _assert_forward_matches(raw, torch_chunked.forward(view, labels, 20), view, 20)


@needs_triton
@pytest.mark.parametrize(
    "config", [SMALL_FORWARD, SMALL_LANES, SPLIT_SMALL], ids=["small_blocks", "small_lanes", "split_small"]
)
def test_forward_heavy_ties(config):
    """Four distinct values over 300 logits: the k-th value is shared by dozens of entries in every block. Any k of
    the tied entries may be chosen (docs/math.md); the values must be the k largest and the ids distinct
    and truthful."""
    generator = torch.Generator().manual_seed(6)
    logits = torch.randint(0, 4, (6, 300), generator=generator).to(torch.float32).to(DEVICE)
    labels = _labels(6, 300)
    raw = triton_backend.forward(logits, labels, 20, config=config)
    expected = torch_chunked.forward(logits, labels, 20)
    torch.testing.assert_close(_lse(raw), _lse(expected))
    torch.testing.assert_close(
        raw.belief_logits.sort(-1).values, expected.belief_logits.sort(-1).values, atol=0, rtol=0
    )
    assert (raw.belief_ids.sort(-1).values.diff(dim=-1) > 0).all()
    torch.testing.assert_close(logits.gather(1, raw.belief_ids), raw.belief_logits, atol=0, rtol=0)


@needs_triton
@pytest.mark.parametrize("top_k", [200, 1024])
def test_lanes_forward_large_k(top_k):
    """k above the lane count (K_PAD = 256, and the contract's maximum 1024) in the per-lane kernel."""
    logits = _logits(2, 1100)
    labels = _labels(2, 1100)
    raw = triton_backend.forward(logits, labels, top_k, config=triton_backend.LaneForwardConfig(groups=4, num_warps=1))
    _assert_forward_matches(raw, torch_chunked.forward(logits, labels, top_k), logits, top_k)


@needs_triton
@pytest.mark.parametrize("top_k", [0, 20])
@pytest.mark.parametrize("config", [triton_plan.LANES_DEEP, triton_plan.LANES_DEEPER], ids=["8_groups", "16"])
def test_launcher_lanes_configs_exact(config, top_k):
    """The per-lane configs the launcher picks for few rows, as compiled for a GPU (16-byte vectors: 1024 / 2048
    float32 logits per block), over two whole blocks and a partial one."""
    vocab = 2 * config.block_v(torch.float32) + 300
    logits = _logits(3, vocab)
    labels = _labels(3, vocab)
    raw = triton_backend.forward(logits, labels, top_k, config=config)
    _assert_forward_matches(raw, torch_chunked.forward(logits, labels, top_k), logits, top_k)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_public_api_matches_torch_impl(dtype):
    """bs_token_loss / forget_logprobs through autograd, [B, T, V] with shift=True (rows are a strided view)."""
    logits = _logits(3 * 7, 97, dtype=dtype).reshape(3, 7, 97)
    labels = _labels(3 * 7, 97).reshape(3, 7)
    labels = torch.where(labels < 0, torch.full_like(labels, -100), labels)
    results = {}
    for impl in ("triton", "torch"):
        x = logits.detach().clone().requires_grad_(True)
        loss = bs_token_loss(x, labels, impl=impl, top_k=5, detach_belief=False)
        token_logprobs = forget_logprobs(x, labels, impl=impl)
        (loss + token_logprobs.sum()).backward()
        results[impl] = (loss.detach(), token_logprobs.detach(), x.grad)
    for actual, expected in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(actual, expected)


@needs_triton
def test_inplace_backward_through_public_api():
    logits = _logits(2 * 6, 50).reshape(2, 6, 50)
    labels = _labels(2 * 6, 50).reshape(2, 6)
    labels = torch.where(labels < 0, torch.full_like(labels, -100), labels)
    x = logits.clone().requires_grad_(True)
    bs_token_loss(x, labels, impl="torch").backward()
    storage = logits.clone().requires_grad_(True)
    bs_token_loss(storage * 1.0, labels, impl="triton", inplace_backward=True).backward()
    torch.testing.assert_close(storage.grad, x.grad)


@pytest.fixture
def split_everywhere(monkeypatch):
    """Every launch of the triton forward, the public API's included, through the split-V path with 5 slices."""
    monkeypatch.setattr(triton_backend, "_FORWARD_OVERRIDE", SPLIT_SMALL)


@needs_triton
@pytest.mark.parametrize("top_k", [5, 20])
def test_split_public_api_against_float64_reference(split_everywhere, top_k):
    """bs_token_loss and forget_logprobs on float64 logits forced through the split forward (5 slices per row, ignored
    rows, a label that is also a belief): loss and gradient against impl="reference"."""
    logits = _logits(3 * 7, 300, dtype=torch.float64).reshape(3, 7, 300)
    labels = _labels(3 * 7, 300).reshape(3, 7)
    labels = torch.where(labels < 0, torch.full_like(labels, -100), labels)
    labels[0, 3] = int(logits[0, 2].argmax())  # shift=True: row (0, 2) predicts labels[0, 3], its own top logit
    results = {}
    for impl in ("triton", "reference"):
        x = logits.detach().clone().requires_grad_(True)
        loss = bs_token_loss(x, labels, impl=impl, top_k=top_k, lam=0.3, detach_belief=False)
        token_logprobs = forget_logprobs(x, labels, impl=impl)
        (loss + token_logprobs.sum()).backward()
        results[impl] = (loss.detach(), token_logprobs.detach(), x.grad)
    for actual, expected in zip(results["triton"], results["reference"]):
        torch.testing.assert_close(actual, expected, **TOLERANCES[torch.float64])


@needs_triton
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")  # the interpreter's log(0)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # NaN rows under the interpreter
def test_split_public_api_non_finite_rows(split_everywhere):
    """Rows with NaN, +inf, only -inf, a -inf label logit and -inf spread over several slices, and ignored rows
    holding NaN / +inf: the split forward gives impl="torch"'s loss and gradient (the documented rules)."""
    logits = _logits(2 * 6, 300).reshape(2, 6, 300)
    labels = _labels(2 * 6, 300).reshape(2, 6)
    labels = torch.where(labels < 0, torch.full_like(labels, -100), labels)
    labels[:, 1:] = labels[:, 1:].clamp(min=0)  # counted rows below, except where set to -100
    logits[0, 0, int(labels[0, 1])] = float("-inf")  # the label's own logit
    logits[0, 1, 250] = float("nan")  # counted: no distribution
    logits[0, 2, 70] = float("inf")  # counted: no distribution
    logits[0, 3] = float("-inf")  # only -inf
    logits[1, 0, ::3] = float("-inf")  # masked vocabulary in every slice
    labels[1, 2] = -100  # row (1, 1) ignored, holding NaN and +inf
    logits[1, 1, 5] = float("nan")
    logits[1, 1, 290] = float("inf")
    results = {}
    for impl in ("triton", "torch"):
        x = logits.detach().clone().requires_grad_(True)
        loss = bs_token_loss(x, labels, impl=impl, reduction="none", top_k=20, lam=0.2)
        loss.backward(torch.ones_like(loss))
        results[impl] = (loss.detach(), x.grad)
    for actual, expected in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(actual, expected, equal_nan=True)


@needs_triton
def test_invalid_arguments():
    logits = _logits(4, 30)
    labels = _labels(4, 30)
    with pytest.raises(ValueError, match="top_k"):
        triton_backend.forward(logits, labels, 31)
    with pytest.raises(ValueError, match="labels"):
        triton_backend.forward(logits, labels[:3], 5)
    with pytest.raises(ValueError, match="labels"):
        triton_backend.forward(logits, labels.to(torch.int32), 5)
    with pytest.raises(ValueError, match="unit stride"):
        triton_backend.forward(logits.t().contiguous().t(), labels, 5)
    with pytest.raises(TypeError, match="dtype"):
        triton_backend.forward(logits.to(torch.int64), labels, 5)
    with pytest.raises(ValueError, match="config"):
        triton_backend.forward(logits, labels, 20, config=triton_backend.ForwardConfig(64, 16, 4))
    with pytest.raises(ValueError, match="config.groups"):
        triton_backend.forward(logits, labels, 20, config=triton_backend.LaneForwardConfig(3, 1))
    with pytest.raises(ValueError, match="config.slices"):
        triton_backend.forward(logits, labels, 20, config=triton_backend.SplitForwardConfig(SMALL_LANES, 0))
    with pytest.raises(ValueError, match="belief_weights"):
        triton_backend.backward(
            torch.ones(4, device=DEVICE),
            logits,
            labels,
            torch.zeros(4, device=DEVICE),  # row max
            torch.zeros(4, device=DEVICE),  # log-sum
            torch.zeros(4, 3, dtype=torch.int64, device=DEVICE),
            torch.zeros(4, 2, device=DEVICE),
            0.8,
            False,
        )


def test_unavailable_reason_names_the_fix():
    """On the CPU without the interpreter the backend says how to enable it; auto never picks it for CPU tensors."""
    if not TRITON_INSTALLED:
        reason = triton_backend.unavailable_reason(torch.device("cpu"))
        assert reason is not None and 'pip install "bs-kernels[triton]"' in reason
    elif INTERPRETING:
        assert triton_backend.unavailable_reason(torch.device("cpu")) is None
    else:
        reason = triton_backend.unavailable_reason(torch.device("cpu"))
        assert reason is not None and "TRITON_INTERPRET=1" in reason
    assert bs_kernels.resolve_impl("auto", torch.device("cpu")) != "triton"
    if ON_CUDA:
        assert bs_kernels.resolve_impl("auto", torch.device("cuda")) == "triton"


# ---------------------------------------------------------------------------------------------- full size, CUDA


@needs_cuda
def test_full_size_bf16_error_budget():
    """N = 8192 rows, V = 128 256, bf16, k = 20: values and gradient against a float64 computation, within the error
    of the torch backend on the same bf16 input (both round the float32 result once) plus the bf16 slack."""
    rows, vocab = 8192, 128_256
    generator = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(rows, vocab, device="cuda", generator=generator) * 3).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    labels[::7] = -100

    def run(impl, x):
        x = x.detach().clone().requires_grad_(True)
        loss = bs_token_loss(x, labels, impl=impl, shift=False, reduction="none", top_k=20, lam=0.2)
        loss.backward(torch.linspace(1.0, 2.0, rows, device="cuda", dtype=loss.dtype))
        return loss.detach(), x.grad

    exact_loss, exact_grad = run("torch", logits.double())
    budget = TOLERANCES[torch.bfloat16]["atol"]
    torch_loss, torch_grad = run("torch", logits)
    triton_loss, triton_grad = run("triton", logits)
    assert (triton_loss.double() - exact_loss).abs().max() <= (torch_loss.double() - exact_loss).abs().max() + budget
    assert (triton_grad.double() - exact_grad).abs().max() <= (torch_grad.double() - exact_grad).abs().max() + budget


@needs_cuda
def test_full_size_top_k_and_lse():
    """Full size, float32 (tie-free): exact top-20 ids as sets, lse to float32 accuracy; fp16 too by value."""
    rows, vocab = 8192, 128_256
    generator = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(rows, vocab, device="cuda", generator=generator) * 3
    labels = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    raw = triton_backend.forward(logits, labels, 20)
    _assert_forward_matches(raw, torch_chunked.forward(logits, labels, 20), logits, 20)


@needs_cuda
@pytest.mark.parametrize("top_k", [0, 20])
def test_full_size_few_rows_split_forward(top_k):
    """256 rows of V = 128 256 (a fused lm_head chunk): the launcher's split-vocabulary forward, float32 (tie-free):
    exact top-k ids as sets, lse to float32 accuracy, z_y exact."""
    rows, vocab = 256, 128_256
    assert isinstance(triton_backend.forward_config(vocab, top_k, rows, 4), triton_backend.SplitForwardConfig)
    generator = torch.Generator(device="cuda").manual_seed(2)
    logits = torch.randn(rows, vocab, device="cuda", generator=generator) * 3
    labels = torch.randint(0, vocab, (rows,), device="cuda", generator=generator)
    raw = triton_backend.forward(logits, labels, top_k)
    _assert_forward_matches(raw, torch_chunked.forward(logits, labels, top_k), logits, top_k)


# ------------------------------------------------------------------------------------ the interpreter subprocess


def _interpreted_pytest(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "pytest", *arguments, "-p", "no:cacheprovider"]


def _interpreter_env() -> dict:
    # One thread per shard: the shards run side by side, one per core.
    return dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


INTERPRETER_SHARDS = 2


@pytest.mark.skipif(INTERPRETING, reason="already running under the interpreter")
def test_interpreter_subprocess():
    """Runs this module's direct tests and the shared parametrisation for impl="triton" with TRITON_INTERPRET=1.

    ~190 interpreted tests, each single-threaded Python: collected once, dealt round-robin (neighbouring
    parametrisations cost alike) to INTERPRETER_SHARDS pytest processes that run side by side."""
    if not TRITON_INSTALLED:
        pytest.skip(TRITON_REASON or "triton is not installed")
    targets = [str(TESTS_DIR / "test_triton_interpreter.py")]
    for shared in ("test_bs_token_loss.py", "test_hardening.py", "test_hardening_api.py", "test_fuzz.py"):
        if (TESTS_DIR / shared).is_file():
            targets.append(str(TESTS_DIR / shared))
    root = TESTS_DIR.parents[1]
    collected = subprocess.run(
        _interpreted_pytest(*targets, "-k", "triton", "--collect-only", "-q"),
        env=_interpreter_env(),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=root,
    )
    assert collected.returncode == 0, (collected.stdout + collected.stderr)[-6000:]
    node_ids = [line for line in collected.stdout.splitlines() if "::" in line and not line.startswith(" ")]
    assert len(node_ids) >= 20, collected.stdout[-6000:]
    shards = [
        subprocess.Popen(
            _interpreted_pytest(*node_ids[shard::INTERPRETER_SHARDS], "-q", "-rs"),
            env=_interpreter_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=root,
        )
        for shard in range(INTERPRETER_SHARDS)
    ]
    try:
        # ~100 interpreted tests per shard: a few minutes on an idle machine, more than 10 on a shared 2-core one.
        outputs = [shard.communicate(timeout=1800)[0] for shard in shards]
    finally:
        for shard in shards:
            shard.kill()
    # Under the interpreter only the CUDA-only tests (and this one) may skip.
    allowed = ("full-size checks need a CUDA GPU", "already running under the interpreter", "cannot be compiled")
    ran = 0
    for shard, output in zip(shards, outputs):
        tail = output[-6000:]
        assert shard.returncode == 0, tail
        ran += sum(int(count) for count in re.findall(r"(\d+) (?:passed|skipped)", output.splitlines()[-1]))
        skips = [line for line in output.splitlines() if line.startswith("SKIPPED")]
        assert all(any(reason in line for reason in allowed) for line in skips), tail
    assert ran == len(node_ids), f"the shards ran {ran} of the {len(node_ids)} collected tests"
