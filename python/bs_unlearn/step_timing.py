"""Where a training step's time goes: forward, loss, backward, optimizer, probe (a Trainer callback).

Cheap by design: ``time.perf_counter`` sums per phase, no device synchronisation (exact on CPU; on a GPU the
asynchronous kernels make the split approximate, the step's total stays right). The phases of one optimizer step:

- ``forward``: the decoder's forward inside the trainer's loss (a hook on the causal LM's ``base_model``; the
  reference model's forward under NPO / KL counts too, the probe's and belief sampling's do not);
- ``loss``: the rest of the trainer's ``compute_loss``: the lm_head and the loss (fused or over materialised logits);
- ``backward``: from the step's start to the optimizer, less the loss computations (the backward passes);
- ``optimizer``: the optimizer's step (gradient clipping included);
- ``probe``: from the optimizer to the next step: the callbacks after it, nearly all the squeezing probe's scoring
  (and the belief resampling of on-policy BS-S).
"""

from __future__ import annotations

import contextlib
import time

from transformers import TrainerCallback

PHASES = ("forward", "loss", "backward", "optimizer", "probe")


class StepTimer(TrainerCallback):
    """Seconds per phase of every optimizer step, summed over the runs it is given to (:meth:`to_dict`).

    A trainer of this package times its loss through :meth:`loss_span`; the callback does the rest. One timer may
    serve several runs one after the other (e.g. every learning rate of a matched search)."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.steps = 0
        self._in_loss = False
        self._forward_started: float | None = None
        self._loss_in_step = 0.0
        self._step_started: float | None = None
        self._optimizer_started: float | None = None
        self._after_optimizer: float | None = None
        self._hooks: list = []

    # -- the trainer's loss ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def loss_span(self):
        """Around a trainer's ``compute_loss``: its time, less the decoder's forward inside it, is ``loss``."""
        started = time.perf_counter()
        forward_before = self.seconds["forward"]
        self._in_loss = True
        try:
            yield
        finally:
            self._in_loss = False
            spent = time.perf_counter() - started
            self._loss_in_step += spent
            self.seconds["loss"] += spent - (self.seconds["forward"] - forward_before)

    def _forward_pre(self, module, args) -> None:
        if self._in_loss:
            self._forward_started = time.perf_counter()

    def _forward_post(self, module, args, output) -> None:
        if self._in_loss and self._forward_started is not None:
            self.seconds["forward"] += time.perf_counter() - self._forward_started
            self._forward_started = None

    def _attach(self, model) -> None:
        self._detach()
        decoder = getattr(model, "base_model", None)
        if decoder is None or decoder is model:  # no separate decoder: the whole model's forward counts
            decoder = model
        self._hooks = [
            decoder.register_forward_pre_hook(self._forward_pre),
            decoder.register_forward_hook(self._forward_post),
        ]

    def _detach(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    # -- TrainerCallback hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            self._attach(model)
        self._after_optimizer = None

    def _close_probe(self) -> None:
        if self._after_optimizer is not None:
            self.seconds["probe"] += time.perf_counter() - self._after_optimizer
            self._after_optimizer = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._close_probe()
        self._step_started = time.perf_counter()
        self._loss_in_step = 0.0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._optimizer_started = time.perf_counter()
        if self._step_started is not None:
            self.seconds["backward"] += self._optimizer_started - self._step_started - self._loss_in_step

    def on_optimizer_step(self, args, state, control, **kwargs):
        now = time.perf_counter()
        if self._optimizer_started is not None:
            self.seconds["optimizer"] += now - self._optimizer_started
        self._after_optimizer = now
        self.steps += 1

    def on_train_end(self, args, state, control, **kwargs):
        self._close_probe()
        self._detach()

    def to_dict(self) -> dict:
        """``steps`` and, per phase, the seconds in all and per step."""
        per_step = {name: round(value / self.steps, 4) if self.steps else 0.0 for name, value in self.seconds.items()}
        return {
            "steps": self.steps,
            "seconds": {name: round(value, 4) for name, value in self.seconds.items()},
            "seconds_per_step": per_step,
        }
