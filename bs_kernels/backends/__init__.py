"""Backend registry: which logits backends exist, whether each can run, and what ``impl="auto"`` picks.

Backends are imported lazily so that importing bs_kernels never compiles a kernel or imports Triton.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

_MODULES = {
    "torch": "bs_kernels.backends.torch_chunked",
    "native": "bs_kernels.backends.native",
    "triton": "bs_kernels.backends.triton_launch",
}

# Fastest first, per device type; "torch" runs everywhere and ends every list.
_AUTO_ORDER = {
    "cuda": ("triton", "torch"),
    "cpu": ("native", "torch"),
}


def _import(name: str) -> ModuleType:
    return importlib.import_module(_MODULES[name])


def unavailable_reason(name: str, device: torch.device) -> str | None:
    """None if backend ``name`` can run on ``device``, else why not (and how to fix it)."""
    try:
        module = _import(name)
    except ImportError as error:
        return f'impl="{name}" cannot be imported: {error}'
    return module.unavailable_reason(device)


def get_backend(name: str, device: torch.device) -> ModuleType:
    """The backend module for an explicit impl; raises RuntimeError with the reason when it cannot run."""
    reason = unavailable_reason(name, device)
    if reason is not None:
        raise RuntimeError(reason)
    return _import(name)


def resolve_impl(impl: str, device: torch.device) -> str:
    """Map ``"auto"`` to the fastest backend available on ``device``; other names pass through unchanged."""
    if impl != "auto":
        return impl
    for name in _AUTO_ORDER.get(device.type, ("torch",)):
        if unavailable_reason(name, device) is None:
            return name
    return "torch"
