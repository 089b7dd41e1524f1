"""Model folders written by bs-unlearn (transformers 5) read as the same model by transformers 4.x.

open-unlearning pins transformers 4.x, and users evaluate bs-unlearn's fine-tuned and unlearned models there.
transformers 5 writes RoPE settings only as ``rope_parameters``; 4.x then takes its default rope_theta (10 000)
without a word (SmolLM2's is 100 000). ``models.add_transformers4_keys`` adds the 4.x keys; the last test loads the
folders in open-unlearning's interpreter (transformers 4.x) and compares the logits.
"""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from bs_unlearn.models import add_transformers4_keys
from bs_unlearn.tiny_model import build_quick_model, build_tiny_tokenizer
from open_unlearning_checkout import CHECKOUT, CHECKOUT_VARIABLE, REPO, offline_environment, open_unlearning_python

TEXTS = ["Question: who wrote it ? Answer: Jaime Vasquez wrote it ."]
IDS = [[2, 5, 9, 4, 7, 3, 8, 6, 10, 11]]
# RoPE settings whose numbers differ from transformers 4's default (rope_theta 10 000, no scaling).
ROPES = {
    "theta": {"rope_type": "default", "rope_theta": 100_000.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500_000.0,
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
}


def _write_folder(folder, rope: dict) -> torch.Tensor:
    """A tiny Llama with these RoPE settings saved by this transformers (5.x) into ``folder``; its logits on IDS."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(TEXTS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rope_parameters=dict(rope),
        initializer_range=0.5,  # weights large enough that RoPE's base moves the logits by far more than float noise
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    add_transformers4_keys(folder)
    with torch.no_grad():
        return model(input_ids=torch.tensor(IDS)).logits


def _json(path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", list(ROPES))
def test_the_keys_transformers4_reads_are_added_and_read_back_by_transformers5(tmp_path, name):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rope = ROPES[name]
    logits = _write_folder(tmp_path, rope)
    config = _json(tmp_path / "config.json")
    assert config["rope_theta"] == rope["rope_theta"]
    if name == "theta":
        assert "rope_scaling" not in config
    else:
        assert config["rope_scaling"] == {key: value for key, value in rope.items() if key != "rope_theta"}
    assert _json(tmp_path / "tokenizer_config.json")["tokenizer_class"] == "PreTrainedTokenizerFast"
    # transformers 5 reads the folder back as the same model and tokenizer.
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert model.config.rope_parameters == rope
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=torch.tensor(IDS)).logits, logits, atol=0, rtol=0)
    assert (
        AutoTokenizer.from_pretrained(tmp_path)(TEXTS[0])["input_ids"]
        == build_tiny_tokenizer(TEXTS)(TEXTS[0])["input_ids"]
    )


def test_a_folder_without_rope_parameters_is_left_alone(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "rope_theta": 10_000.0}))
    before = (tmp_path / "config.json").read_bytes()
    add_transformers4_keys(tmp_path)
    assert (tmp_path / "config.json").read_bytes() == before


def test_the_quick_model_folder_carries_the_keys(tmp_path):
    records = [{"question": "who wrote it ?", "answer": "Jaime wrote it ."}]
    folder = build_quick_model(tmp_path / "quick", records)
    config = _json(tmp_path / "quick" / "config.json")
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"], folder


READ_IN_TRANSFORMERS4 = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
assert int(transformers.__version__.split(".")[0]) == 4, transformers.__version__
out = {}
for folder in sys.argv[2:]:
    AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out[folder] = model(input_ids=torch.tensor(json.loads(sys.argv[1]))).logits.tolist()
print(json.dumps(out))
"""


@pytest.mark.open_unlearning
@pytest.mark.skipif(
    not (CHECKOUT / "src" / "eval.py").is_file(),
    reason=f"no open-unlearning checkout at {CHECKOUT} (its interpreter runs transformers 4): set {CHECKOUT_VARIABLE}",
)
def test_transformers4_reads_the_same_model(tmp_path):
    """Each folder in open-unlearning's interpreter gives this interpreter's logits; the same folder without the added
    RoPE keys gives other logits (what users got before)."""
    folders, expected = [], {}
    for name, rope in ROPES.items():
        folder = tmp_path / name
        expected[str(folder)] = _write_folder(folder, rope)
        bare = tmp_path / f"{name}-bare"
        shutil.copytree(folder, bare)
        config = _json(bare / "config.json")
        for key in ("rope_theta", "rope_scaling"):
            config.pop(key, None)
        (bare / "config.json").write_text(json.dumps(config))
        folders += [str(folder), str(bare)]
    result = subprocess.run(
        [open_unlearning_python(), "-c", READ_IN_TRANSFORMERS4, json.dumps(IDS), *folders],
        cwd=REPO,
        env=offline_environment(tmp_path),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    theirs = {folder: torch.tensor(logits) for folder, logits in json.loads(result.stdout).items()}
    for folder, logits in expected.items():
        torch.testing.assert_close(theirs[folder], logits, atol=1e-5, rtol=1e-5)
        assert (theirs[f"{folder}-bare"] - logits).abs().max() > 1e-3, f"{folder}: the bare folder reads the same"
