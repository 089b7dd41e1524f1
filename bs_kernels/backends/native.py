"""impl="native": the C++ CPU kernels of csrc/bs_token_native.cpp, loaded prebuilt or built just in time.

Where the library comes from (a wheel's library built ahead of time for this process's build key, else a
just-in-time build cached under $BS_KERNELS_CACHE, checked against its recorded size and sha256), and how concurrent
builds take turns: native_build.py and csrc/README.md. This module loads the library once per process and wraps its
operators.

A build that fails makes ``unavailable_reason`` return why and how to rebuild; ``impl="auto"`` then resolves to
``"torch"`` and warns once per process, an explicit ``impl="native"`` raises RuntimeError with the same message.

Rebuild (verbose) with ``python -m bs_kernels.backends.native``; ``BS_KERNELS_DISABLE_NATIVE=1`` turns it off.

Operators (torch.ops.bs_kernels.*; fake implementations below so opcheck / torch.compile can trace them):
    native_forward(logits[N, V], labels[N], top_k)
        -> (row_max[N], log_sum[N], label_logits[N], belief_logits[N, k], belief_ids[N, k])
    native_backward(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight) -> grad
    native_backward_(same arguments) -> ()  writes the gradient into logits
    native_forward_grad(logits, labels, top_k, grad_rows) -> (the five forward outputs, grad[N, V]): the forward
        and, per row while it is in cache, the dense part -grad_rows[i] * pi_i of the gradient (forward_grad below)
    native_forward_grad_(same arguments) -> (the five forward outputs)  that dense part written into logits
    native_sparse_grad_(grad, grad_rows, labels, row_max, log_sum, label_logits, belief_logits, belief_ids,
        belief_weights, label_weight) -> ()  then the k + 1 sparse terms of each row, in place (sparse_grad_ below)
    native_release_gradient_pool() -> (), native_gradient_pool_bytes() -> int: the one-slot pool that keeps the
        last freed [N, V] gradient's memory for the next (release_gradient_pool below)
"""

from __future__ import annotations

import os
import sys
import threading
import warnings

import torch

from .._dtypes import compute_dtype
from . import native_build
from .contract import RawRowStats

NAME = "native"

DISABLE_ENV = "BS_KERNELS_DISABLE_NATIVE"

_lock = threading.Lock()
_library_path: str | None = None
_build_error: str | None = None
_warned = False


def load() -> str:
    """Load the prebuilt library if there is one for this build key, else build (or reuse) the just-in-time one."""
    library = native_build.prebuilt_library()
    if library is None:
        return native_build.build()
    torch.ops.load_library(str(library))
    return str(library)


def _ensure_built() -> str | None:
    """Load or build the extension once per process; None on success, else the failure message."""
    global _library_path, _build_error
    if _library_path is not None or _build_error is not None:  # lock-free once decided (torch.compile traces this)
        return _build_error
    with _lock:
        if _library_path is None and _build_error is None:
            try:
                _library_path = load()
                _register_fakes()
            except Exception as error:  # a compiler/ninja/loader failure of any kind means "unavailable"
                _build_error = native_build.failure_message(error)
        return _build_error


def unavailable_reason(device: torch.device) -> str | None:
    """None when the kernel is built (building it on first call); otherwise why not and how to fix it."""
    global _warned
    device = torch.device(device)
    if device.type != "cpu":
        return f'impl="native" runs on CPU tensors only, got device {device}; use impl="auto" or "triton" there.'
    if os.environ.get(DISABLE_ENV, "0") not in ("", "0"):
        return f'impl="native" is disabled by {DISABLE_ENV}={os.environ[DISABLE_ENV]}; unset it to use the C++ kernel.'
    reason = _ensure_built()
    if reason is not None and not _warned:
        # The one warning for a failed build: "auto" falls back silently after this.
        _warned = True
        warnings.warn(reason, RuntimeWarning, stacklevel=2)
    return reason


def isa() -> str:
    """The instruction set the kernels run with on this CPU ("avx512", "avx2" or "default")."""
    _require_built()
    return torch.ops.bs_kernels.native_isa()


def release_gradient_pool() -> None:
    """Free the memory of the last freed [N, V] gradient that the native kernels keep for the next one.

    Fresh memory of that size is faulted in and zeroed by the kernel at every step (about two copies of its bytes);
    the kernels therefore keep one freed gradient's block and place the next gradient that fits in it
    (csrc/bs_token_native.cpp, GradientPool). Call this to return it to the system, e.g. after training; setting
    BS_KERNELS_NATIVE_GRAD_POOL=0 keeps no block at all. A no-op where the library is not built."""
    if _ensure_built() is None:
        torch.ops.bs_kernels.native_release_gradient_pool()


def gradient_pool_bytes() -> int:
    """Bytes the gradient pool holds now (0 where the library is not built)."""
    return 0 if _ensure_built() is not None else int(torch.ops.bs_kernels.native_gradient_pool_bytes())


def _require_built() -> None:
    reason = _ensure_built()
    if reason is not None:
        raise RuntimeError(reason)


