"""The experiment pipeline: the stages that the demo, the TOFU run and any comparison of methods share.

    model = finetune_stage(...)                 fine-tune on QA files (the start: forget + retain; the retain-only
                                                reference of forget quality: retain alone, same recipe)
    band = belief_band_stage(start, ...)        the start model's own high-likelihood answers other than the target
    model, run = unlearn_stage(start, spec, ..) one method from the start model, with the squeezing probe; stops at a
                                                forgetting target when one is given (matched forgetting)
    model, run = matched_stage(start, spec, ..) unlearn_stage over a small lr grid; keeps the lr that reaches the
                                                target with the least retain damage
    metrics = evaluate_stage(model, ...)        TOFU's and the paper's metrics (bs_unlearn.metrics.evaluate)
    results = run_comparison(...)               all of the above for a list of run specs, with plots and results.json
    steps_table / matched_table                 the tables of the results

Every stage takes plain values (records, paths, models) and returns plain values (dicts that go to results.json),
so a command is a short sequence of calls. Progress goes through ``say`` (one line per stage or probe).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import pathlib
import shutil
import time
from collections.abc import Callable, Sequence

from .config import METHODS, BeliefConfig, FinetuneConfig, ObjectiveConfig, UnlearnConfig
from .outputs import write_json_atomic


def parse_lr_grid(text: str) -> tuple[float, ...]:
    """'5e-4/1.5e-3' -> (5e-4, 1.5e-3): a run's own learning-rate grid (``/`` separates, since ``,`` separates
    options)."""
    rates = tuple(float(item) for item in text.split("/"))
    if not all(rate > 0 and math.isfinite(rate) for rate in rates):
        raise ValueError(f"lr_grid rates must be finite and > 0, got {text!r}")
    return rates


# The options a run spec may set ("bs-t:lam=0.5,lr=1e-4"): ObjectiveConfig fields, the BS-S sample count, the lr
# (fixed) or the run's own lr grid for the matched protocol (in place of the comparison's).
RUN_OPTION_TYPES = {
    "lam": float,
    "top_k": int,
    "lam_s": float,
    "bs_s_base": str,
    "num_beliefs": int,
    "lr": float,
    "lr_grid": parse_lr_grid,
}
METHOD_NAMES = {"graddiff": "GA (+retain NLL)", "ga": "GA", "bs-t": "BS-T", "bs-s": "BS-S", "npo": "NPO"}

Say = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


# --------------------------------------------------------------------------------------------------------------
# Run specifications
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One unlearning run: a method and its options (``lr`` among them, if the spec fixes it)."""

    method: str
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def lr(self) -> float | None:
        return self.options.get("lr")

    @property
    def lr_grid(self) -> tuple[float, ...] | None:
        return self.options.get("lr_grid")

    @property
    def objective_options(self) -> dict:
        return {k: v for k, v in self.options.items() if k not in ("lr", "lr_grid", "num_beliefs")}

    @property
    def label(self) -> str:
        label = METHOD_NAMES.get(self.method, self.method)
        lam = self.options.get("lam", ObjectiveConfig.lam)
        shown = {"lam", "lam_s", "bs_s_base"}
        if self.method == "bs-t":
            label += f" λ={lam:g}"
        elif self.method == "bs-s":
            base = self.options.get("bs_s_base", ObjectiveConfig.bs_s_base).replace("-", "_")
            base_name = {"ga": "GA", "bs_t": f"BS-T λ={lam:g}", "npo": "NPO"}.get(base, base)
            label += f" λs={self.options.get('lam_s', ObjectiveConfig.lam_s):g} ({base_name} base)"
        else:
            shown = set()
        extras = [f"{k}={format_option(v)}" for k, v in self.options.items() if k not in shown]
        return label + (f" ({', '.join(extras)})" if extras else "")

    @property
    def slug(self) -> str:
        """A file-name-safe form of the label (``probe_<slug>.json``)."""
        text = self.label.lower().replace(" ", "_").replace("λ", "lam").replace("+", "").replace("(", "")
        return "".join(c for c in text.replace(")", "").replace(",", "") if c.isalnum() or c in "_.=-")


