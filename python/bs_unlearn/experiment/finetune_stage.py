"""The fine-tuning stage: the start model (forget + retain) and the retain-only reference of forget quality."""

from __future__ import annotations

import pathlib
from collections.abc import Sequence

from ..config import FinetuneConfig
from ..trainer import ProgressLines, finetune
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
    say: Say = quiet,
):
    """Fine-tune on the QA files (answer NLL); returns the trained model."""
    config = FinetuneConfig(
        model=model_spec,
        data=[str(path) for path in data_paths],
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        seed=seed,
        progress=False,
        logging_steps=10**6,  # the pipeline prints its own summary lines
    )
    callbacks = [ProgressLines(say, prefix="  fine-tune ")]
    return finetune(config, model=model, tokenizer=tokenizer, callbacks=callbacks).model
