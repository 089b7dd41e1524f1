"""A comparison of unlearning methods from one fine-tuned start: the stages in order, with plots and results.json.

fine-tune the start on forget + retain          (matched: and a retain-only model, the forget-quality reference)
evaluate the start; collect the belief band
per seed, per run spec: unlearn (matched: at the lr of a grid that reaches the target), evaluate, write its probe JSON
plot; results.json after every run and at the end

A command may hand in the start and retain-only models already built (experiment.model_cache) and the results of an
interrupted comparison with the same settings (``resume``): what they hold is not computed again.
"""

from __future__ import annotations

import copy
import dataclasses
import pathlib
import shutil
from collections.abc import Sequence

from ..data import write_qa_records
from ..fused import fused_supported
from ..metrics.evaluation import EvalOptions
from ..plotting import plot_forgetting_axis, plot_probe_runs
from ..probe import ForgettingTarget, write_probe_json
from ..tofu_data import EvalSet, QASplit
from .belief_band_stage import belief_band_stage
from .evaluate_stage import evaluate_stage, forget_summary
from .finetune_stage import finetune_stage
from .matched_stage import matched_stage
from .profile import Profile
from .progress import Say, quiet
from .results import save_results
from .run_specs import RunSpec
from .settings import PROTOCOLS, ComparisonSettings
from .unlearn_stage import unlearn_stage


@dataclasses.dataclass
class ComparisonData:
    """What a comparison runs on: the forget and retain splits (fine-tuning and unlearning), the evaluation sets, and
    the name that results, tables and figures give the data."""

    name: str
    forget: QASplit
    retain: QASplit
    eval_sets: list[EvalSet]


