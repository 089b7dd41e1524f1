"""The squeezing probe (docs/math.md, "Squeezing probe").

Before unlearning, ``collect_belief_band`` asks the initial model for its high-likelihood answers to each forget
question other than the target (beam search with ``no_repeat_ngram_size`` so the beams do not fill with repetitions,
optionally plus temperature samples), deduplicated: the "belief band". During unlearning ``SqueezeProbe`` (a
``transformers.TrainerCallback``) records every ``every`` optimizer steps, as mean per-token log-probs averaged over
sequences:

- ``target_lp``: the forget answers (what GA pushes down);
- ``belief_lp``: the belief band (where GA's freed probability mass goes if the model squeezes);
- ``paraphrase_lp``: the paraphrased forget answers, when the data has them;
- ``retain_lp``: retain answers (the early warning of collapse);
- ``target_p_label`` / ``target_alt_mass``: the token-level view (docs/math.md, "Squeezing probe"): p(label) at each
  forget answer position and the mass on the ``top_k`` most likely other tokens, averaged over positions. GA's squeeze
  shows as p(label) falling while alt mass rises by about as much.

It writes the records to JSON and, through ``plotting.plot_probe_runs``, a PNG.

Matched forgetting (docs/math.md, "Matched forgetting"): with ``stop_at`` (a :class:`ForgettingTarget`) the probe checks
the forget targets' mean per-token log-prob after every ``stop_at.check_every`` steps and stops training at the first
check at or below the target; ``reached_step`` says where (None: the step cap came first). With ``give_up`` it also
stops a run that even an optimistic projection shows cannot reach the target (``abandoned_step``), so the time goes to
the next learning rate (:func:`projected_drop`: from the third check on, the drop of the target log-prob since the
start, grown to the cap by the largest per-step growth factor of the last three checks, covers less than half the
way to the target). Forgetting curves speed up, so a straight line from the start under-projects them; a constant
growth factor follows an accelerating curve, and the largest recent factor and the half-way bar are the margin. It
is still a heuristic: a curve whose growth itself keeps rising could be given up although it would have made it.
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import TrainerCallback

from .data import tokenize_qa
from .generation import generate_answers, temperature_samples
from .metrics.tofu import rouge_tokens
from .outputs import write_json_atomic
from .scoring import score_encodings


@dataclass(frozen=True)
class ForgettingTarget:
    """Stop a run when the forget answers' mean per-token log-prob is at or below ``target_lp``.

    ``check_every``: optimizer steps between checks (each check scores the forget targets only, a few forward
    passes); 1 keeps the overshoot past the target to one step.
    """

    target_lp: float
    check_every: int = 1
    give_up: bool = False

    def hopeless(self, checks: Sequence[tuple[int, float]], max_steps: int) -> bool:
        """Whether a run whose checks so far are ``checks`` ((step, target log-prob), the start first) should be
        given up (with ``give_up``): its :func:`projected_drop` at ``max_steps`` covers less than half the way from
        the start to the target."""
        if not self.give_up:
            return False
        drop = projected_drop(checks, max_steps)
        return drop is not None and drop < (checks[0][1] - self.target_lp) / 2

    def __post_init__(self) -> None:
        if not isinstance(self.check_every, int) or self.check_every < 1:
            raise ValueError(f"check_every must be an int >= 1, got {self.check_every!r}")
        if not self.target_lp < 0:
            raise ValueError(f"target_lp must be < 0 (a mean per-token log-prob), got {self.target_lp!r}")


def projected_drop(checks: Sequence[tuple[int, float]], max_steps: int, window: int = 3) -> float | None:
    """How far the target log-prob could have fallen from the start by ``max_steps``, extrapolating the recent pace.

    ``checks``: (step, target log-prob) of the stopping checks, the start (step 0) first. With d_t the drop since
    the start at check t (t >= 1), the per-step growth factor between consecutive checks is
    (d_t / d_{t-1}) ** (1 / steps apart); the projection is d_last * g ** (max_steps - last step) with g the largest
    factor over the last ``window`` pairs (at least 1). None (no projection: keep going) before the start and two
    checks, or when a drop in the window before the last is not positive (no pace to extrapolate yet).
    """
    if len(checks) < 3:
        return None
    start = checks[0][1]
    recent = [(step, start - lp) for step, lp in checks[1:][-(window + 1) :]]  # the start's drop is 0: no factor
    if any(drop <= 0 for _, drop in recent[:-1]):
        return None
    factors = [
        (max(later, 0.0) / earlier) ** (1.0 / max(later_step - step, 1))
        for (step, earlier), (later_step, later) in zip(recent, recent[1:])
    ]
    last_step, last_drop = recent[-1]
    growth = max(1.0, *factors)
    return max(last_drop, 0.0) * growth ** max(max_steps - last_step, 0)


def _normalised(text: str) -> str:
    return " ".join(rouge_tokens(text))


@torch.no_grad()
def collect_belief_band(
    model: torch.nn.Module,
    tokenizer,
    records: Sequence[dict],
    *,
    num_beams: int = 4,
    num_samples: int = 0,
    max_new_tokens: int = 32,
    no_repeat_ngram_size: int = 3,
    temperature: float = 1.0,
    batch_size: int = 8,
    seed: int = 0,
) -> list[dict]:
    """The initial model's high-likelihood answers other than the target, per forget record.

    Args:
        records: TOFU records (question, answer).
        num_beams: beam width; all beams are returned (0 disables beam search).
        num_samples: additional temperature samples per question.
        no_repeat_ngram_size: passed to beam search so the band is not made of repetitions (0 disables it).
    Returns: one dict per record: {"question", "target", "beliefs": [distinct answers != target, beams first]}.
    """
    if num_beams < 0 or num_samples < 0 or num_beams + num_samples == 0:
        raise ValueError(f"need num_beams > 0 or num_samples > 0, got num_beams={num_beams}, num_samples={num_samples}")
    questions = [r["question"] for r in records]
    candidates: list[list[str]] = [[] for _ in records]
    if num_beams:
        beams = generate_answers(
            model,
            tokenizer,
            questions,
            max_new_tokens=max_new_tokens,
            batch_size=batch_size,
            num_return_sequences=num_beams,
            num_beams=num_beams,
            no_repeat_ngram_size=no_repeat_ngram_size or None,
            early_stopping=True,
        )
        for found, texts in zip(candidates, beams):
            found.extend(texts)
    if num_samples:
        samples = temperature_samples(
            model,
            tokenizer,
            questions,
            num_samples=num_samples,
            temperature=temperature,
            max_new_tokens=max_new_tokens,
            seed=seed,
            batch_size=batch_size,
        )
        for found, texts in zip(candidates, samples):
            found.extend(texts)
    band = []
    for record, found in zip(records, candidates):
        seen = {_normalised(record["answer"])}
        beliefs = []
        for text in found:
            key = _normalised(text)
            if key and key not in seen:
                seen.add(key)
                beliefs.append(text)
        band.append({"question": record["question"], "target": record["answer"], "beliefs": beliefs})
    return band


class SqueezeProbe(TrainerCallback):
    """Trainer callback recording the squeezing probe's quantities every ``every`` steps (and at the start/end).

    Args:
        tokenizer: the model's tokenizer (prompt format of ``data.tokenize_qa``).
        forget_records: TOFU records being unlearned (question, answer, optional paraphrased_answer).
        belief_band: output of :func:`collect_belief_band` for the same records (computed on the initial model).
        retain_records: optional TOFU records whose answers should stay likely.
        every: record every this many optimizer steps.
        top_k: the number of rival tokens in the token-level alt mass.
        output_json / output_png: written at the end of training (and by :meth:`save`).
        label / model_name / data_name: shown in the JSON and the plot's legend and title.
        impl / fused_linear: the bs_kernels backend and whether scoring skips the [B, T, V] logits
            (``scoring.score_encodings``'s ``fused``; the same records either way).
        stop_at: a :class:`ForgettingTarget` to stop training at (matched forgetting).
        on_record: called with each new record (e.g. to print a progress line).
        initial_records: records already measured on the same model and probe sets (e.g. the step-0 record, the same
            for every run from one start); a step that has a record is not measured again.
    """

    def __init__(
        self,
        tokenizer,
        forget_records: Sequence[dict],
        belief_band: Sequence[dict],
        *,
        retain_records: Sequence[dict] | None = None,
        every: int = 5,
        top_k: int = 20,
        batch_size: int = 16,
        output_json: str | os.PathLike | None = None,
        output_png: str | os.PathLike | None = None,
        label: str = "",
        model_name: str = "",
        data_name: str = "",
        impl: str = "auto",
        fused_linear: bool = True,
        stop_at: ForgettingTarget | None = None,
        on_record=None,
        initial_records: Sequence[dict] = (),
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if not forget_records:
            raise ValueError("forget_records is empty")
        if len(belief_band) != len(forget_records):
            raise ValueError(
                f"belief_band has {len(belief_band)} entries for {len(forget_records)} forget records (collect it on "
                "the same records)"
            )
        self.tokenizer = tokenizer
        self.every = every
        self.top_k = top_k
        self.batch_size = batch_size
        self.impl = impl
        self.fused_linear = fused_linear
        self.output_json = pathlib.Path(output_json) if output_json else None
        self.output_png = pathlib.Path(output_png) if output_png else None
        self.label, self.model_name, self.data_name = label, model_name, data_name
        self.belief_band = [dict(entry) for entry in belief_band]
        self.targets = [tokenize_qa(tokenizer, r["question"], r["answer"]) for r in forget_records]
        self.beliefs = [
            tokenize_qa(tokenizer, entry["question"], text) for entry in belief_band for text in entry["beliefs"]
        ]
        self.paraphrases = [
            tokenize_qa(tokenizer, r["question"], r["paraphrased_answer"])
            for r in forget_records
            if isinstance(r.get("paraphrased_answer"), str)
        ]
        self.retain = [tokenize_qa(tokenizer, r["question"], r["answer"]) for r in (retain_records or [])]
        self.records: list[dict] = [dict(record) for record in initial_records]
        self.stop_at = stop_at
        self.on_record = on_record
        self.reached_step: int | None = None
        self.abandoned_step: int | None = None
        self.checks: list[tuple[int, float]] = []  # (step, target lp) of the stopping checks, the start first
        self._started = time.perf_counter()

    def _score_targets(self, model: torch.nn.Module):
        return score_encodings(
            model,
            self.tokenizer,
            self.targets,
            batch_size=self.batch_size,
            token_view_top_k=self.top_k,
            impl=self.impl,
            fused=self.fused_linear,
        )

    def measure(self, model: torch.nn.Module, step: int, target=None) -> dict:
        """Score every probe set with ``model`` now and append the record for ``step`` (``target``: the forget
        targets' scores when they were just computed for the stopping check)."""
        started = time.perf_counter()
        target = target if target is not None else self._score_targets(model)
        record = {
            "step": int(step),
            "target_lp": float(target.mean_logprob.mean()),
            "target_p_label": float(target.p_label.mean()),
            "target_alt_mass": float(target.alt_mass.mean()),
        }
        for name, encodings in (
            ("belief_lp", self.beliefs),
            ("paraphrase_lp", self.paraphrases),
            ("retain_lp", self.retain),
        ):
            if encodings:
                scores = score_encodings(
                    model,
                    self.tokenizer,
                    encodings,
                    batch_size=self.batch_size,
                    impl=self.impl,
                    fused=self.fused_linear,
                )
                record[name] = float(np.mean(scores.mean_logprob))
        record["probe_seconds"] = round(time.perf_counter() - started, 3)
        record["elapsed_seconds"] = round(time.perf_counter() - self._started, 3)
        self.records.append(record)
        if self.on_record is not None:
            self.on_record(record)
        return record

    # -- TrainerCallback hooks ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._started = time.perf_counter()
        if model is not None and not any(r["step"] == state.global_step for r in self.records):
            self.measure(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        step = state.global_step
        target = None
        if self.stop_at is not None and step % self.stop_at.check_every == 0:
            target = self._score_targets(model)
            target_lp = float(target.mean_logprob.mean())
            if not self.checks and self.records:
                self.checks.append((self.records[0]["step"], self.records[0]["target_lp"]))
            self.checks.append((step, target_lp))
            if target_lp <= self.stop_at.target_lp:
                self.reached_step = step
                control.should_training_stop = True
            elif step < state.max_steps and self.stop_at.hopeless(self.checks, state.max_steps):
                self.abandoned_step = step
                control.should_training_stop = True
        if step % self.every == 0 or step in (self.reached_step, self.abandoned_step):
            self.measure(model, step, target)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if model is not None and not any(r["step"] == state.global_step for r in self.records):
            self.measure(model, state.global_step)
        if state.is_world_process_zero:
            self.save()

    # -- output ------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "label": self.label,
            "model": self.model_name,
            "data": self.data_name,
            "every": self.every,
            "top_k": self.top_k,
            "counts": {
                "targets": len(self.targets),
                "beliefs": len(self.beliefs),
                "paraphrases": len(self.paraphrases),
                "retain": len(self.retain),
            },
            "records": self.records,
            "belief_band": self.belief_band,
            "stop_at": None if self.stop_at is None else {"target_lp": self.stop_at.target_lp},
            "reached_step": self.reached_step,
            "abandoned_step": self.abandoned_step,
            "checks": [list(check) for check in self.checks],  # every stopping check: what the give-up rule saw
        }

    def save(self) -> None:
        """Write the JSON and the PNG where configured (creating parent folders)."""
        if self.output_json is not None:
            write_probe_json(self.to_dict(), self.output_json)
        if self.output_png is not None:
            from .plotting import plot_probe_runs

            plot_probe_runs([self.to_dict()], self.output_png)


def write_probe_json(run: dict, path: str | os.PathLike) -> None:
    """Write a probe run (``SqueezeProbe.to_dict()``) to ``path`` atomically."""
    write_json_atomic(run, path)


def load_probe_json(path: str | os.PathLike) -> dict:
    """Read a probe JSON, checking it has records."""
    path = pathlib.Path(path)
    try:
        run = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read probe JSON {path}: {error}") from error
    if not isinstance(run, dict) or not run.get("records"):
        raise ValueError(f"{path} is not a squeezing-probe JSON (no 'records')")
    return run


def value_at_target(run: dict, target_lp: float, key: str = "retain_lp") -> float | None:
    """``key`` where the run's target log-prob crossed ``target_lp``: linear in the target log-prob between the last
    record above it and the first at or below it (records are every ``every`` steps and at the stop, so this spans
    up to that many steps). None when no two records cross it or they lack ``key``.

    A run stops at the first step at or below the target, which a large step overshoots (BS-T's land 0.3-0.7 nats
    past -3, GradDiff's 0.16): the value at the target itself compares runs at exactly the same forgetting.
    """
    records = [r for r in run["records"] if key in r and "target_lp" in r]
    for before, after in zip(records, records[1:]):
        if before["target_lp"] > target_lp >= after["target_lp"]:
            share = (before["target_lp"] - target_lp) / (before["target_lp"] - after["target_lp"])
            return before[key] + share * (after[key] - before[key])
    return None


def band_change(run: dict, key: str = "belief_lp") -> float | None:
    """Last minus first recorded value of ``key`` (e.g. the belief band's log-prob change over the run)."""
    values = [r[key] for r in run["records"] if key in r]
    return values[-1] - values[0] if len(values) >= 2 else None
