"""The fine-tuning stage: the start model (forget + retain) and the retain-only reference of forget quality."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from ..config import FinetuneConfig
from ..step_timing import StepTimer
from ..trainer import ProgressLines, finetune, release_training_state
from .progress import Say, quiet


def finetune_stage(
    model_spec: str,
    data_paths: Sequence[pathlib.Path],
    *,
    epochs: float,
    lr: float,
    batch_size: int,
    seed: int,
    model=None,
    tokenizer=None,
    fused_linear: bool = True,
    step_timer: StepTimer | None = None,
    say: Say = quiet,
):
    """Fine-tune on the QA files (answer NLL); returns the trained model. ``fused_linear``: the loss without the
    [B, T, V] logits where the model supports it; ``step_timer``: times the steps' phases (the stage profile)."""
    config = FinetuneConfig(
        model=model_spec,
        data=[str(path) for path in data_paths],
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        fused_linear=fused_linear,
        progress=False,
        logging_steps=10**6,  # the pipeline prints its own summary lines
    )
    callbacks = [ProgressLines(say, prefix="  fine-tune ")]
    if step_timer is not None:
        callbacks.insert(0, step_timer)
    result = finetune(config, model=model, tokenizer=tokenizer, callbacks=callbacks)
    release_training_state(result)  # the optimizer's state is not needed past the run
    return result.model
