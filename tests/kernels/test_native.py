"""impl="native" specifics: the operators (opcheck), the kernels against impl="torch" on layouts and ISAs the shared
parametrisation does not reach, the -Werror build, and the fallback when the extension cannot be built.

The values and gradients against the reference run in tests/kernels/test_bs_token_loss.py (the `impl` axis).
"""

from __future__ import annotations

import os
import subprocess
import warnings

import pytest
import torch

import bs_kernels
from bs_kernels._options import BSOptions
from bs_kernels.backends import native, native_build, resolve_impl, torch_chunked
from bs_kernels.epilogue import backward_rows, finish_rows

NATIVE_REASON = native.unavailable_reason(torch.device("cpu"))
needs_native = pytest.mark.skipif(NATIVE_REASON is not None, reason=str(NATIVE_REASON))

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "fp64", "bf16", "fp16"]
ISAS = ["avx512", "avx2", "default"]


def rows_case(num_rows: int, vocab: int, dtype: torch.dtype, *, row_stride: int | None = None, seed: int = 0):
    """logits [N, V] (a column slice of a wider buffer when row_stride > V) and labels [N], row 1 ignored."""
    generator = torch.Generator().manual_seed(seed)
    width = row_stride or vocab
    buffer = torch.randn(num_rows, width, generator=generator, dtype=torch.float64) * 3
    logits = buffer.to(dtype)[:, :vocab]
    labels = torch.randint(0, vocab, (num_rows,), generator=generator)
    if num_rows > 1:
        labels[1] = -1
    return logits, labels


def backward_inputs(logits, labels, top_k, lam=0.2):
    """The epilogue's per-row coefficients from impl="torch"'s forward, as the autograd Function would pass them."""
    raw = torch_chunked.forward(logits, labels, top_k)
    rows = finish_rows(raw, labels, BSOptions(lam=lam))
    grad_rows = torch.linspace(0.5, 1.5, logits.shape[0], dtype=rows.log_sum.dtype)
    grad_rows = torch.where(labels >= 0, grad_rows, torch.zeros_like(grad_rows))
    return grad_rows, rows.row_max, rows.log_sum, rows.belief_ids, rows.belief_weights, 1.0 - lam


def _lse(stats):
    """The row's logsumexp from a forward's max and log_sum (-inf for a row of -inf, whatever the shift)."""
    return stats.row_max + stats.log_sum


def stats_tolerance(dtype):
    return dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=2e-6, rtol=2e-6)


def grad_tolerance(dtype):
    # bf16/fp16: the same float32 value rounded once; a 1e-7 difference in exp may flip the last bit.
    return {
        torch.float64: dict(atol=1e-15, rtol=1e-12),
        torch.float32: dict(atol=1e-7, rtol=1e-5),
        torch.bfloat16: dict(atol=1e-6, rtol=8e-3),
        torch.float16: dict(atol=1e-7, rtol=2e-3),
    }[dtype]


def assert_same_topk(logits, native_stats, torch_stats, dtype, tie_free=slice(None)):
    """Tie-proof: the same multiset of top-k values, and native's ids are distinct and point at its values; on the
    ``tie_free`` rows (all by default) of float32/float64 data, the same ids."""
    values = native_stats.belief_logits.sort(-1).values
    torch.testing.assert_close(values, torch_stats.belief_logits.sort(-1).values, **stats_tolerance(dtype))
    ids = native_stats.belief_ids
    assert torch.all(ids.sort(-1).values.diff(dim=-1) > 0)
    gathered = logits.gather(-1, ids).to(native_stats.belief_logits.dtype)
    torch.testing.assert_close(gathered, native_stats.belief_logits, rtol=0, atol=0)
    if dtype in (torch.float32, torch.float64):  # continuous data: no ties, so the ids themselves agree
        torch.testing.assert_close(ids[tie_free].sort(-1).values, torch_stats.belief_ids[tie_free].sort(-1).values)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "num_rows, vocab, row_stride, top_k",
    [(5, 1, None, 1), (4, 15, None, 4), (6, 1025, 1100, 20), (3, 3000, None, 3000), (2, 70_001, None, 0)],
    ids=["V1", "V15", "strided_rows", "k_equals_V", "large_V_no_beliefs"],
)
def test_kernels_match_torch(monkeypatch, isa, dtype, num_rows, vocab, row_stride, top_k):
    """Chunk tails, one-element rows, row stride != V, k = V, k = 0; every ISA variant the CPU can run."""
    monkeypatch.setenv("BS_KERNELS_NATIVE_ISA", isa)
    logits, labels = rows_case(num_rows, vocab, dtype, row_stride=row_stride)
    stats = native.forward(logits, labels, top_k)
    expected = torch_chunked.forward(logits, labels, top_k)
    torch.testing.assert_close(_lse(stats), _lse(expected), **stats_tolerance(dtype))
    valid = labels >= 0
    torch.testing.assert_close(stats.label_logits[valid], expected.label_logits[valid], **stats_tolerance(dtype))
    if top_k > 0:
        assert_same_topk(logits, stats, expected, dtype)

    grad_rows, row_max, log_sum, belief_ids, belief_weights, label_weight = backward_inputs(logits, labels, top_k)
    arguments = (grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight)
    grad = native.backward(*arguments, inplace=False)
    expected_grad = torch_chunked.backward(*arguments, inplace=False)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    torch.testing.assert_close(grad, expected_grad, **grad_tolerance(dtype))
    assert torch.all(grad[~valid] == 0)


