"""``bs-unlearn eval``: TOFU metrics of a model, as a JSON file and a table on the terminal.

    bs-unlearn eval --model out/unlearned --forget forget01.jsonl --retain retain_perturbed.jsonl \\
        --real-authors real_authors_perturbed.jsonl --world-facts world_facts_perturbed.jsonl --output metrics.json
    bs-unlearn eval --model out/unlearned --tofu locuslab/TOFU --split forget01 --output metrics.json
    # forget quality: evaluate a retain-only model the same way first, then
    bs-unlearn eval ... --retain-model-metrics retain_only_metrics.json
"""

from __future__ import annotations

import argparse
import json
import pathlib

from ..config import check_impl_available
from ..models import check_model_path, model_input_path
from ..outputs import check_output_file, check_readable_file, is_main_process, write_json_atomic
from ..prompts import PromptFormat
from ..tofu_data import TOFU_SPLITS, tofu_eval_splits
from .base import positive_int, require_modules

PROMPT_DEFAULTS = PromptFormat()


def eval_set_files(args: argparse.Namespace) -> list[tuple[str, pathlib.Path | None, str]]:
    """The (name, path, role) triples the arguments ask for, each path checked readable (nothing is loaded); a set
    of the --tofu source has path None (read by bs_unlearn.tofu_source.load_split)."""
    from ..tofu_source import is_hub_id

    wanted: list[tuple[str, pathlib.Path | None, str]] = []
    if args.tofu is not None:
        if not is_hub_id(args.tofu) and not pathlib.Path(args.tofu).expanduser().is_dir():
            raise FileNotFoundError(f"--tofu is neither a folder nor a Hugging Face dataset id: {args.tofu}")
        wanted += [(name, None, role) for name, _, role in tofu_eval_splits(args.split)]
    for name, role in (
        ("forget", "forget"),
        ("retain", "retain"),
        ("real_authors", "options"),
        ("world_facts", "options"),
    ):
        path = getattr(args, name)
        if path is None:
            continue
        # An explicit file replaces the --tofu-dir set it stands for (any forget split, else the same name).
        wanted = [w for w in wanted if (w[2] != "forget" if role == "forget" else w[0] != name)]
        wanted.append((name, pathlib.Path(path), role))
    for spec in args.set or []:
        name, equals, rest = spec.partition("=")
        path, _, role = rest.rpartition(":") if rest.endswith((":forget", ":retain", ":options")) else (rest, "", "")
        if not equals or not name or not path:
            raise ValueError(f"--set must look like NAME=PATH[:forget|retain|options], got {spec!r}")
        _, colon, suffix = rest.rpartition(":")
        if not role and colon and "/" not in suffix and not pathlib.Path(rest).exists():
            raise ValueError(
                f"--set {spec}: no file {rest}, and the part after ':' (the role) may be forget, retain "
                f"or options, not {suffix!r}"
            )
        wanted.append((name, pathlib.Path(path), role or "retain"))
    if not wanted:
        raise ValueError("nothing to evaluate: give --forget/--retain/--real-authors/--world-facts, --set or --tofu")
    for name, path, _ in wanted:
        if path is not None:
            check_readable_file(path, name)
    return wanted


def eval_sets_from_args(args: argparse.Namespace) -> list:
    """The sets the arguments ask for (:func:`eval_set_files`), loaded as metrics.EvalSet."""
    from ..data import read_qa_records
    from ..tofu_data import EvalSet
    from ..tofu_source import load_split

    splits = {name: split for name, split, _ in tofu_eval_splits(args.split)}
    return [
        EvalSet(
            name,
            read_qa_records(path, max_examples=args.max_examples, seed=args.seed)
            if path is not None
            else load_split(args.tofu, splits[name], max_examples=args.max_examples, seed=args.seed),
            role,
        )
        for name, path, role in eval_set_files(args)
    ]