def check_comparison(specs: Sequence[RunSpec], protocol: str) -> None:
    """Refuse, before any work, a protocol that does not exist or a run spec the protocol cannot honour."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be 'matched' or 'steps', got {protocol!r}")
    if protocol == "steps" and any(spec.lr_grid for spec in specs):
        raise ValueError("--runs: lr_grid is for the matched protocol; the steps protocol takes a fixed lr=")


def run_comparison(
    model_spec: str,
    base_model,
    tokenizer,
    data: ComparisonData,
    specs: Sequence[RunSpec],
    *,
    protocol: str,
    settings: ComparisonSettings,
    output: pathlib.Path,
    model_name: str,
    seed: int = 0,
    say: Say = quiet,
    tag: str = "demo",
    laps: Profile | None = None,
    extras: dict | None = None,
    seeds: Sequence[int] | None = None,
    start_model=None,
    retain_only_model=None,
    resume: dict | None = None,
) -> dict:
    """Fine-tune ``base_model`` on forget + retain, then unlearn with every spec from that start; returns the results.

    ``protocol="matched"``: a retain-only model (same recipe, forget set left out) is trained and evaluated first (the
    reference of forget quality); each run stops at ``settings.target_lp`` (cap ``settings.max_steps``) at an lr of
    ``settings.lr_grid`` chosen by :func:`matched_stage` (``settings.lr_search``), and is evaluated with the leak rate
    and forget quality. ``protocol="steps"``: each run takes ``settings.unlearn_steps`` steps at
    ``settings.unlearn_lr`` (or the spec's lr). Writes one probe JSON per run, the plots and results.json (after every
    run and at the end) to ``output``. ``laps``: the stage profile so far (e.g. the model's loading; results.json's
    ``profile``); ``extras``: entries added to the results as they are.

    ``seeds``: the seeds of the unlearning runs (default: ``seed``), each spec run once per seed; a seed sets the
    unlearning batches only, ``seed`` the fine-tuning and evaluation. ``start_model`` / ``retain_only_model``: built
    already (then ``base_model`` is not fine-tuned for it). ``resume``: an earlier results dict of this comparison
    (same settings, checked by the caller): its start and retain-only metrics, belief band and finished runs (by
    label and seed) are kept, not recomputed.
    """
    check_comparison(specs, protocol)
    laps = laps or Profile()
    fused = settings.fused_linear and fused_supported(base_model if start_model is None else start_model)
    laps.notes["fused_linear"] = "on" if fused else ("off" if not settings.fused_linear else "unsupported model")
    matched = protocol == "matched"
    resume = resume or {}
    results: dict = {"model": model_name, "data": data.name, "protocol": protocol, "forget_set": data.forget.name}
    results["seed"] = seed
    results["seeds"] = [seed] if seeds is None else list(seeds)
    results.update(extras or {})
    results["settings"] = dataclasses.asdict(settings)
    context = _Context(model_spec, tokenizer, data, settings, output, seed, say, tag, laps, matched)
    if "retain_only_metrics" in resume:
        results["retain_only_metrics"] = context.retain_model_metrics = resume["retain_only_metrics"]
    start_model = context.fine_tune_start(base_model, results, start_model, retain_only_model)
    if "start_metrics" in resume:
        results["start_metrics"], results["start"] = resume["start_metrics"], resume["start"]
        if "start_warnings" in resume:
            results["start_warnings"] = resume["start_warnings"]
    else:
        context.evaluate_start(start_model, results)
    band = results["belief_band"] = resume.get("belief_band") or context.belief_band(start_model, results)
    # A comparison killed in its first run keeps the start's metrics, the band and the runs an earlier call finished.
    save_results({**results, "runs": list(resume.get("runs", []))}, output)
    context.unlearn_each(start_model, band, specs, results, resume.get("runs", []))
    _plot(results, settings, output, data.name)
    laps("plot")
    results["timings_seconds"] = laps.with_total()
    results["profile"] = laps.to_dict()
    save_results(results, output)
    return results


@dataclasses.dataclass
class _Context:
    """What every stage of one comparison shares; one method per stage of :func:`run_comparison`."""

    model_spec: str
    tokenizer: object
    data: ComparisonData
    settings: ComparisonSettings
    output: pathlib.Path
    seed: int
    say: Say
    tag: str
    laps: Profile
    matched: bool
    retain_model_metrics: dict | None = None  # set once the retain-only model is evaluated (matched protocol)

    def evaluate(self, model, eval_sets) -> dict:
        """The evaluation of every model of the comparison: the leak rate with the matched protocol."""
        options = EvalOptions(
            max_new_tokens=self.settings.eval_max_new_tokens,
            leak_samples=self.settings.leak_samples if self.matched else 0,
            seed=self.seed,
        )
        return evaluate_stage(
            model, self.tokenizer, eval_sets, options, retain_model_metrics=self.retain_model_metrics, say=self.say
        )

    def fine_tune_start(self, base_model, results: dict, start_model=None, retain_only=None):
        """The start model; with the matched protocol also the retain-only model, trained from the same weights with
        the same recipe on the retain facts alone, evaluated on the forget sets (``retain_only_metrics``). Either
        model given is used as it is; metrics already in ``results`` are kept."""
        settings, data, say, tag, matched = self.settings, self.data, self.say, self.tag, self.matched
        if start_model is not None:
            if matched and retain_only is not None and self.retain_model_metrics is None:
                self._evaluate_retain_only(retain_only, results)
            if not matched or self.retain_model_metrics is not None:
                return start_model
        recipe = dict(
            epochs=settings.finetune_epochs,
            lr=settings.finetune_lr,
            batch_size=settings.finetune_batch_size,
            seed=self.seed,
            tokenizer=self.tokenizer,
            fused_linear=settings.fused_linear,
            say=say,
        )
        if start_model is None:
            facts = len(data.forget.records) + len(data.retain.records)
            say(f"[{tag}] fine-tuning on {facts} facts for {settings.finetune_epochs:g} epochs")
            retain_only_base = copy.deepcopy(base_model) if matched else None  # both start from the same weights
            start_model = finetune_stage(
                self.model_spec,
                [data.forget.path, data.retain.path],
                model=base_model,
                step_timer=self.laps.step_timer("finetune"),
                **recipe,
            )
            say(f"[{tag}] fine-tuned ({self.laps('finetune'):.0f} s)")
        else:
            retain_only_base = base_model
        if matched and self.retain_model_metrics is None:
            say(f"[{tag}] retain-only model: the same recipe on the {len(data.retain.records)} retain facts")
            scratch = self.output / "retain-only-data"
            retain_only_path = write_qa_records(data.retain.records, scratch / "retain.jsonl")
            retain_only = finetune_stage(
                self.model_spec,
                [retain_only_path],
                model=retain_only_base,
                step_timer=self.laps.step_timer("retain_only"),
                **recipe,
            )
            shutil.rmtree(scratch)
            self._evaluate_retain_only(retain_only, results)
        return start_model

    def _evaluate_retain_only(self, retain_only, results: dict) -> None:
        # Forget quality and the reference rows need only its forget-set metrics (truth ratios, Mem, leak rate).
        forget_sets = [eval_set for eval_set in self.data.eval_sets if eval_set.role == "forget"]
        results["retain_only_metrics"] = self.evaluate(retain_only, forget_sets)
        self.laps("retain_only")
        self.retain_model_metrics = results["retain_only_metrics"]

    def evaluate_start(self, start_model, results: dict) -> None:
        """The start's metrics (``start_metrics``) and its summary (``start``)."""
        say, tag = self.say, self.tag
        say(f"[{tag}] evaluating the fine-tuned start")
        start_metrics = self.evaluate(start_model, self.data.eval_sets)
        start = forget_summary(start_metrics, self.data.forget.name)
        results["start_metrics"], results["start"] = start_metrics, start
        say(
            f"[{tag}] fine-tuned: forget p {start['forget_prob']:.3f}, retain p {start['retain_prob']:.3f}, "
            f"ROUGE-L {start['forget_rouge_l']:.2f} ({self.laps('evaluate_start'):.0f} s)"
        )
        if start["forget_prob"] < 0.6:
            say(f"[{tag}] warning: the forget answers are not memorised well (p < 0.6); the effect may not show")
        if start["retain_prob"] is not None and start["retain_prob"] < 0.5 * start["forget_prob"]:
            # The retain column measures damage only to facts the start knows: a start that learned the forget set
            # but not the evaluated retain facts (retain p < half its forget p) makes it meaningless.
            warning = (
                f"the start does not know the evaluated retain facts: retain p {start['retain_prob']:.3f} < 0.5 x "
                f"forget p {start['forget_prob']:.3f}; retain p, model utility and Agg do not measure retain damage"
            )
            results["start_warnings"] = [warning]
            say(f"[{tag}] warning: {warning}")

    def belief_band(self, start_model, results: dict) -> list[dict]:
        """The start model's band of other high-likelihood answers (``belief_band``)."""
        settings, forget, say, tag = self.settings, self.data.forget, self.say, self.tag
        say(f"[{tag}] belief band: {settings.band_beams}-beam search on {len(forget.records)} forget questions")
        band = belief_band_stage(
            start_model,
            self.tokenizer,
            forget.records,
            beams=settings.band_beams,
            max_new_tokens=settings.band_max_new_tokens,
        )
        results["belief_band"] = band
        say(f"[{tag}] belief band: {sum(len(b['beliefs']) for b in band)} answers ({self.laps('belief_band'):.0f} s)")
        return band

    def unlearn_each(
        self, start_model, band: list[dict], specs: Sequence[RunSpec], results: dict, finished: Sequence[dict] = ()
    ) -> None:
        """Every run spec from the start model, once per seed of ``results["seeds"]``: unlearn, evaluate, write its
        probe JSON and results.json. A run of ``finished`` with the same label and seed is kept as it is."""
        settings, say, tag, matched = self.settings, self.say, self.tag, self.matched
        stage = dict(
            forget=self.data.forget,
            retain=self.data.retain,
            band=band,
            settings=dataclasses.replace(settings.unlearn, seed=self.seed),
            model_spec=self.model_spec,
            names=(results["model"], self.data.name),
            fused_linear=settings.fused_linear,
            say=say,
        )
        results["runs"] = []
        done = {(run["label"], run.get("seed", self.seed)): run for run in finished}
        for run in finished:  # every run starts from the same model with the same probe sets
            stage.setdefault("start_record", run["probe"]["records"][0])
        seeds = results["seeds"]
        target = ForgettingTarget(settings.target_lp, give_up=settings.give_up) if matched else None
        if matched:
            results["target_lp"] = settings.target_lp
            say(
                f"[{tag}] matched forgetting: each run stops at target lp <= {settings.target_lp:g} (cap "
                f"{settings.max_steps} steps), lr from {', '.join(f'{lr:g}' for lr in settings.lr_grid)} unless a "
                "run sets its own"
            )
        for seed, spec in ((seed, spec) for seed in seeds for spec in specs):
            if (spec.label, seed) in done:
                say(f"[{tag}] {spec.label}, seed {seed}: finished in an earlier run of this comparison, kept")
                results["runs"].append(done[(spec.label, seed)])
                continue
            stage["settings"] = dataclasses.replace(settings.unlearn, seed=seed)  # a seed: the unlearning batches
            say(f"[{tag}] unlearning with {spec.label}" + (f", seed {seed}" if len(seeds) > 1 else ""))
            name = spec.label + (f", seed {seed}" if len(seeds) > 1 else "")  # the profile's stage names
            stage["step_timer"] = self.laps.step_timer(f"unlearn {name}")
            if matched:
                unlearned, run = matched_stage(
                    start_model,
                    self.tokenizer,
                    spec,
                    learning_rates=settings.lr_grid,
                    lr_search=settings.lr_search,
                    stop_at=target,
                    max_steps=settings.max_steps,
                    **stage,
                )
            else:
                lr = spec.lr or settings.unlearn_lr
                unlearned, run = unlearn_stage(
                    start_model, self.tokenizer, spec, lr=lr, max_steps=settings.unlearn_steps, **stage
                )
            run["seed"] = seed
            unlearn_seconds = self.laps(f"unlearn {name}")
            run["metrics"] = self.evaluate(unlearned, self.data.eval_sets)
            run["end"] = forget_summary(run["metrics"], self.data.forget.name)
            del unlearned
            # Every later run starts from the same model with the same probe sets: its step-0 record is this one.
            stage.setdefault("start_record", run["probe"]["records"][0])
            suffix = f"_seed{seed}" if len(seeds) > 1 else ""
            write_probe_json(run["probe"], self.output / f"probe_{spec.slug}{suffix}.json")
            results["runs"].append(run)
            # After every run (a long comparison can be cut short), with the finished runs not listed again yet.
            save_results({**results, "runs": self._with_unlisted(results["runs"], done)}, self.output)
            start, end = results["start"], run["end"]
            say(
                f"[{tag}]   forget p {start['forget_prob']:.3f} -> {end['forget_prob']:.3f}, retain p "
                f"{end['retain_prob']:.3f} ({unlearn_seconds + self.laps(f'evaluate {name}'):.0f} s)"
            )
        # Finished runs this call did not ask for stay in results.json (a narrower --runs / --seeds loses nothing).
        results["runs"] = self._with_unlisted(results["runs"], done)

    def _with_unlisted(self, runs: list[dict], done: dict) -> list[dict]:
        """``runs`` and after them every run of ``done`` (finished by an earlier call, by (label, seed)) not among
        them."""
        listed = {(run["label"], run.get("seed", self.seed)) for run in runs}
        return runs + [run for key, run in done.items() if key not in listed]


def _plot(results: dict, settings: ComparisonSettings, output: pathlib.Path, data_name: str) -> None:
    model_name = results["model"]
    probes = [run["probe"] for run in results["runs"]]
    if results["protocol"] == "matched":
        title = f"{model_name}, {data_name}: at matched forgetting (target lp {settings.target_lp:g})"
        plot_forgetting_axis(results, output / "forgetting.png", title=title)
        plot_probe_runs(probes, output / "squeeze.png", title=f"Squeezing probe per step: {model_name}, {data_name}")
    else:
        title = (
            f"Squeezing probe: {model_name}, {data_name}, {settings.unlearn_steps} steps, lr {settings.unlearn_lr:g}"
        )
        plot_probe_runs(probes, output / "squeeze.png", title=title)
