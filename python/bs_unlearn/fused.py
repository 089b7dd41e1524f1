"""Whether a model's losses and scores can run without its [B, T, V] logits: ``bs_kernels.patch_causal_lm`` patches
the causal LM once; an architecture it refuses (logit soft-capping, scaling, router losses) is remembered and takes
the materialised-logits path, with the same values."""

from __future__ import annotations

import weakref

from bs_kernels.hf import patch_causal_lm

# Models whose architecture patch_causal_lm refused (weakly held): they take the materialised-logits path.
_refused: weakref.WeakSet = weakref.WeakSet()


def fused_model(model, fused: bool = True) -> bool:
    """Patch the causal LM inside ``model`` once; False when asked not to fuse or when its architecture needs the
    materialised-logits path."""
    if not fused or model in _refused:
        return False
    try:
        patch_causal_lm(model)
    except (ValueError, TypeError):
        _refused.add(model)
        return False
    return True


def fused_supported(model) -> bool:
    """Whether the losses and scores of ``model`` can run without materialised logits (patching it once on the way,
    as every fused call does)."""
    return fused_model(model, True)
