"""The matched stage: the unlearning stage at each learning rate of a grid, keeping the one that reaches the
forgetting target with the least retain damage (docs/math.md, "Matched forgetting")."""

from __future__ import annotations

from collections.abc import Sequence

from .progress import Say, quiet
from .run_specs import RunSpec
from .unlearn_stage import unlearn_stage


def retain_damage(run: dict) -> float:
    """How much the retain answers' mean log-prob fell over a run (>= 0 is damage; from the probe's records)."""
    records = [r for r in run["probe"]["records"] if "retain_lp" in r]
    return records[0]["retain_lp"] - records[-1]["retain_lp"] if len(records) >= 2 else 0.0


def matched_stage(
    start_model,
    tokenizer,
    spec: RunSpec,
    *,
    learning_rates: Sequence[float],
    stop_at,
    max_steps: int,
    lr_search: str = "all",
    say: Say = quiet,
    **stage_kwargs,
) -> tuple[object, dict]:
    """``unlearn_stage`` at the learning rates of a grid (``spec.lr`` alone when the spec fixes one; the spec's own
    ``lr_grid`` in place of ``learning_rates`` when it has one), each stopping
    at ``stop_at``; keeps the lr that reaches the target with the least retain damage (the probe's retain log-prob
    fall) or, if none reaches it, the run that got closest to the target.

    ``lr_search="all"`` tries every lr. ``"ascending"`` tries them from the smallest and stops at the first that
    reaches the target: the same choice whenever a larger lr costs more retain damage at the same forgetting, which
    held for every method in every recorded demo run where two rates reached it (docs/demo.md), at a fraction of the
    time. Returns (the kept model, its record with ``attempts``: every lr tried, with steps, reached, the step it was
    given up at (None: not given up), final target lp and retain damage).
    """
    if lr_search not in ("all", "ascending"):
        raise ValueError(f"lr_search must be 'all' or 'ascending', got {lr_search!r}")
    rates = [spec.lr] if spec.lr is not None else sorted(spec.lr_grid or learning_rates)
    if not rates:
        raise ValueError("learning_rates is empty")
    best_model, best, attempts = None, None, []
    for lr in rates:
        model, run = unlearn_stage(
            start_model, tokenizer, spec, lr=lr, max_steps=max_steps, stop_at=stop_at, say=say, **stage_kwargs
        )
        stage_kwargs.setdefault("start_record", run["probe"]["records"][0])  # the same start for every lr
        final_lp = run["probe"]["records"][-1]["target_lp"]
        attempts.append(
            {
                "lr": lr,
                "steps": run["steps"],
                "reached": run["reached"],
                "abandoned_step": run["abandoned_step"],
                "target_lp": final_lp,
                "retain_damage": retain_damage(run),
            }
        )
        # Reaching the target first; then less retain damage; among runs that missed it, the lowest target lp.
        key = (0, retain_damage(run)) if run["reached"] else (1, final_lp)
        if best is None or key < best[0]:
            best_model, best = model, (key, run)
        else:
            del model
        if lr_search == "ascending" and run["reached"]:
            break
    run = best[1]
    run["attempts"] = attempts
    return best_model, run
