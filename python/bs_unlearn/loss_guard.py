"""Stop a training run whose loss became NaN or infinite, before its weights (NaN by then) are saved.

The Trainer's default ``logging_nan_inf_filter`` replaces a non-finite step's loss by the running mean in its logs, so
a diverged run logged a plausible loss (0.0 when the first step diverged) and saved a model of NaN weights; the
driver turns that filter off (``trainer._training_arguments``), and this callback refuses the first logged loss that
is not finite. The training loop itself is left alone: the check costs nothing beyond the Trainer's own logging.
"""

from __future__ import annotations

import math

from transformers import TrainerCallback

LOSS_KEYS = ("loss", "train_loss")  # every logging step's mean loss; the whole run's mean, logged at its end


class NonFiniteLossError(ValueError):
    """The training loss became NaN or infinite (a ValueError, so the CLI reports it as one line)."""


class StopOnNonFiniteLoss(TrainerCallback):
    """Raises :class:`NonFiniteLossError` naming the step at the first logged loss that is NaN or infinite. The step
    is exact with ``logging_steps=1`` (the CLI's default); otherwise the loss went bad at or before it, within the
    logging window. Every process logs the same mean loss, so all of them stop."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in LOSS_KEYS:
            value = (logs or {}).get(key)
            if value is not None and not math.isfinite(value):
                when = "at" if key == "loss" and args.logging_steps == 1 else "by"
                raise NonFiniteLossError(
                    f"the training loss became {value} {when} step {state.global_step}; the run is stopped and its "
                    "weights are not saved (a smaller lr or forget weight usually avoids this)"
                )