FLOOR_VOCAB = 70_001  # 69 chunks of 1024 (the last one partial); the kernel's tasks are 2^20 // V = 14 rows


def floor_case(dtype):
    """30 rows of V = 70 001 on which a top-k floor taken from the chunk maxima could go wrong; returns (logits,
    labels, the rows whose top k is tie-free in float32)."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(30, FLOOR_VOCAB, generator=generator, dtype=torch.float64) * 3
    logits[1, 3072:3084] = 20 + torch.arange(12)  # the 12 largest in one chunk: the floor is far below them
    logits[2] = logits[2].clamp(max=1.5)
    logits[2, ::1024] = 2.0  # every chunk's max is the same value: k of the 69 tied maxima, floor = the k-th value
    for chunk in range(0, 69, 2):
        logits[3, chunk * 1024 : (chunk + 1) * 1024] = float("-inf")  # chunks of -inf between finite ones
    logits[4] = torch.linspace(-5, 5, FLOOR_VOCAB)  # ascending: every element beats the previous ones
    logits[14, -300:-290] = 30 + torch.arange(10)  # a task's first row, its largest in the partial last chunk
    logits[15] = float("-inf")
    logits[15, 100:105] = 1.0 + torch.arange(5)  # fewer finite logits than most k: no floor
    labels = torch.randint(0, FLOOR_VOCAB, (30,), generator=generator)
    labels[[5, 16]] = -1
    return logits.to(dtype), labels, [row for row in range(30) if row not in (2, 4, 15)]  # 15: k > 5 ties -inf


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_topk_floor_and_kept_exps(monkeypatch, isa, dtype):
    """Rows with more chunks than k take a top-k floor from their chunk maxima (gathered during the previous row's
    sweep, or read on their own by a task's first row) and keep their exps for the gradient, written during the next
    row's sweep: the statistics match impl="torch" (k below, equal to and above the 69 chunks), the one-pass gradient
    equals native_backward's bit for bit, in its own memory and over the logits."""
    monkeypatch.setenv("BS_KERNELS_NATIVE_ISA", isa)
    logits, labels, tie_free = floor_case(dtype)
    for top_k in (1, 8, 69, 70):
        stats = native.forward(logits, labels, top_k)
        expected = torch_chunked.forward(logits, labels, top_k)
        torch.testing.assert_close(_lse(stats), _lse(expected), **stats_tolerance(dtype))
        valid = labels >= 0
        torch.testing.assert_close(stats.label_logits[valid], expected.label_logits[valid], **stats_tolerance(dtype))
        assert_same_topk(logits, stats, expected, dtype, tie_free=tie_free)

    rows = finish_rows(stats, labels, BSOptions(lam=0.2, top_k=70))
    grad_rows = torch.linspace(0.5, 1.5, 30, dtype=rows.log_sum.dtype)
    grad_rows, row_max = backward_rows(grad_rows, labels, rows.row_max)
    coefficients = (row_max, rows.log_sum)
    two_pass = native.backward(grad_rows, logits, labels, *coefficients, rows.belief_ids, rows.belief_weights, 0.8,
                               inplace=False)  # fmt: skip
    for inplace in (False, True):
        source = logits.clone()
        raw, grad = native.forward_grad(source, labels, 70, grad_rows, inplace=inplace)
        native.sparse_grad_(grad, grad_rows, labels, *coefficients, raw, rows.belief_ids, rows.belief_weights, 0.8)
        assert torch.equal(grad, two_pass), f"inplace={inplace}"


@needs_native
@pytest.mark.parametrize("inplace", [False, True], ids=["own_memory", "over_logits"])
def test_no_rows(inplace):
    """N = 0 (a vocabulary shard of an empty batch): empty statistics and gradient, nothing read."""
    logits, labels = torch.empty(0, 5000), torch.empty(0, dtype=torch.long)
    stats = native.forward(logits, labels, 3)
    assert stats.belief_ids.shape == (0, 3) and stats.log_sum.shape == (0,)
    raw, grad = native.forward_grad(logits, labels, 3, torch.empty(0), inplace=inplace)
    assert grad.shape == (0, 5000) and raw.belief_logits.shape == (0, 3)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_negative_infinity(dtype):
    """Masked entries, a fully masked ignored row (lse = -inf, no NaN) and a row with fewer finite logits than k."""
    logits, labels = rows_case(4, 300, dtype)
    logits = logits.clone()
    logits[0, ::2] = float("-inf")
    logits[0, labels[0]] = 1.0
    logits[1] = float("-inf")  # row 1 is the ignored one
    logits[2, 5:] = float("-inf")
    labels[2] = 3
    stats = native.forward(logits, labels, 8)
    assert torch.isneginf(_lse(stats)[1])
    assert torch.isfinite(_lse(stats)[[0, 2, 3]]).all()
    expected = torch_chunked.forward(logits, labels, 8)
    torch.testing.assert_close(_lse(stats), _lse(expected), **stats_tolerance(dtype))
    assert set(stats.belief_ids[2][torch.isfinite(stats.belief_logits[2])].tolist()) == set(range(5))

    grad_rows, row_max, log_sum, belief_ids, belief_weights, label_weight = backward_inputs(logits, labels, 8)
    grad = native.backward(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight, False)
    assert not torch.isnan(grad).any()
    assert torch.all(grad[0, 1::2][torch.arange(1, 300, 2) != labels[0]] != 0)
    assert torch.all(grad[0, ::2][torch.arange(0, 300, 2) != labels[0]] == 0)
    assert torch.all(grad[1] == 0)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_label_among_beliefs(dtype):
    """When the label is a belief its two coefficients add up on one element."""
    logits, labels = rows_case(3, 64, dtype)
    labels = logits.float().argmax(-1)  # the label is the top belief
    grad_rows, row_max, log_sum, belief_ids, belief_weights, label_weight = backward_inputs(logits, labels, 5, lam=0.5)
    arguments = (grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight)
    grad = native.backward(*arguments, inplace=False)
    torch.testing.assert_close(grad, torch_chunked.backward(*arguments, inplace=False), **grad_tolerance(dtype))
    # Each row of t - pi sums to zero (sum t = sum pi = 1).
    sums = grad.double().sum(-1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), atol=1e-2 if dtype != torch.float64 else 1e-12, rtol=0)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_inplace_matches_out_of_place(dtype):
    logits, labels = rows_case(4, 257, dtype, row_stride=300)
    grad_rows, row_max, log_sum, belief_ids, belief_weights, label_weight = backward_inputs(logits, labels, 6)
    arguments = (grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight)
    expected = native.backward(*arguments, inplace=False)
    storage = logits.clone()  # contiguous [4, 257]; also check a strided view is written in place
    strided = logits.contiguous().new_empty(4, 300)[:, :257].copy_(logits)
    for target in (storage, strided):
        result = native.backward(
            grad_rows, target, labels, row_max, log_sum, belief_ids, belief_weights, label_weight, True
        )
        assert result.data_ptr() == target.data_ptr()
        torch.testing.assert_close(target, expected, rtol=0, atol=0)


