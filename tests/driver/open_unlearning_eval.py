"""open-unlearning's own TOFU evaluation (src/eval.py, ``experiment=eval/tofu/default``) of tiny models, offline.

    python tests/driver/open_unlearning_eval.py PLAN.json

Run by the interpreter that runs open-unlearning (open_unlearning_checkout.open_unlearning_python), for
tests/driver/test_open_unlearning_eval.py. PLAN.json:

    {"work": DIR, "files": {TOFU config name: JSONL file}, "models": {NAME: fine-tuning steps},
     "evals": [{"model": NAME, "retain_model": NAME or null}]}

It builds a tiny Llama-3.2-style checkpoint (open_unlearning_checkout.build_chat_checkpoint) whose word-level
vocabulary covers the files and whose chat template is Llama-3.2's layout: a system turn that prints "Today Date:"
and ``date_string`` (the day's date when none is given), so a prompt that leaves ``date_string`` out differs. Each
model of ``models`` is that checkpoint fine-tuned for its number of full-batch steps on the answers of every
file (so that it answers some questions, stops at the end of its turn on those, and rambles on the others), saved
to ``DIR/NAME``. Each entry of ``evals`` runs open-unlearning's ``src/eval.py`` with
``experiment=eval/tofu/default`` (its Llama-3.2-1B-Instruct model config: system prompt, ``date_string``), the
checkout's TOFU metrics plus ``exact_memorization`` and less ``privleak`` (a membership-inference score that
``bs-unlearn eval`` does not compute), every TOFU data set read from the local file of ``files``, on the CPU in
float32; with ``retain_model``, that model's logs give forget quality. The logs land in
``DIR/saves/eval/NAME/TOFU_EVAL.json``.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

from open_unlearning_checkout import CHECKOUT, build_chat_checkpoint

# Llama-3.2-Instruct's layout in the tokens of open_unlearning_checkout.CHAT_TOKENS: a system turn with the knowledge
# cutoff and "Today Date: <date_string>" (strftime_now, the day's date, when the caller passes none), then the turns.
LLAMA32_CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if not date_string is defined %}{%- if strftime_now is defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- else %}{%- set date_string = '26 Jul 2024' %}{%- endif %}"
    "{%- endif %}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
TEMPLATE_WORDS = "system user assistant Cutting Knowledge Date : December 2023 Today 10 Apr 2025 You are a helpful ."
# open-unlearning's configs/model/Llama-3.2-1B-Instruct.yaml (the fine-tuning uses the prompt the evaluation uses).
SYSTEM_PROMPT = "You are a helpful assistant."
DATE_STRING = "10 Apr 2025"
TEXT_FIELDS = ("question", "answer", "paraphrased_answer", "paraphrased_question", "perturbed_answer")


def read_rows(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def texts_of(files: dict[str, str]) -> list[str]:
    texts = [TEMPLATE_WORDS]
    for path in files.values():
        for row in read_rows(path):
            for field in TEXT_FIELDS:
                value = row.get(field)
                texts += value if isinstance(value, list) else [value] if isinstance(value, str) else []
    return texts


def fine_tune(source: Path, target: Path, pairs: list[tuple[str, str]], steps: int, lr: float = 1e-2) -> None:
    """``steps`` full-batch Adam steps of next-token loss over the chat-formatted (question, answer) pairs."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    sequences = [
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": question},
                {"role": "assistant", "content": answer},
            ],
            tokenize=True,
            date_string=DATE_STRING,
        )
        for question, answer in pairs
    ]
    length = max(map(len, sequences))
    input_ids = torch.zeros(len(sequences), length, dtype=torch.long)
    labels = torch.full((len(sequences), length), -100, dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(ids)] = torch.tensor(ids)
    attention_mask = (labels != -100).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)


def eval_arguments(work: Path, model: str, files: dict[str, str], retain_model: str | None) -> list[str]:
    """src/eval.py's arguments: offline CPU float32, the local files for every TOFU data set the metrics read."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    arguments = [
        "--config-name=eval.yaml",
        "experiment=eval/tofu/default",
        f"task_name={model}",
        f"model.model_args.pretrained_model_name_or_path={work / model}",
        f"model.tokenizer_args.pretrained_model_name_or_path={work / model}",
        "model.model_args.attn_implementation=sdpa",
        "model.model_args.torch_dtype=float32",
        "model.model_args.device_map=cpu",
        "forget_split=forget01",
        f"paths.root_dir={work}",
        "+eval/tofu_metrics=exact_memorization",
        "~eval.tofu.metrics.privleak",
    ]
    if retain_model is not None:
        arguments.append(f"retain_logs_path={work / 'saves' / 'eval' / retain_model / 'TOFU_EVAL.json'}")
    # Every metric (and every metric it pre-computes) names its data set by the hub's config name (hf_args.name):
    # read each from the local file instead.
    with initialize_config_dir(config_dir=str(CHECKOUT / "configs"), version_base=None):
        config = compose(config_name="eval.yaml", overrides=arguments[1:])
    data_sets = []

    def walk(node, path: str) -> None:
        for key, value in node.items():
            if key == "hf_args":
                data_sets.append((f"{path}.hf_args", value.name))
            elif OmegaConf.is_dict(value):
                walk(value, f"{path}.{key}")

    walk(config.eval, "eval")
    for path, name in data_sets:
        if name not in files:
            raise SystemExit(f"the plan has no file for the TOFU data set {name!r} ({path})")
        arguments += [f"{path}.path=json", f"+{path}.data_files={files[name]}"]
    return arguments


def run_plan(plan_file: Path) -> None:
    plan = json.loads(plan_file.read_text())
    work, files = Path(plan["work"]), plan["files"]
    start = build_chat_checkpoint(work / "start", texts_of(files), LLAMA32_CHAT_TEMPLATE, hidden_size=64)
    pairs = [(row["question"], row["answer"]) for path in files.values() for row in read_rows(path)]
    for name, steps in plan["models"].items():
        fine_tune(start, work / name, pairs, steps)
    eval_script = CHECKOUT / "src" / "eval.py"
    sys.path.insert(0, str(eval_script.parent))
    for run in plan["evals"]:
        sys.argv = [str(eval_script), *eval_arguments(work, run["model"], files, run.get("retain_model"))]
        runpy.run_path(str(eval_script), run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    run_plan(Path(sys.argv[1]))