def format_option(value) -> str:
    """A run option as a spec writes it: an lr grid as ``0.0005/0.0015``, not as a tuple."""
    return "/".join(f"{rate:g}" for rate in value) if isinstance(value, tuple) else str(value)


def parse_run(spec: str) -> RunSpec:
    """'bs-t:lam=0.5,top_k=10' -> RunSpec("bs-t", {"lam": 0.5, "top_k": 10})."""
    method, _, options = spec.partition(":")
    if method not in METHODS:
        raise ValueError(f"--runs: unknown method {method!r} in {spec!r} (choose from {', '.join(sorted(METHODS))})")
    parsed = {}
    for item in filter(None, options.split(",")):
        key, equals, value = item.partition("=")
        if not equals or key not in RUN_OPTION_TYPES:
            raise ValueError(f"--runs: bad option {item!r} in {spec!r} (options: {', '.join(RUN_OPTION_TYPES)})")
        try:
            parsed[key] = RUN_OPTION_TYPES[key](value)
        except ValueError as error:
            raise ValueError(f"--runs: bad value in {item!r}: {error}") from error
    if "lr" in parsed and "lr_grid" in parsed:
        raise ValueError(f"--runs: {spec!r} sets both lr and lr_grid; give one (a fixed lr or the run's grid)")
    return RunSpec(method, parsed)


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class QASplit:
    """A QA split: its records and a JSON Lines file holding exactly them (what the trainers read)."""

    name: str
    records: list[dict]
    path: pathlib.Path


def tofu_eval_files(split: str) -> list[tuple[str, str, str]]:
    """(set name, file name, role) of the TOFU evaluation sets of one forget split: the split (role forget),
    retain_perturbed (retain), real_authors_perturbed and world_facts_perturbed (options)."""
    return [
        (split, f"{split}.jsonl", "forget"),
        ("retain", "retain_perturbed.jsonl", "retain"),
        ("real_authors", "real_authors_perturbed.jsonl", "options"),
        ("world_facts", "world_facts_perturbed.jsonl", "options"),
    ]


def tofu_eval_sets(tofu_dir: str | pathlib.Path, split: str, *, max_examples: int | None = None, seed: int = 0):
    """The TOFU evaluation sets of one forget split (:func:`tofu_eval_files`): the forget split whole, seeded subsets
    of ``max_examples`` of the others."""
    from .data import read_qa_records
    from .metrics import EvalSet

    tofu = pathlib.Path(tofu_dir).expanduser()
    if not tofu.is_dir():
        raise FileNotFoundError(f"TOFU folder not found: {tofu}")
    return [
        EvalSet(
            name, read_qa_records(tofu / file, max_examples=None if role == "forget" else max_examples, seed=seed), role
        )
        for name, file, role in tofu_eval_files(split)
    ]


# --------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------


def build_quick_model(directory: pathlib.Path, records: Sequence[dict]) -> str:
    """Save a tiny random Llama + word-level tokenizer for ``records`` in ``directory``; returns its path."""
    from .tiny_model import build_tiny_model, build_tiny_tokenizer

    texts = []
    for record in records:
        texts += [record["question"], record["answer"]]
        texts += [record.get("paraphrased_answer") or "", record.get("paraphrased_question") or ""]
        texts += list(record.get("perturbed_answer") or [])
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_model(tokenizer, hidden_size=32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


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
    say: Say = _quiet,
):
    """Fine-tune on the QA files (answer NLL); returns the trained model."""
    from .trainer import ProgressLines, finetune

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


def belief_band_stage(model, tokenizer, forget: Sequence[dict], *, beams: int, max_new_tokens: int) -> list[dict]:
    """The start model's beam-search answers other than the target, per forget record (the squeezing probe's band)."""
    from .probe import collect_belief_band

    return collect_belief_band(
        model, tokenizer, forget, num_beams=beams, max_new_tokens=max_new_tokens, no_repeat_ngram_size=3
    )


