"""The unlearning stage: one method from a copy of the start model, with the squeezing probe, optionally stopped at
a forgetting target (docs/math.md, "Matched forgetting")."""

from __future__ import annotations

import copy
import math
import time

from ..config import BeliefConfig, ObjectiveConfig, UnlearnConfig
from ..probe import SqueezeProbe
from ..step_timing import StepTimer
from ..tofu_data import QASplit
from ..trainer import ProgressLines, release_training_state, unlearn
from .progress import Say, quiet
from .run_specs import RunSpec
from .settings import UnlearnSettings


def unlearn_stage(
    start_model,
    tokenizer,
    spec: RunSpec,
    *,
    forget: QASplit,
    retain: QASplit,
    band: list[dict],
    settings: UnlearnSettings,
    lr: float,
    max_steps: int,
    stop_at=None,
    start_record: dict | None = None,
    model_spec: str = "default",
    names: tuple[str, str] = ("", ""),
    fused_linear: bool = True,
    step_timer: StepTimer | None = None,
    say: Say = quiet,
) -> tuple[object, dict]:
    """Unlearn ``forget`` from a copy of ``start_model`` with one method; returns (the model, the run record).

    ``stop_at`` (a probe.ForgettingTarget) stops at the first step whose forget target log-prob is at or below the
    target; ``max_steps`` is the cap. ``fused_linear``: the losses and the probe's scoring without the [B, T, V]
    logits where the model supports it; ``step_timer``: times the steps' phases (the stage profile). The run record
    holds the probe's records, where it stopped, and the seconds.
    """

    def probe_line(record: dict) -> None:
        say(
            f"    step {record['step']}: target lp {record['target_lp']:.2f}, band lp "
            f"{record.get('belief_lp', math.nan):.2f}, retain lp {record.get('retain_lp', math.nan):.2f}"
        )

    started = time.perf_counter()
    model_name, data_name = names
    probe = SqueezeProbe(
        tokenizer,
        forget.records,
        band,
        retain_records=retain.records[: settings.probe_retain_records],
        every=settings.probe_every,
        top_k=settings.top_k,
        label=spec.label,
        model_name=model_name,
        data_name=data_name,
        stop_at=stop_at,
        fused_linear=fused_linear,
        on_record=probe_line,
        initial_records=[start_record] if start_record is not None else (),
    )
    beliefs = {"max_new_tokens": settings.bs_s_max_new_tokens}
    if "num_beliefs" in spec.options:
        beliefs["num_beliefs"] = spec.options["num_beliefs"]
    config = UnlearnConfig(
        model=model_spec,
        forget=str(forget.path),
        retain=str(retain.path),
        max_steps=max_steps,
        lr=lr,
        batch_size=settings.batch_size,
        seed=settings.seed,
        fused_linear=fused_linear,
        progress=False,
        logging_steps=10**6,
        objective=ObjectiveConfig(method=spec.method, **spec.objective_options),
        beliefs=BeliefConfig(**beliefs),
    )
    callbacks = [probe, ProgressLines(say, prefix="    unlearn ")]
    if step_timer is not None:
        callbacks.insert(0, step_timer)
    result = unlearn(config, callbacks=callbacks, model=copy.deepcopy(start_model), tokenizer=tokenizer)
    release_training_state(result)  # the optimizer's state and the reference model are not needed past the run
    probe_run = probe.to_dict()
    steps = result.summary["steps"]
    record = {
        "label": spec.label,
        "method": spec.method,
        "options": spec.options,
        "lr": lr,
        "steps": steps,
        "max_steps": max_steps,
        "reached": None if stop_at is None else probe.reached_step is not None,
        "abandoned_step": probe.abandoned_step,
        "probe": probe_run,
        "seconds": round(time.perf_counter() - started, 1),
    }
    last = probe_run["records"][-1]
    say(
        f"  {spec.label} lr {lr:g}: {steps} steps, target lp {last['target_lp']:.2f}, "
        f"band lp {last.get('belief_lp', math.nan):.2f}, retain lp {last.get('retain_lp', math.nan):.2f}"
        + ("" if stop_at is None or record["reached"] else " (target not reached)")
        + ("" if probe.abandoned_step is None else f" (given up at step {probe.abandoned_step}: projected short)")
        + f" ({record['seconds']:.0f} s)"
    )
    return result.model, record
