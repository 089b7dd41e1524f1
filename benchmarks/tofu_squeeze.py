"""A real TOFU run of the squeezing probe: SmolLM2-135M-Instruct, forget01 + a retain99 subset, GA vs BS-T vs BS-S.

    python benchmarks/tofu_squeeze.py --tofu-dir ../shared/data/tofu --output docs/tofu

1. Fine-tune the model on forget01 (40 QA) + ``--retain-examples`` retain99 QA (seeded subset) until memorised.
2. Belief band: the fine-tuned model's beam-search answers to the 40 forget questions, other than the target.
3. Unlearn forget01 from that same start with each run (same steps, learning rate, batch, retain term), the
   ``SqueezeProbe`` callback recording targets / belief band / paraphrases / retain answers / token-level view.
4. TOFU metrics (bs_unlearn.metrics) of the start and of every unlearned model on forget01, retain_perturbed,
   real_authors_perturbed and world_facts_perturbed (seeded subsets of --eval-examples), the comparison plot,
   results.json and table.md in --output.

Every stage's wall time is recorded (the machine may be shared with other jobs: see the uptime lines in the log).
"""

from __future__ import annotations

import argparse
import copy
import json
import pathlib
import subprocess
import sys
import tempfile
import time


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tofu-dir", default=str(pathlib.Path(__file__).resolve().parents[2] / "shared/data/tofu"))
    parser.add_argument("--output", default="docs/tofu")
    parser.add_argument("--model", default="default")
    parser.add_argument("--retain-examples", type=int, default=160)
    parser.add_argument("--finetune-epochs", type=float, default=4.0)
    parser.add_argument("--finetune-lr", type=float, default=1e-4)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--probe-every", type=int, default=5)
    parser.add_argument("--runs", nargs="+", default=["graddiff", "bs-t:lam=0.5", "bs-s"])
    parser.add_argument("--eval-examples", type=int, default=40)
    parser.add_argument("--band-beams", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from bs_unlearn.commands.demo import parse_run, run_label
    from bs_unlearn.metrics import EvalSet, evaluate, format_table
    from bs_unlearn.models import load_model_and_tokenizer
    from bs_unlearn.plotting import plot_probe_runs
    from bs_unlearn.probe import SqueezeProbe, band_change, collect_belief_band, write_probe_json
    from bs_unlearn.trainer import FinetuneConfig, UnlearnConfig, finetune, unlearn

    tofu = pathlib.Path(args.tofu_dir)
    output = pathlib.Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def log(message: str) -> None:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        print(
            f"[tofu {time.strftime('%H:%M:%S')}] {message}  ({uptime.split('load average:')[-1].strip()})", flush=True
        )

    forget_path = tofu / "forget01.jsonl"
    forget = read_jsonl(forget_path)
    # The retain subset is written to a temporary file so that fine-tuning and unlearning read the same examples.
    import numpy as np

    retain_all = read_jsonl(tofu / "retain99.jsonl")
    keep = sorted(np.random.default_rng(args.seed).permutation(len(retain_all))[: args.retain_examples])
    retain = [retain_all[i] for i in keep]
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="tofu-squeeze-"))
    retain_path = scratch / "retain_subset.jsonl"
    retain_path.write_text("".join(json.dumps(r) + "\n" for r in retain))

    def eval_sets() -> list:
        def subset(name: str) -> list[dict]:
            rows = read_jsonl(tofu / name)
            picked = np.random.default_rng(args.seed).permutation(len(rows))[: args.eval_examples]
            return [rows[i] for i in sorted(picked)]

        return [
            EvalSet("forget01", forget, "forget"),
            EvalSet("retain", subset("retain_perturbed.jsonl"), "retain"),
            EvalSet("real_authors", subset("real_authors_perturbed.jsonl"), "options"),
            EvalSet("world_facts", subset("world_facts_perturbed.jsonl"), "options"),
        ]

    started = time.perf_counter()
    t = time.perf_counter()
    log("loading the model")
    base, tokenizer = load_model_and_tokenizer(args.model)
    timings["load"] = round(time.perf_counter() - t, 1)
    model_name = "SmolLM2-135M-Instruct" if args.model == "default" else args.model

    t = time.perf_counter()
    log(f"fine-tuning on forget01 ({len(forget)}) + {len(retain)} retain99 QA, {args.finetune_epochs:g} epochs")
    tuned = finetune(
        FinetuneConfig(
            model=args.model,
            data=[str(forget_path), str(retain_path)],
            epochs=args.finetune_epochs,
            lr=args.finetune_lr,
            batch_size=8,
            seed=args.seed,
            progress=False,
            logging_steps=10,
        ),
        model=base,
        tokenizer=tokenizer,
    )
    start_model = tuned.model
    timings["finetune"] = round(time.perf_counter() - t, 1)
    log(f"fine-tuned in {timings['finetune']:.0f} s: {tuned.summary}")

    t = time.perf_counter()
    results: dict = {"model": model_name, "args": vars(args), "runs": []}
    results["start_metrics"] = evaluate(start_model, tokenizer, eval_sets(), max_new_tokens=args.max_new_tokens)
    timings["evaluate_start"] = round(time.perf_counter() - t, 1)
    log(f"start metrics ({timings['evaluate_start']:.0f} s)\n{format_table(results['start_metrics'])}")

    t = time.perf_counter()
    band = collect_belief_band(
        start_model, tokenizer, forget, num_beams=args.band_beams, max_new_tokens=args.max_new_tokens
    )
    timings["belief_band"] = round(time.perf_counter() - t, 1)
    results["belief_band"] = band
    log(f"belief band: {sum(len(b['beliefs']) for b in band)} answers in {timings['belief_band']:.0f} s")

    for spec in args.runs:
        method, options = parse_run(spec)
        label = run_label(method, options)
        t = time.perf_counter()
        log(f"unlearning with {label}: {args.steps} steps, lr {args.lr:g}, batch {args.batch_size}")
        probe = SqueezeProbe(
            tokenizer,
            forget,
            band,
            retain_records=retain[: len(forget)],
            every=args.probe_every,
            label=label,
            model_name=model_name,
            data_name="TOFU forget01",
        )
        config = UnlearnConfig(
            model=args.model,
            forget=str(forget_path),
            retain=str(retain_path),
            method=method,
            max_steps=args.steps,
            lr=options.pop("lr", args.lr),
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            seed=args.seed,
            progress=False,
            logging_steps=5,
            **options,
        )
        result = unlearn(config, callbacks=[probe], model=copy.deepcopy(start_model), tokenizer=tokenizer)
        seconds_unlearn = round(time.perf_counter() - t, 1)
        run = probe.to_dict()
        slug = "".join(c for c in spec.replace(":", "_") if c.isalnum() or c in "_.=-")
        write_probe_json(run, output / f"probe_{slug}.json")
        t = time.perf_counter()
        metrics = evaluate(result.model, tokenizer, eval_sets(), max_new_tokens=args.max_new_tokens)
        seconds_eval = round(time.perf_counter() - t, 1)
        timings[f"unlearn {label}"] = seconds_unlearn
        timings[f"evaluate {label}"] = seconds_eval
        results["runs"].append(
            {
                "label": label,
                "spec": spec,
                "probe": run,
                "metrics": metrics,
                "belief_lp_change": band_change(run, "belief_lp"),
                "target_lp_change": band_change(run, "target_lp"),
                "paraphrase_lp_change": band_change(run, "paraphrase_lp"),
                "log_history": result.log_history,
            }
        )
        del result
        log(f"{label}: unlearn {seconds_unlearn:.0f} s, eval {seconds_eval:.0f} s\n{format_table(metrics)}")

    plot_probe_runs(
        [run["probe"] for run in results["runs"]],
        output / "squeeze.png",
        title=f"Squeezing probe: {model_name}, TOFU forget01 (+{len(retain)} retain99), {args.steps} steps, "
        f"lr {args.lr:g}",
    )
    timings["total"] = round(time.perf_counter() - started, 1)
    results["timings_seconds"] = timings
    (output / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")
    (output / "table.md").write_text(markdown_table(results) + "\n")
    log(f"done in {timings['total']:.0f} s; wrote {output}")
    print(markdown_table(results))
    return 0


def markdown_table(results: dict) -> str:
    """Probe changes and TOFU metrics per run (start row first)."""
    header = (
        "| model | target lp | band lp | paraphrase lp | retain lp | p(label) | alt mass | forget01 prob | "
        "forget01 ROUGE-L | forget01 truth | retain prob | retain ROUGE-L | model utility |"
    )
    lines = [header, "|" + "---|" * header.count(" | ") + "---|"]

    def metric_cells(metrics: dict) -> list[str]:
        forget, retain = metrics["sets"]["forget01"], metrics["sets"]["retain"]
        return [
            f"{forget['prob']:.3f}",
            f"{forget['rouge_l']:.2f}",
            f"{forget['truth_ratio']:.3f}",
            f"{retain['prob']:.3f}",
            f"{retain['rouge_l']:.2f}",
            f"{metrics['model_utility']:.3f}",
        ]

    first = results["runs"][0]["probe"]["records"][0] if results["runs"] else {}
    keys = ("target_lp", "belief_lp", "paraphrase_lp", "retain_lp", "target_p_label", "target_alt_mass")
    cells = [f"{first[k]:.3f}" if k in first else "-" for k in keys]
    lines.append("| fine-tuned (start) | " + " | ".join(cells + metric_cells(results["start_metrics"])) + " |")
    for run in results["runs"]:
        last = run["probe"]["records"][-1]
        cells = [f"{last[k]:.3f}" if k in last else "-" for k in keys]
        lines.append(f"| {run['label']} | " + " | ".join(cells + metric_cells(run["metrics"])) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