def evaluate_stage(
    model,
    tokenizer,
    eval_sets,
    *,
    max_new_tokens: int,
    leak_samples: int = 0,
    retain_model_metrics: dict | None = None,
    seed: int = 0,
    say: Say = _quiet,
) -> dict:
    """TOFU and the paper's metrics of ``model`` on ``eval_sets`` (bs_unlearn.metrics.evaluate)."""
    from .metrics import evaluate

    started = time.perf_counter()
    metrics = evaluate(
        model,
        tokenizer,
        eval_sets,
        retain_model_metrics=retain_model_metrics,
        max_new_tokens=max_new_tokens,
        leak_samples=leak_samples,
        seed=seed,
        progress=lambda message: say(f"  eval {message}"),
    )
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    say(f"  evaluated in {metrics['seconds']:.0f} s")
    return metrics


@dataclasses.dataclass
class UnlearnSettings:
    """What every run of one experiment shares: batch (forget examples, each with a retain partner), probe, BS-S
    sampling sizes, the seed."""

    batch_size: int = 4
    probe_every: int = 5
    probe_retain_records: int = 8
    top_k: int = 20
    bs_s_max_new_tokens: int = 24  # the demo's answers are at most 22 tokens with the end-of-turn token
    seed: int = 0


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
    say: Say = _quiet,
) -> tuple[object, dict]:
    """Unlearn ``forget`` from a copy of ``start_model`` with one method; returns (the model, the run record).

    ``stop_at`` (a probe.ForgettingTarget) stops at the first step whose forget target log-prob is at or below the
    target; ``max_steps`` is the cap. The run record holds the probe's records, where it stopped, and the seconds.
    """
    from .probe import SqueezeProbe
    from .trainer import ProgressLines, unlearn

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
        progress=False,
        logging_steps=10**6,
        objective=ObjectiveConfig(method=spec.method, **spec.objective_options),
        beliefs=BeliefConfig(**beliefs),
    )
    callbacks = [probe, ProgressLines(say, prefix="    unlearn ")]
    result = unlearn(config, callbacks=callbacks, model=copy.deepcopy(start_model), tokenizer=tokenizer)
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
        + ("" if probe.abandoned_step is None else " (given up at half the cap: projected short of the target)")
        + f" ({record['seconds']:.0f} s)"
    )
    return result.model, record


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
    say: Say = _quiet,
    **stage_kwargs,
) -> tuple[object, dict]:
    """``unlearn_stage`` at the learning rates of a grid (``spec.lr`` alone when the spec fixes one; the spec's own
    ``lr_grid`` in place of ``learning_rates`` when it has one), each stopping
    at ``stop_at``; keeps the lr that reaches the target with the least retain damage (the probe's retain log-prob
    fall) or, if none reaches it, the run that got closest to the target.

    ``lr_search="all"`` tries every lr. ``"ascending"`` tries them from the smallest and stops at the first that
    reaches the target: the same choice whenever a larger lr costs more retain damage at the same forgetting, which
    held for every method in every recorded demo run where two rates reached it (docs/demo.md), at a fraction of the
    time. Returns (the kept model, its record with ``attempts``: every lr tried, with steps, reached, final target
    lp and retain damage).
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


@dataclasses.dataclass
class ComparisonSettings:
    """Sizes, steps and the matched-forgetting protocol of a comparison of methods (the defaults: the demo's, which
    fit the 15-minute CPU budget with SmolLM2-135M)."""

    finetune_epochs: float = 4.0
    finetune_lr: float = 3e-4
    finetune_batch_size: int = 8
    unlearn_steps: int = 12  # the steps protocol's steps; the matched protocol's cap is max_steps
    unlearn_lr: float = 5e-5  # the steps protocol's lr
    unlearn: UnlearnSettings = dataclasses.field(default_factory=UnlearnSettings)  # batch, probe, BS-S sizes
    band_beams: int = 3
    band_max_new_tokens: int = 32
    eval_max_new_tokens: int = 24  # the demo's answers are at most 22 tokens with the end-of-turn token
    # matched forgetting
    target_lp: float = -3.0
    max_steps: int = 12  # the equal-steps demo's step count
    lr_grid: tuple[float, ...] = (1e-4, 3e-4)
    lr_search: str = "ascending"  # experiment.matched_stage: "all" tries every lr of the grid
    give_up: bool = True  # probe.ForgettingTarget.give_up: stop at half the cap a run projected far short
    leak_samples: int = 2


def run_comparison(
    model_spec: str,
    base_model,
    tokenizer,
    *,
    forget: QASplit,
    retain: QASplit,
    eval_sets,
    specs: Sequence[RunSpec],
    protocol: str,
    settings: ComparisonSettings,
    output: pathlib.Path,
    names: tuple[str, str],
    seed: int = 0,
    say: Say = _quiet,
    tag: str = "demo",
) -> dict:
    """Fine-tune ``base_model`` on forget + retain, then unlearn with every spec from that start; returns the results.

    ``protocol="matched"``: a retain-only model (same recipe, forget set left out) is trained and evaluated first (the
    reference of forget quality); each run stops at ``settings.target_lp`` (cap ``settings.max_steps``) at an lr of
    ``settings.lr_grid`` chosen by :func:`matched_stage` (``settings.lr_search``), and is evaluated with the leak rate
    and forget quality. ``protocol="steps"``: each run takes ``settings.unlearn_steps`` steps at
    ``settings.unlearn_lr`` (or the spec's lr). Writes one probe JSON per run, the plots and results.json to ``output``.
    """
    from .data import write_qa_records
    from .plotting import plot_forgetting_axis, plot_probe_runs
    from .probe import ForgettingTarget, write_probe_json

    if protocol not in ("matched", "steps"):
        raise ValueError(f"protocol must be 'matched' or 'steps', got {protocol!r}")
    if protocol == "steps" and any(spec.lr_grid for spec in specs):
        raise ValueError("--runs: lr_grid is for the matched protocol; the steps protocol takes a fixed lr=")
    model_name = names[0]
    forget_name = forget.name
    started = time.perf_counter()
    timings: dict[str, float] = {}
    lap_start = [started]

    def lap(name: str) -> float:
        now = time.perf_counter()
        timings[name] = round(now - lap_start[0], 1)
        lap_start[0] = now
        return timings[name]

    recipe = dict(
        epochs=settings.finetune_epochs, lr=settings.finetune_lr, batch_size=settings.finetune_batch_size, seed=seed
    )
    matched = protocol == "matched"
    facts = len(forget.records) + len(retain.records)
    say(f"[{tag}] fine-tuning on {facts} facts for {settings.finetune_epochs:g} epochs")
    retain_only_base = copy.deepcopy(base_model) if matched else None  # both models start from the same weights
    start_model = finetune_stage(
        model_spec, [forget.path, retain.path], model=base_model, tokenizer=tokenizer, say=say, **recipe
    )
    say(f"[{tag}] fine-tuned ({lap('finetune'):.0f} s)")
    evaluation = dict(max_new_tokens=settings.eval_max_new_tokens, seed=seed, say=say)
    results: dict = {"model": model_name, "data": names[1], "protocol": protocol, "forget_set": forget_name}
    results["settings"] = dataclasses.asdict(settings)
    if matched:
        evaluation["leak_samples"] = settings.leak_samples
        say(f"[{tag}] retain-only model: the same recipe on the {len(retain.records)} retain facts")
        scratch = output / "retain-only-data"
        retain_only_path = write_qa_records(retain.records, scratch / "retain.jsonl")
        retain_only = finetune_stage(
            model_spec, [retain_only_path], model=retain_only_base, tokenizer=tokenizer, say=say, **recipe
        )
        shutil.rmtree(scratch)
        # Forget quality and the reference rows need only its forget-set metrics (truth ratios, Mem, leak rate).
        forget_sets = [eval_set for eval_set in eval_sets if eval_set.role == "forget"]
        retain_metrics = evaluate_stage(retain_only, tokenizer, forget_sets, **evaluation)
        results["retain_only_metrics"] = retain_metrics
        del retain_only
        lap("retain_only")
        evaluation["retain_model_metrics"] = retain_metrics
    say(f"[{tag}] evaluating the fine-tuned start")
    start_metrics = evaluate_stage(start_model, tokenizer, eval_sets, **evaluation)
    start = forget_summary(start_metrics, forget_name)
    results["start_metrics"], results["start"] = start_metrics, start
    say(
        f"[{tag}] fine-tuned: forget p {start['forget_prob']:.3f}, retain p {start['retain_prob']:.3f}, "
        f"ROUGE-L {start['forget_rouge_l']:.2f} ({lap('evaluate_start'):.0f} s)"
    )
    if start["forget_prob"] < 0.6:
        say(f"[{tag}] warning: the forget answers are not memorised well (p < 0.6); the effect may not show")

    say(f"[{tag}] belief band: {settings.band_beams}-beam search on {len(forget.records)} forget questions")
    band = belief_band_stage(
        start_model, tokenizer, forget.records, beams=settings.band_beams, max_new_tokens=settings.band_max_new_tokens
    )
    results["belief_band"] = band
    say(f"[{tag}] belief band: {sum(len(b['beliefs']) for b in band)} answers ({lap('belief_band'):.0f} s)")

    stage = dict(
        forget=forget,
        retain=retain,
        band=band,
        settings=dataclasses.replace(settings.unlearn, seed=seed),
        model_spec=model_spec,
        names=names,
        say=say,
    )
    results["runs"] = []
    target = ForgettingTarget(settings.target_lp, give_up=settings.give_up) if matched else None
    if matched:
        results["target_lp"] = settings.target_lp
        say(
            f"[{tag}] matched forgetting: each run stops at target lp <= {settings.target_lp:g} (cap "
            f"{settings.max_steps} steps), lr from {', '.join(f'{lr:g}' for lr in settings.lr_grid)} unless a run "
            "sets its own"
        )
    for spec in specs:
        say(f"[{tag}] unlearning with {spec.label}")
        if matched:
            unlearned, run = matched_stage(
                start_model,
                tokenizer,
                spec,
                learning_rates=settings.lr_grid,
                lr_search=settings.lr_search,
                stop_at=target,
                max_steps=settings.max_steps,
                **stage,
            )
        else:
            unlearned, run = unlearn_stage(
                start_model,
                tokenizer,
                spec,
                lr=spec.lr or settings.unlearn_lr,
                max_steps=settings.unlearn_steps,
                **stage,
            )
        run["metrics"] = evaluate_stage(unlearned, tokenizer, eval_sets, **evaluation)
        run["end"] = forget_summary(run["metrics"], forget_name)
        del unlearned
        # Every later run starts from the same model with the same probe sets: its step-0 record is this one.
        stage.setdefault("start_record", run["probe"]["records"][0])
        write_probe_json(run["probe"], output / f"probe_{spec.slug}.json")
        results["runs"].append(run)
        write_json_atomic(results, output / "results.json")  # after every run: a long comparison can be cut short
        end = run["end"]
        say(
            f"[{tag}]   forget p {start['forget_prob']:.3f} -> {end['forget_prob']:.3f}, retain p "
            f"{end['retain_prob']:.3f} ({lap(f'unlearn {spec.label}'):.0f} s)"
        )

    probes = [run["probe"] for run in results["runs"]]
    if matched:
        title = f"{model_name}, {names[1]}: at matched forgetting (target lp {settings.target_lp:g})"
        plot_forgetting_axis(results, output / "forgetting.png", title=title)
        plot_probe_runs(probes, output / "squeeze.png", title=f"Squeezing probe per step: {model_name}, {names[1]}")
    else:
        plot_probe_runs(
            probes,
            output / "squeeze.png",
            title=f"Squeezing probe: {model_name}, {names[1]}, {settings.unlearn_steps} steps, "
            f"lr {settings.unlearn_lr:g}",
        )
    lap("plot")
    timings["total"] = round(time.perf_counter() - started, 1)
    results["timings_seconds"] = timings
    write_json_atomic(results, output / "results.json")
    return results


# --------------------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------------------


def format_cell(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def signed_cell(value) -> str:
    return "-" if value is None else f"{value:+.2f}"


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]], *, markdown: bool, wrap_last: int = 0) -> str:
    """A Markdown table, or an aligned plain-text one (the last column cut to ``wrap_last`` characters if > 0)."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines)
    if wrap_last:
        rows = [
            list(row[:-1]) + [row[-1] if len(row[-1]) <= wrap_last else row[-1][: wrap_last - 3] + "..."]
            for row in rows
        ]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def probe_change(run: dict, key: str) -> float | None:
    """Last minus first recorded value of a probe quantity over a run."""
    from .probe import band_change

    return band_change(run["probe"], key)


def forget_summary(metrics: dict, forget_name: str) -> dict:
    """The demo-table quantities of one evaluation: forget / paraphrase / retain probability, ROUGE-L, an answer."""
    forget = metrics["sets"][forget_name]
    retain = next((s for s in metrics["sets"].values() if s["role"] == "retain"), {})
    return {
        "forget_prob": forget["prob"],
        "paraphrase_prob": forget.get("paraphrase_prob"),
        "retain_prob": retain.get("prob"),
        "forget_rouge_l": forget.get("rouge_l"),
        "forget_answers": forget["per_example"].get("generation", [""]),
    }


def steps_table(results: dict, *, markdown: bool) -> str:
    """The equal-steps table (rows: the fine-tuned start, then each run; changes over the run)."""
    header = ["model", "forget p", "paraphrase p", "band Δlp", "target Δlp", "p(label)", "alt mass", "retain p"]
    header += ["forget ROUGE-L", "sample answer"]
    start = results["start"]
    start_probe = results["runs"][0]["probe"]["records"][0] if results["runs"] else {}

    def cells(summary: dict, probe_record: dict, changes: tuple[str, str]) -> list[str]:
        return [
            format_cell(summary["forget_prob"]),
            format_cell(summary["paraphrase_prob"]),
            *changes,
            format_cell(probe_record.get("target_p_label")),
            format_cell(probe_record.get("target_alt_mass")),
            format_cell(summary["retain_prob"]),
            format_cell(summary["forget_rouge_l"], 2),
            summary["forget_answers"][0],
        ]

    rows = [["fine-tuned (start)", *cells(start, start_probe, ("0", "0"))]]
    for run in results["runs"]:
        changes = (signed_cell(probe_change(run, "belief_lp")), signed_cell(probe_change(run, "target_lp")))
        rows.append([run["label"], *cells(run["end"], run["probe"]["records"][-1], changes)])
    return render_table(header, rows, markdown=markdown, wrap_last=60)


def matched_table(results: dict, *, markdown: bool) -> str:
    """The matched-forgetting table (every run at the step where it reached the target, or at its cap)."""
    header = ["model", "lr", "steps", "target lp", "band Δlp", "paraphrase p", "leak rate", "retain p"]
    header += ["Mem", "Util*", "Agg*", "forget quality"]

    def metric_cells(metrics: dict) -> list[str]:
        forget = metrics["sets"][results["forget_set"]]
        paper = forget.get("paper", {})
        quality = paper.get("forget_quality")  # open-unlearning's: the KS test on the paper truth ratios
        retain = next((s for s in metrics["sets"].values() if s["role"] == "retain"), {})
        return [
            format_cell(forget.get("paraphrase_prob")),
            format_cell(paper.get("leak_rate"), 2),
            format_cell(retain.get("prob")),
            format_cell(paper.get("mem")),
            format_cell(paper.get("util")),
            format_cell(paper.get("agg")),
            "-" if quality is None else f"{quality:.2g}",
        ]

    first = results["runs"][0]["probe"]["records"][0] if results["runs"] else {}
    rows = [["fine-tuned (start)", "-", "0", format_cell(first.get("target_lp"), 2), "0"]]
    rows[0] += metric_cells(results["start_metrics"])
    if results.get("retain_only_metrics"):
        rows.append(["retain-only (never saw the forget set)", "-", "-", "-", "-"])
        rows[-1] += metric_cells(results["retain_only_metrics"])
    for run in results["runs"]:
        last = run["probe"]["records"][-1]
        steps = f"{run['steps']}" + ("" if run["reached"] else " (cap; not reached)")
        rows.append([run["label"], f"{run['lr']:g}", steps, format_cell(last["target_lp"], 2)])
        rows[-1] += [signed_cell(probe_change(run, "belief_lp")), *metric_cells(run["metrics"])]
    return render_table(header, rows, markdown=markdown)