def opcheck_cases():
    for dtype, row_stride, top_k in [
        (torch.float32, None, 3),
        (torch.float64, 40, 0),
        (torch.bfloat16, None, 5),
    ]:
        logits, labels = rows_case(5, 33, dtype, row_stride=row_stride)
        yield logits, labels, top_k


@needs_native
@pytest.mark.parametrize("case", range(3))
def test_opcheck(case):
    logits, labels, top_k = list(opcheck_cases())[case]
    torch.library.opcheck(torch.ops.bs_kernels.native_forward.default, (logits, labels, top_k))
    grad_rows, row_max, log_sum, belief_ids, belief_weights, label_weight = backward_inputs(logits, labels, top_k)
    arguments = (grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight)
    torch.library.opcheck(torch.ops.bs_kernels.native_backward.default, arguments)
    inplace_arguments = (grad_rows, logits.clone(), labels, row_max, log_sum, belief_ids, belief_weights, label_weight)
    torch.library.opcheck(torch.ops.bs_kernels.native_backward_.default, inplace_arguments)


@needs_native
def test_operator_rejects_bad_input():
    logits, labels = rows_case(3, 10, torch.float32)
    with pytest.raises(RuntimeError, match="top_k"):
        torch.ops.bs_kernels.native_forward(logits, labels, 11)
    with pytest.raises(RuntimeError, match="labels"):
        torch.ops.bs_kernels.native_forward(logits, labels.int(), 2)
    with pytest.raises(RuntimeError, match="float32, float64, bfloat16 or float16"):
        torch.ops.bs_kernels.native_forward(logits.int(), labels, 2)
    grad_rows, row_max, log_sum, belief_ids, belief_weights, label_weight = backward_inputs(logits, labels, 2)
    with pytest.raises(RuntimeError, match="row_max"):
        torch.ops.bs_kernels.native_backward(
            grad_rows, logits, labels, row_max.double(), log_sum, belief_ids, belief_weights, 0.8
        )