def handle(args: argparse.Namespace) -> int:
    # Every path and option is checked before the heavy imports (torch, transformers) and before any model loads.
    check_model_path(args.model)
    inputs = [model_input_path(args.model), *(path for _, path, _ in eval_set_files(args) if path is not None)]
    if args.retain_model_metrics is not None:
        inputs.append(check_readable_file(args.retain_model_metrics, "retain-model metrics"))
    output = check_output_file(args.output, overwrite=args.overwrite, inputs=inputs)
    require_modules(
        "bs-unlearn eval",
        *([] if args.no_generate else ["rouge_score"]),  # ROUGE-L of the greedy answers
        *([] if args.retain_model_metrics is None else ["scipy"]),  # forget quality: the KS test
    )
    retain_metrics = None
    if args.retain_model_metrics is not None:
        path = pathlib.Path(args.retain_model_metrics).expanduser()
        try:
            retain_metrics = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"--retain-model-metrics {path} is not JSON: {error}") from error
    check_impl_available(args.impl)
    from ..metrics import EvalOptions, evaluate, format_table
    from ..models import load_model_and_tokenizer

    sets = eval_sets_from_args(args)
    model, tokenizer = load_model_and_tokenizer(args.model)
    results = evaluate(
        model,
        tokenizer,
        sets,
        EvalOptions(
            prompt_format=PromptFormat(system_prompt=args.system_prompt or None, date_string=args.date_string or None),
            batch_size=args.batch_size,
            generation_batch_size=args.generation_batch_size,
            max_new_tokens=args.max_new_tokens,
            generate=not args.no_generate,
            impl=args.impl,
        ),
        retain_model_metrics=retain_metrics,
        progress=(lambda message: print(f"[eval] {message}", flush=True)) if not args.quiet else None,
    )
    results["model"] = args.model
    if is_main_process():
        write_json_atomic(results, output)
        print(format_table(results))
        print(f"wrote {output}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="TOFU metrics: probability, paraphrase, ROUGE-L, truth ratio, model utility, forget quality",
        description=(
            "Evaluate a model on TOFU-format QA sets: answer probability (exp of the mean per-token log-prob), "
            "paraphrased-answer probability, ROUGE-L recall of greedy answers, truth ratio on perturbed answers, "
            "model utility over the non-forget sets, and forget quality (KS test) against a retain-only model's "
            "metrics JSON; as open-unlearning's TOFU evaluation computes them, fluency left out."
        ),
    )
    parser.add_argument("--model", default="default", help="HF model directory, .gguf file, or 'default' (SmolLM2)")
    parser.add_argument("--output", required=True, help="JSON file to write the metrics to")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.add_argument("--forget", default=None, help="forget set (role forget)")
    parser.add_argument("--retain", default=None, help="retain set, ideally with perturbed answers (role retain)")
    parser.add_argument("--real-authors", default=None, help="TOFU real_authors_perturbed.jsonl (role options)")
    parser.add_argument("--world-facts", default=None, help="TOFU world_facts_perturbed.jsonl (role options)")
    parser.add_argument("--set", action="append", help="extra set NAME=PATH[:forget|retain|options] (repeatable)")
    parser.add_argument(
        "--tofu",
        "--tofu-dir",
        dest="tofu",
        default=None,
        help="TOFU (a JSON Lines folder, a local dataset folder, or locuslab/TOFU from the HF cache): evaluate "
        "--split and the three utility sets",
    )
    parser.add_argument("--split", default="forget01", choices=sorted(TOFU_SPLITS), help="forget split with --tofu")
    parser.add_argument(
        "--retain-model-metrics", default=None, help="eval JSON of a retain-only model (forget quality)"
    )
    parser.add_argument("--max-examples", type=positive_int, default=None, help="seeded random subset of each set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=positive_int, default=16, help="questions per scoring call")
    parser.add_argument(
        "--generation-batch-size", type=positive_int, default=64, help="questions per greedy-answer call"
    )
    parser.add_argument(
        "--max-new-tokens", type=positive_int, default=200, help="most tokens of a greedy answer (ROUGE-L)"
    )
    parser.add_argument(
        "--system-prompt",
        default=PROMPT_DEFAULTS.system_prompt,
        help="system turn of the chat template's prompts ('' for none; default: open-unlearning's)",
    )
    parser.add_argument(
        "--date-string",
        default=PROMPT_DEFAULTS.date_string,
        help="date_string passed to the chat template ('' to pass none: a template that prints the date prints "
        "the day's; default: open-unlearning's)",
    )
    parser.add_argument("--no-generate", action="store_true", help="skip generation (no ROUGE-L, so no model utility)")
    parser.add_argument("--impl", default="auto", help="bs_kernels backend for the log-probs")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    parser.set_defaults(handler=handle)
