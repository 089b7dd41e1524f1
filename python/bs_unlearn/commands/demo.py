"""``bs-unlearn demo``: see the squeezing effect, and what BS-T / BS-S do about it, in minutes on a CPU.

1. Fine-tune the model (default SmolLM2-135M-Instruct) on the embedded demo data (12 invented people, 3 facts each,
   TOFU format) until it has memorised the answers.
2. Collect the belief band: the fine-tuned model's beam-search answers to the forget questions other than the target.
3. From that same starting point, unlearn the forget third (4 people) with each method (GradDiff = GA + retain NLL,
   BS-T at several lambdas, BS-S), same learning rate and steps, the squeezing probe recording every few steps.
4. Print one table (forget / paraphrase / retain probability, belief-band log-prob change, token-level p(label) and
   rival mass, a sample answer before/after) and write the plot, the JSONs and a Markdown copy of the table.

``--quick`` swaps in a tiny random model and a few steps: every stage runs, in seconds, and the numbers mean nothing.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import importlib.resources
import json
import pathlib
import shutil
import time

from ._common import check_output_dir, is_main_process

# GA (with the same retain NLL term as the others), BS-T at lambda = 1 (at the authors' 0.2 BS-T behaves like GA while
# the memorised label dominates the top-k belief, shared/FINDINGS.md; add "bs-t:lam=0.2" to --runs to see it), BS-S.
DEFAULT_RUNS = ("graddiff", "bs-t:lam=1.0", "bs-s")
QUICK_RUNS = DEFAULT_RUNS
RUN_OPTION_TYPES = {"lam": float, "top_k": int, "lam_s": float, "bs_s_base": str, "num_beliefs": int, "lr": float}


@dataclasses.dataclass
class DemoSettings:
    """Sizes and steps (the defaults fit the 15-minute CPU budget with SmolLM2-135M; --quick shrinks everything)."""

    finetune_epochs: float = 4.0
    finetune_lr: float = 3e-4
    finetune_batch_size: int = 8
    unlearn_steps: int = 12
    unlearn_lr: float = 5e-5
    unlearn_batch_size: int = 4
    probe_every: int = 4
    probe_retain_records: int = 8
    band_beams: int = 3
    band_max_new_tokens: int = 32
    bs_s_max_new_tokens: int = 40
    eval_max_new_tokens: int = 40
    top_k: int = 20


QUICK_SETTINGS = DemoSettings(
    finetune_epochs=2.0,
    finetune_lr=5e-3,
    unlearn_steps=3,
    unlearn_lr=1e-3,
    probe_every=1,
    band_beams=2,
    band_max_new_tokens=6,
    bs_s_max_new_tokens=6,
    eval_max_new_tokens=6,
    top_k=5,
)


def demo_data_path(name: str) -> pathlib.Path:
    """Path of a file of the embedded demo data set (forget.jsonl, retain.jsonl)."""
    path = importlib.resources.files("bs_unlearn") / "demo_data" / name
    return pathlib.Path(str(path))


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def parse_run(spec: str) -> tuple[str, dict]:
    """'bs-t:lam=0.5,top_k=10' -> ("bs-t", {"lam": 0.5, "top_k": 10})."""
    from ..objectives import METHODS

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
    return method, parsed


def run_label(method: str, options: dict) -> str:
    names = {"graddiff": "GA (+retain NLL)", "ga": "GA", "bs-t": "BS-T", "bs-s": "BS-S", "npo": "NPO"}
    label = names.get(method, method)
    if method == "bs-t":
        label += f" λ={options.get('lam', 0.2):g}"
    if method == "bs-s":
        label += f" λs={options.get('lam_s', 0.5):g}"
    extras = [f"{k}={v}" for k, v in options.items() if k not in ("lam", "lam_s") or method not in ("bs-t", "bs-s")]
    return label + (f" ({', '.join(extras)})" if extras else "")


def _build_quick_model(directory: pathlib.Path, records: list[dict]) -> str:
    """Save a tiny random Llama + word-level tokenizer for the demo data in ``directory``; returns its path."""
    from ..tiny_model import build_tiny_model, build_tiny_tokenizer

    texts = []
    for record in records:
        texts += [record["question"], record["answer"], record["paraphrased_answer"], *record["perturbed_answer"]]
    tokenizer = build_tiny_tokenizer(texts)
    model = build_tiny_model(tokenizer, hidden_size=32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _probabilities(model, tokenizer, records: list[dict], key: str, settings: DemoSettings) -> float:
    import numpy as np

    from ..metrics import score_answers

    scores = score_answers(model, tokenizer, [r["question"] for r in records], [r[key] for r in records])
    return float(np.exp(scores).mean())


def _snapshot(model, tokenizer, forget: list[dict], retain: list[dict], settings: DemoSettings) -> dict:
    """Forget / paraphrase / retain probability, ROUGE-L of greedy answers on the forget set, the sample answer."""
    import numpy as np

    from ..metrics import generate_answers, rouge_l_recall

    answers = [
        texts[0]
        for texts in generate_answers(
            model, tokenizer, [r["question"] for r in forget], max_new_tokens=settings.eval_max_new_tokens
        )
    ]
    return {
        "forget_prob": _probabilities(model, tokenizer, forget, "answer", settings),
        "paraphrase_prob": _probabilities(model, tokenizer, forget, "paraphrased_answer", settings),
        "retain_prob": _probabilities(model, tokenizer, retain, "answer", settings),
        "forget_rouge_l": float(np.mean([rouge_l_recall(a, r["answer"]) for a, r in zip(answers, forget)])),
        "forget_answers": answers,
    }


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _signed(value) -> str:
    return "-" if value is None else f"{value:+.2f}"


def results_table(results: dict, *, markdown: bool) -> str:
    """The demo's one table (rows: the fine-tuned start, then each run)."""
    header = [
        "model",
        "forget p",
        "paraphrase p",
        "band Δlp",
        "target Δlp",
        "p(label)",
        "alt mass",
        "retain p",
        "forget ROUGE-L",
        "sample answer",
    ]
    start = results["start"]
    start_probe = results["runs"][0]["probe"]["records"][0] if results["runs"] else {}
    rows = [
        [
            "fine-tuned (start)",
            _fmt(start["forget_prob"]),
            _fmt(start["paraphrase_prob"]),
            "0",
            "0",
            _fmt(start_probe.get("target_p_label")),
            _fmt(start_probe.get("target_alt_mass")),
            _fmt(start["retain_prob"]),
            _fmt(start["forget_rouge_l"], 2),
            start["forget_answers"][0],
        ]
    ]
    for run in results["runs"]:
        end = run["end"]
        last = run["probe"]["records"][-1]
        rows.append(
            [
                run["label"],
                _fmt(end["forget_prob"]),
                _fmt(end["paraphrase_prob"]),
                _signed(run["belief_lp_change"]),
                _signed(run["target_lp_change"]),
                _fmt(last.get("target_p_label")),
                _fmt(last.get("target_alt_mass")),
                _fmt(end["retain_prob"]),
                _fmt(end["forget_rouge_l"], 2),
                end["forget_answers"][0],
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
        return "\n".join(lines)
    shown = [row[:-1] + [row[-1] if len(row[-1]) <= 60 else row[-1][:57] + "..."] for row in rows]
    widths = [max(len(header[i]), *(len(r[i]) for r in shown)) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in shown]
    return "\n".join(lines)


def run_demo(
    *,
    model: str = "default",
    output: str | pathlib.Path = "bs-unlearn-demo",
    overwrite: bool = False,
    quick: bool = False,
    runs: list[str] | None = None,
    settings: DemoSettings | None = None,
    seed: int = 0,
    say=None,
) -> dict:
    """The whole demo (see the module docstring); returns the results dict that is also written to results.json."""
    from ..models import load_model_and_tokenizer
    from ..plotting import plot_probe_runs
    from ..probe import SqueezeProbe, band_change, collect_belief_band, write_probe_json
    from ..trainer import FinetuneConfig, UnlearnConfig, finetune, unlearn

    say = say or (lambda message: print(message, flush=True))
    settings = settings or (QUICK_SETTINGS if quick else DemoSettings())
    run_specs = [parse_run(spec) for spec in (runs or (QUICK_RUNS if quick else DEFAULT_RUNS))]
    output = check_output_dir(output, overwrite=overwrite)
    if output.exists():  # --overwrite: start from an empty folder so no file of an earlier demo is left behind
        shutil.rmtree(output)
    output.mkdir(parents=True)
    forget_path, retain_path = demo_data_path("forget.jsonl"), demo_data_path("retain.jsonl")
    forget, retain = read_jsonl(forget_path), read_jsonl(retain_path)
    timings: dict[str, float] = {}
    started = time.perf_counter()

    def lap(name: str, since: float) -> None:
        timings[name] = round(time.perf_counter() - since, 1)

    if quick:
        model = _build_quick_model(output / "tiny-model", forget + retain)
    t = time.perf_counter()
    say(f"[demo] loading {model if model != 'default' else 'SmolLM2-135M-Instruct (default)'}")
    base_model, tokenizer = load_model_and_tokenizer(model)
    model_name = "tiny random Llama (--quick)" if quick else getattr(base_model.config, "_name_or_path", "") or model
    if model == "default":
        model_name = "SmolLM2-135M-Instruct"
    lap("load", t)

    t = time.perf_counter()
    say(f"[demo] fine-tuning on {len(forget) + len(retain)} facts for {settings.finetune_epochs:g} epochs")
    tuned = finetune(
        FinetuneConfig(
            model=model,
            data=[str(forget_path), str(retain_path)],
            epochs=settings.finetune_epochs,
            lr=settings.finetune_lr,
            batch_size=settings.finetune_batch_size,
            seed=seed,
            progress=False,
            logging_steps=10**6,  # the demo prints its own summary lines
        ),
        model=base_model,
        tokenizer=tokenizer,
    )
    start_model = tuned.model
    lap("finetune", t)

    t = time.perf_counter()
    start = _snapshot(start_model, tokenizer, forget, retain, settings)
    say(
        f"[demo] fine-tuned: forget p {start['forget_prob']:.3f}, retain p {start['retain_prob']:.3f}, "
        f"ROUGE-L {start['forget_rouge_l']:.2f} ({time.perf_counter() - t:.0f} s)"
    )
    if not quick and start["forget_prob"] < 0.6:
        say("[demo] warning: the forget answers are not memorised well (p < 0.6); the effect may not show")
    lap("evaluate_start", t)

    t = time.perf_counter()
    say(f"[demo] belief band: {settings.band_beams}-beam search on {len(forget)} forget questions")
    band = collect_belief_band(
        start_model,
        tokenizer,
        forget,
        num_beams=settings.band_beams,
        max_new_tokens=settings.band_max_new_tokens,
        no_repeat_ngram_size=3,
    )
    lap("belief_band", t)
    say(f"[demo] belief band: {sum(len(b['beliefs']) for b in band)} answers ({timings['belief_band']:.0f} s)")

    results: dict = {"model": model_name, "data": "bs_unlearn demo_data", "quick": quick, "start": start, "runs": []}
    results["settings"] = dataclasses.asdict(settings)
    results["belief_band"] = band
    for method, options in run_specs:
        label = run_label(method, options)
        t = time.perf_counter()
        learning_rate = options.get("lr", settings.unlearn_lr)
        say(f"[demo] unlearning with {label}: {settings.unlearn_steps} steps, lr {learning_rate:g}")
        probe = SqueezeProbe(
            tokenizer,
            forget,
            band,
            retain_records=retain[: settings.probe_retain_records],
            every=settings.probe_every,
            top_k=settings.top_k,
            label=label,
            model_name=model_name,
            data_name="demo facts (forget 12 of 36)",
        )
        config_options = {k: v for k, v in options.items() if k != "lr"}
        config = UnlearnConfig(
            model=model,
            forget=str(forget_path),
            retain=str(retain_path),
            method=method,
            max_steps=settings.unlearn_steps,
            lr=learning_rate,
            batch_size=settings.unlearn_batch_size,
            max_new_tokens=settings.bs_s_max_new_tokens,
            seed=seed,
            progress=False,
            logging_steps=10**6,
            **config_options,
        )
        result = unlearn(config, callbacks=[probe], model=copy.deepcopy(start_model), tokenizer=tokenizer)
        run = probe.to_dict()
        end = _snapshot(result.model, tokenizer, forget, retain, settings)
        del result
        slug = label.split(" (")[0].lower().replace(" ", "_").replace("λ", "lam").replace("+", "").replace("(", "")
        slug = "".join(c for c in slug if c.isalnum() or c in "_.=")
        write_probe_json(run, output / f"probe_{slug}.json")
        results["runs"].append(
            {
                "label": label,
                "method": method,
                "options": options,
                "end": end,
                "belief_lp_change": band_change(run, "belief_lp"),
                "target_lp_change": band_change(run, "target_lp"),
                "paraphrase_lp_change": band_change(run, "paraphrase_lp"),
                "retain_lp_change": band_change(run, "retain_lp"),
                "probe": run,
            }
        )
        lap(f"unlearn {label}", t)
        say(
            f"[demo]   forget p {start['forget_prob']:.3f} -> {end['forget_prob']:.3f}, band Δlp "
            f"{_signed(results['runs'][-1]['belief_lp_change'])}, retain p {end['retain_prob']:.3f} "
            f"({timings[f'unlearn {label}']:.0f} s)"
        )

    t = time.perf_counter()
    plot_probe_runs(
        [run["probe"] for run in results["runs"]],
        output / "squeeze.png",
        title=f"Squeezing probe: {model_name}, demo facts (unlearn 12 of 36), {settings.unlearn_steps} steps, "
        f"lr {settings.unlearn_lr:g}",
    )
    lap("plot", t)
    timings["total"] = round(time.perf_counter() - started, 1)
    results["timings_seconds"] = timings
    (output / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    markdown = results_table(results, markdown=True)
    (output / "table.md").write_text(
        f"Model: {model_name}. Forget set: 12 of the 36 demo facts; {settings.unlearn_steps} unlearning steps at lr "
        f"{settings.unlearn_lr:g}, batch {settings.unlearn_batch_size} forget + {settings.unlearn_batch_size} retain. "
        "p = exp(mean per-token log-prob), averaged over answers; Δlp = change of the mean per-token log-prob over "
        "the run; p(label) / alt mass = token level, at the forget answers' positions.\n\n" + markdown + "\n",
        encoding="utf-8",
    )
    say("")
    say(results_table(results, markdown=False))
    say("")
    say(f"[demo] wrote {output / 'squeeze.png'}, {output / 'results.json'}, {output / 'table.md'}")
    say(f"[demo] total {timings['total']:.0f} s")
    return results


def handle(args: argparse.Namespace) -> int:
    if not is_main_process():
        raise ValueError("bs-unlearn demo runs in one process; start it without torchrun / accelerate launch")
    run_demo(
        model=args.model, output=args.output, overwrite=args.overwrite, quick=args.quick, runs=args.runs, seed=args.seed
    )
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="fine-tune, unlearn with GA / BS-T / BS-S and show the squeezing effect (minutes on a CPU)",
        description=(
            "Fine-tune a model on the embedded demo facts, unlearn a third of them with GA, BS-T and BS-S from the "
            "same start, print a table and write a plot (squeeze.png) to --output."
        ),
    )
    parser.add_argument("--model", default="default", help="HF model directory, .gguf file, or 'default' (SmolLM2)")
    parser.add_argument("--output", default="bs-unlearn-demo", help="directory for the plot, table and JSONs")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--quick", action="store_true", help="tiny random model, a few steps: a smoke test in seconds")
    parser.add_argument(
        "--runs",
        nargs="+",
        default=None,
        help=f"unlearning runs as METHOD[:opt=value,...] (default: {' '.join(DEFAULT_RUNS)}); options: "
        + ", ".join(RUN_OPTION_TYPES),
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(handler=handle)
