"""A tiny Llama-3-style checkpoint for running open-unlearning's src/train.py offline, and the run's overrides.

    python tests/driver/open_unlearning_checkout.py DIR [TOFU_DIR]
    python tests/driver/open_unlearning_checkout.py plan PLAN.json

The first writes DIR (config.json, model.safetensors, tokenizer files): a randomly initialised 2-layer Llama
whose word-level tokenizer covers the TOFU forget01 / retain99 text and carries a Llama-3-like chat template with
``<|eot_id|>`` as eos and no pad token, so open-unlearning sets pad = eos as it does for Llama-3 (the collator then
masks the end-of-turn tokens inside every prompt). Built by the interpreter that runs open-unlearning, so the files
are written by the transformers version that reads them. The second builds the checkpoint and runs the
open-unlearning trainings that tests/driver/test_open_unlearning_checkout.py plans.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Where the TOFU JSONL files and the open-unlearning checkout are: these variables, else the shared/ folder beside
# the repository.
TOFU_DIR_VARIABLE = "BS_TOFU_DIR"
CHECKOUT_VARIABLE = "BS_OPEN_UNLEARNING_DIR"
TOFU_DIR = Path(os.environ.get(TOFU_DIR_VARIABLE) or REPO.parent / "shared" / "data" / "tofu").expanduser()
CHECKOUT = Path(os.environ.get(CHECKOUT_VARIABLE) or REPO.parent / "shared" / "vendor" / "open-unlearning").expanduser()

# Llama-3's chat layout with its special tokens (what open-unlearning's Llama-3.2-1B-Instruct config expects).
CHAT_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
TEMPLATE_WORDS = "system user assistant You are a helpful assistant ."


def tofu_texts(tofu_dir: Path, splits=("forget01", "retain99")) -> list[str]:
    texts = [TEMPLATE_WORDS]
    for split in splits:
        with open(tofu_dir / f"{split}.jsonl", encoding="utf-8") as rows:
            for line in rows:
                row = json.loads(line)
                texts += [row["question"], row["answer"]]
    return texts


def build_checkpoint(directory: Path, tofu_dir: Path = TOFU_DIR) -> Path:
    return build_chat_checkpoint(directory, tofu_texts(tofu_dir))


def build_chat_checkpoint(
    directory: Path, texts: list[str], chat_template: str = CHAT_TEMPLATE, hidden_size: int = 32
) -> Path:
    """The checkpoint of :func:`build_checkpoint` with the words of ``texts`` and the given chat template (which may
    only use the tokens of CHAT_TOKENS)."""
    from bs_unlearn.tiny_model import build_tiny_model, build_tiny_tokenizer
    from transformers import PreTrainedTokenizerFast

    word_level = build_tiny_tokenizer(texts)
    word_level.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
    # Rebuilt around the same backend so that eos is <|eot_id|>, bos <|begin_of_text|> and there is no pad token.
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=word_level.backend_tokenizer,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        unk_token="<unk>",
        additional_special_tokens=CHAT_TOKENS,
    )
    tokenizer.chat_template = chat_template
    model = build_tiny_model(word_level, hidden_size=hidden_size, layers=2)
    model.config.pad_token_id = None
    model.config.bos_token_id = tokenizer.bos_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = None
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def offline_cpu_overrides(model_dir: Path, output_root: Path, tofu_dir: Path = TOFU_DIR) -> list[str]:
    """The hydra overrides of an offline CPU run of experiment=unlearn/tofu/default (docs/integrations.md)."""
    return [
        f"model.model_args.pretrained_model_name_or_path={model_dir}",
        f"model.tokenizer_args.pretrained_model_name_or_path={model_dir}",
        "model.model_args.attn_implementation=sdpa",
        "model.model_args.torch_dtype=float32",
        "forget_split=forget01",
        "retain_split=retain99",
        "data.forget.TOFU_QA_forget.args.hf_args.path=json",
        f"+data.forget.TOFU_QA_forget.args.hf_args.data_files={tofu_dir}/forget01.jsonl",
        "data.retain.TOFU_QA_retain.args.hf_args.path=json",
        f"+data.retain.TOFU_QA_retain.args.hf_args.data_files={tofu_dir}/retain99.jsonl",
        f"paths.root_dir={output_root}",
        "trainer.args.warmup_epochs=0",
        "trainer.args.bf16=false",
        "trainer.args.bf16_full_eval=false",
        "trainer.args.optim=adamw_torch",
        "trainer.args.report_to=none",
        "trainer.args.do_eval=false",
        "trainer.args.eval_on_start=false",
        "trainer.args.eval_strategy=no",
    ]


def run_plan(plan_file: Path) -> None:
    """Builds ``plan["model_dir"]``, then runs ``open_unlearning_train.main(argv)`` for each argv of
    ``plan["runs"]``: the command ``python -m bs_unlearn.integrations.open_unlearning_train ARGV``, several in one
    process so that the imports are paid once."""
    plan = json.loads(plan_file.read_text())
    build_checkpoint(Path(plan["model_dir"]))
    from bs_unlearn.integrations.open_unlearning_train import main

    for argv in plan["runs"]:
        main(list(argv))


# The interpreter that runs open-unlearning (tests/driver/test_open_unlearning_checkout.py's docstring says why).
VENV = REPO / ".venv-ou"
# Importable names of the [open-unlearning] extra that tell whether an interpreter already has it.
EXTRA_MODULES = ("hydra", "omegaconf", "deepspeed", "lm_eval", "sklearn")


def extra_requirements() -> list[str]:
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return project["optional-dependencies"]["open-unlearning"]


def _has_extra_here() -> bool:
    import importlib.util

    import transformers

    return int(transformers.__version__.split(".")[0]) < 5 and all(
        importlib.util.find_spec(name) is not None for name in EXTRA_MODULES
    )


def _venv_python() -> Path:
    """``.venv-ou``'s interpreter with the extra installed; this interpreter's packages stay visible behind it."""
    import site
    import subprocess
    import venv

    python = VENV / "bin" / "python"
    stamp = VENV / "open-unlearning-requirements.json"
    requirements = extra_requirements()
    if python.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == requirements:
        return python
    venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    # What --system-site-packages does, for the interpreter running the tests (itself often a venv, whose packages
    # --system-site-packages would not see): its site-packages, .pth files included, after the venv's own.
    venv_site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    parent_sites = [path for path in site.getsitepackages() if Path(path).is_dir()]
    (Path(venv_site) / "_bs_kernels_parent_site.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in parent_sites)
    )
    install = subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *requirements],
        capture_output=True,
        text=True,
    )
    if install.returncode != 0:
        raise RuntimeError(f"installing the [open-unlearning] extra into {VENV} failed:\n{install.stderr[-4000:]}")
    stamp.write_text(json.dumps(requirements))
    return python


def open_unlearning_python() -> str:
    """``BS_KERNELS_OU_PYTHON``, else this interpreter when it has the extra, else ``.venv-ou`` (built once)."""
    import os

    if os.environ.get("BS_KERNELS_OU_PYTHON"):
        return os.environ["BS_KERNELS_OU_PYTHON"]
    return sys.executable if _has_extra_here() else str(_venv_python())


def offline_environment(work: Path) -> dict[str, str]:
    """The environment of an open-unlearning subprocess: nothing from the hub, the datasets cache in ``work``, this
    checkout's packages first."""
    import os

    python_path = os.pathsep.join([str(REPO), str(REPO / "python"), os.environ.get("PYTHONPATH", "")])
    return dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_DATASETS_CACHE=str(work / "datasets_cache"),
        PYTHONPATH=python_path,
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "plan":
        run_plan(Path(sys.argv[2]))
    elif len(sys.argv) in (2, 3):
        build_checkpoint(Path(sys.argv[1]), Path(sys.argv[2]) if len(sys.argv) == 3 else TOFU_DIR)
    else:
        raise SystemExit(__doc__)