def forward(logits: torch.Tensor, labels: torch.Tensor, top_k: int) -> RawRowStats:
    """One pass per row; see bs_kernels/backends/contract.py. logits [N, V], labels [N] int64 (-1 = ignored)."""
    _require_built()
    return RawRowStats(*torch.ops.bs_kernels.native_forward(logits, labels, top_k))


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
) -> torch.Tensor:
    """grad [N, V] in the logits' dtype (the contract's formula); written into ``logits`` when ``inplace``."""
    _require_built()
    arguments = (grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, float(label_weight))
    if inplace and logits.stride(-1) == 1:
        torch.ops.bs_kernels.native_backward_(*arguments)
        return logits
    return torch.ops.bs_kernels.native_backward(*arguments)


def forward_grad(
    logits: torch.Tensor, labels: torch.Tensor, top_k: int, grad_rows: torch.Tensor, inplace: bool
) -> tuple[RawRowStats, torch.Tensor]:
    """forward() and, in the same pass over each row, grad[i] = -grad_rows[i] * pi_i: the contract's gradient
    without its k + 1 sparse terms (sparse_grad_ writes those), pi_i = exp((z - m) - log_sum) as in backward. Rows
    with grad_rows 0 get zeros, counted rows whose m or log_sum is not finite get NaN (what backward_rows makes of
    them). Into ``logits`` itself when ``inplace``."""
    _require_built()
    if inplace and logits.stride(-1) == 1:
        outputs = torch.ops.bs_kernels.native_forward_grad_(logits, labels, top_k, grad_rows)
        grad = logits
    else:
        *outputs, grad = torch.ops.bs_kernels.native_forward_grad(logits, labels, top_k, grad_rows)
    return RawRowStats(*outputs), grad


def sparse_grad_(
    grad: torch.Tensor,
    grad_rows: torch.Tensor,
    labels: torch.Tensor,
    row_max: torch.Tensor,
    log_sum: torch.Tensor,
    raw: RawRowStats,
    belief_ids: torch.Tensor,
    belief_weights: torch.Tensor,
    label_weight: float,
) -> None:
    """Rewrite the k + 1 sparse entries of each row of forward_grad's ``grad`` as the contract's
    grad_rows * (coef - pi), from the forward's statistics ``raw`` (backward's own code, so with the grad_rows and
    row_max of backward_rows and the epilogue's log_sum the gradient equals native_backward's); rows with
    grad_rows 0 are left as they are."""
    _require_built()
    torch.ops.bs_kernels.native_sparse_grad_(
        grad, grad_rows, labels, row_max, log_sum, raw.label_logits, raw.belief_logits, belief_ids, belief_weights,
        float(label_weight),
    )  # fmt: skip


def _register_fakes() -> None:
    """Shape/dtype-only implementations for FakeTensor tracing (torch.compile, opcheck); registered once."""
    if getattr(_register_fakes, "done", False):
        return

    @torch.library.register_fake("bs_kernels::native_forward")
    def _forward_fake(logits, labels, top_k):
        num_rows = logits.shape[0]
        stats_dtype = compute_dtype(logits.dtype)
        return (
            logits.new_empty((num_rows,), dtype=stats_dtype),
            logits.new_empty((num_rows,), dtype=stats_dtype),
            logits.new_empty((num_rows,), dtype=stats_dtype),
            logits.new_empty((num_rows, top_k), dtype=stats_dtype),
            logits.new_empty((num_rows, top_k), dtype=torch.int64),
        )

    @torch.library.register_fake("bs_kernels::native_backward")
    def _backward_fake(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight):
        return logits.new_empty(logits.shape)

    @torch.library.register_fake("bs_kernels::native_backward_")
    def _backward_inplace_fake(grad_rows, logits, labels, row_max, log_sum, belief_ids, belief_weights, label_weight):
        return None

    @torch.library.register_fake("bs_kernels::native_forward_grad")
    def _forward_grad_fake(logits, labels, top_k, grad_rows):
        return (*_forward_fake(logits, labels, top_k), logits.new_empty(logits.shape))

    @torch.library.register_fake("bs_kernels::native_forward_grad_")
    def _forward_grad_inplace_fake(logits, labels, top_k, grad_rows):
        return _forward_fake(logits, labels, top_k)

    @torch.library.register_fake("bs_kernels::native_sparse_grad_")
    def _sparse_grad_fake(
        grad, grad_rows, labels, row_max, log_sum, label_logits, belief_logits, belief_ids, belief_weights, w
    ):
        return None

    _register_fakes.done = True


def _main() -> int:
    """Rebuild verbosely (python -m bs_kernels.backends.native) and print where the library is and what ISA runs."""
    print(f"source: {native_build.SOURCE}\ncache:  {native_build.cache_root()}")
    prebuilt = native_build.prebuilt_library()
    if prebuilt is not None:
        print(f'prebuilt: {prebuilt} (what impl="native" loads; the build below is only for diagnosis)')
    try:
        path = native_build.build(verbose=True)
    except Exception as error:
        print(native_build.failure_message(error), file=sys.stderr)
        return 1
    print(f"built:  {path}\nisa:    {torch.ops.bs_kernels.native_isa()}")
    return 0


if __name__ == "__main__":
    sys.exit(_main())