@needs_native
def test_auto_picks_native_on_cpu():
    assert resolve_impl("auto", torch.device("cpu")) == "native"
    assert native.isa() in ("avx512", "avx2", "default")


@needs_native
def test_source_compiles_with_warnings_as_errors(tmp_path):
    """The build's flags plus -Werror (compile only: loading a second copy would re-register the operators)."""
    from torch.utils import cpp_extension

    includes = [f"-isystem{path}" for path in cpp_extension.include_paths()]
    command = [os.environ.get("CXX", "c++"), "-std=c++20", "-fPIC", *native_build.CFLAGS, "-Werror", *includes]
    command += ["-c", str(native_build.SOURCE), "-o", str(tmp_path / "kernel.o")]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    assert completed.returncode == 0, completed.stderr[-4000:]


def test_not_available_off_cpu():
    reason = native.unavailable_reason(torch.device("cuda"))
    assert reason is not None and "CPU" in reason


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv(native.DISABLE_ENV, "1")
    assert native.DISABLE_ENV in native.unavailable_reason(torch.device("cpu"))
    assert resolve_impl("auto", torch.device("cpu")) == "torch"


def test_cache_folder_and_key(monkeypatch, tmp_path):
    monkeypatch.setenv(native_build.CACHE_ENV, str(tmp_path))
    assert native_build.cache_root() == tmp_path
    source = tmp_path / "kernel.cpp"
    source.write_text("int x;\n")
    key = native_build.build_key(source)
    assert native_build.build_key(source, native_build.CFLAGS + ("-Werror",)) != key
    source.write_text("int y;\n")
    assert native_build.build_key(source) != key


@pytest.fixture
def broken_build(monkeypatch, tmp_path):
    """The process state of a machine whose compiler rejects the source: a real (failing) build in tmp_path."""
    broken_source = tmp_path / "bs_token_native.cpp"
    broken_source.write_text('#error "simulated build failure"\n')
    monkeypatch.setenv(native_build.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(native.DISABLE_ENV, raising=False)
    monkeypatch.setattr(native_build, "SOURCE", broken_source)
    monkeypatch.setattr(native, "_library_path", None)
    monkeypatch.setattr(native, "_build_error", None)
    monkeypatch.setattr(native, "_warned", False)
    return broken_source


def test_auto_falls_back_to_torch_with_one_warning(broken_build):
    logits = torch.randn(2, 5, 11, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    with pytest.warns(RuntimeWarning, match='impl="native" is unavailable') as record:
        loss = bs_kernels.bs_token_loss(logits, labels, impl="auto")
        again = bs_kernels.bs_token_loss(logits, labels, impl="auto")
    assert len([w for w in record if issubclass(w.category, RuntimeWarning)]) == 1
    message = str(record[0].message)
    assert "simulated build failure" in message and native_build.REBUILD_COMMAND in message
    expected = bs_kernels.bs_token_loss(logits, labels, impl="torch")
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(again, expected)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert resolve_impl("auto", torch.device("cpu")) == "torch"


def test_explicit_native_raises_with_the_reason(broken_build):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reason = bs_kernels.unavailable_reason("native", torch.device("cpu"))
    assert reason is not None and native_build.REBUILD_COMMAND in reason
    with pytest.raises(RuntimeError, match="simulated build failure"):
        bs_kernels.bs_token_loss(torch.randn(1, 3, 7), torch.randint(0, 7, (1, 3)), impl="native")


@needs_native
def test_vectorised_path_selected_where_the_cpu_has_it(monkeypatch):
    """A guard against silently losing the vectorised exp (no timing: the dispatcher's own answer is checked)."""
    monkeypatch.delenv("BS_KERNELS_NATIVE_ISA", raising=False)
    cpu_flags = set()
    for line in open("/proc/cpuinfo").read().splitlines():
        if line.startswith("flags"):
            cpu_flags = set(line.split(":", 1)[1].split())
            break
    if {"avx2", "fma"} <= cpu_flags:
        assert native.isa() == ("avx512" if "avx512f" in cpu_flags else "avx2")
    else:
        pytest.skip("this CPU has neither AVX-512 nor AVX2+FMA")
