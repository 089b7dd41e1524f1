"""bs_unlearn: a thin unlearning driver (GA, GradDiff, NPO, BS-T, BS-S) on transformers.Trainer and bs_kernels.

    from bs_unlearn import ObjectiveConfig, UnlearnConfig, unlearn
    objective = ObjectiveConfig(method="bs-t", lam=0.5)
    result = unlearn(UnlearnConfig(forget="forget01.jsonl", retain="retain99.jsonl", objective=objective, output="out"))

Layers (each imports only from the ones above it; tests/driver/test_layers.py keeps them):
    data, models, outputs, tiny_model, tofu_data   QA files and tokenisation, model loading, output folders, the
                                                    tiny test model, TOFU-format splits and evaluation sets
    config                                     one dataclass per concept (the CLI is generated from them)
    scoring, generation, metrics               log-probs / generations of a model; TOFU's and the paper's metrics
    objectives (terms, model_terms)            loss terms; the method's loss on a batch
    beliefs, trainer, probe, plotting          BS-S sampling, the Trainer subclasses, the squeezing probe, figures
    experiment                                 the pipeline: run specs, stages, the comparison, tables, results
    commands, cli                              bs-unlearn's subcommands
    integrations                               adapters for other codebases, over objectives and beliefs

Submodules are imported lazily so that ``import bs_unlearn`` stays cheap (the CLI loads transformers on demand).
"""

from __future__ import annotations

import importlib

__all__ = [
    "BeliefConfig",
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
    "BeliefConfig": "config",
    "FinetuneConfig": "config",
    "ObjectiveConfig": "config",
    "UnlearnConfig": "config",
    "RunResult": "trainer",
    "finetune": "trainer",
    "unlearn": "trainer",
    "UnlearnObjective": "objectives",
    "load_model_and_tokenizer": "models",
    "sample_beliefs": "beliefs",
}


def __getattr__(name: str):
    if name in _LOCATIONS:
        return getattr(importlib.import_module(f".{_LOCATIONS[name]}", __name__), name)
    raise AttributeError(f"module 'bs_unlearn' has no attribute {name!r}")
