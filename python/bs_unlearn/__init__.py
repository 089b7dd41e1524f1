"""bs_unlearn: a thin unlearning driver (GA, GradDiff, NPO, BS-T, BS-S) on transformers.Trainer and bs_kernels.

    from bs_unlearn import UnlearnConfig, unlearn
    result = unlearn(UnlearnConfig(method="bs-t", forget="forget01.jsonl", retain="retain99.jsonl", output="out"))

Submodules are imported lazily so that ``import bs_unlearn`` stays cheap (the CLI loads transformers on demand).
"""

from __future__ import annotations

import importlib

__all__ = [
    "FinetuneConfig",
    "ObjectiveConfig",
    "RunResult",
    "UnlearnConfig",
    "UnlearnObjective",
    "finetune",
    "load_model_and_tokenizer",
    "sample_beliefs",
    "unlearn",
]

_LOCATIONS = {
    "FinetuneConfig": "trainer",
    "RunResult": "trainer",
    "UnlearnConfig": "trainer",
    "finetune": "trainer",
    "unlearn": "trainer",
    "ObjectiveConfig": "objectives",
    "UnlearnObjective": "objectives",
    "load_model_and_tokenizer": "models",
    "sample_beliefs": "beliefs",
}


def __getattr__(name: str):
    if name in _LOCATIONS:
        return getattr(importlib.import_module(f".{_LOCATIONS[name]}", __name__), name)
    raise AttributeError(f"module 'bs_unlearn' has no attribute {name!r}")
