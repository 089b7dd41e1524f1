"""The configuration of a run, one dataclass per concept; the CLI's options are generated from their fields.

    TrainConfig      how to train (model, output, optimiser, sizes, kernel backend)
      FinetuneConfig   + the QA files to memorise
      UnlearnConfig    + forget / retain files, ``objective`` (an ObjectiveConfig), ``beliefs`` (a BeliefConfig)
    ObjectiveConfig  the method's loss (docs/math.md, "Objectives")
    BeliefConfig     how BS-S samples its belief set (docs/math.md, "BS-S")

Building a configuration checks each field on its own (an error names the field); ``validate()`` checks the whole run
before any work: the paths first, then the settings (the kernel options and backend through bs_kernels). Neither this
module nor building a configuration imports torch or transformers (bs_kernels is imported by the settings checks,
after the paths), so the CLI parses, converts and refuses a bad path without a heavy import. The data files' contents
are checked where a run reads them, once, before any model is loaded.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import ClassVar

from .models import check_model_path, model_input_path
from .outputs import check_output_dir, check_readable_file

FORGET_OBJECTIVES = ("ga", "bs_t", "npo")
RETAIN_OBJECTIVES = ("nll", "kl")
FORGET_REDUCTIONS = ("token_mean", "sequence_mean", "sum")

# method name -> (forget objective, default retain term). bs-s takes its base forget objective from the config.
METHODS = {
    "ga": ("ga", None),
    "graddiff": ("ga", "nll"),
    "npo": ("npo", "nll"),
    "bs-t": ("bs_t", "nll"),
    "bs-s": ("bs_s", "nll"),
}
DEFAULT_REDUCTION = {"ga": "token_mean", "bs_t": "sequence_mean"}


def _none_or(value: str) -> str | None:
    return None if value == "none" else value


def check_real(name: str, value: object, *, low: float, high: float = math.inf, low_open: bool = False) -> None:
    """Refuse ``value`` unless it is a finite real number in [low, high] ((low, high] with ``low_open``), with an
    error naming ``name``: NaN passes every comparison a plain range check makes, and an infinite lr or weight trains
    a model of NaN weights."""
    is_real = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if is_real and math.isfinite(value) and (value > low if low_open else value >= low) and value <= high:
        return
    if not math.isfinite(low):
        bounds = f"<= {high:g}"
    elif math.isfinite(high):
        bounds = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
    else:
        bounds = f"{'>' if low_open else '>='} {low:g}"
    raise ValueError(f"{name} must be a finite number {bounds}, got {value!r}")


def check_int(name: str, value: object, *, low: int) -> None:
    """Refuse ``value`` unless it is an integer (not a bool, not a float such as NaN) >= ``low``, naming ``name``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


@dataclass(kw_only=True)
class ObjectiveConfig:
    """Settings of one method's loss (defaults: docs/math.md). The CLI's unlearning options are generated from it."""

    method: str = field(default="graddiff", metadata={"help": "unlearning method", "choices": sorted(METHODS)})
    retain_loss: str | None = field(
        default="default",
        metadata={
            "help": "retain term (default: none for ga, nll for the others)",
            "choices": ["default", "none", *RETAIN_OBJECTIVES],
            "parse": _none_or,
        },
    )
    forget_weight: float = field(default=1.0, metadata={"help": "gamma: weight of the forget term"})
    retain_weight: float = field(default=1.0, metadata={"help": "alpha: weight of the retain term"})
    lam: float = field(default=0.2, metadata={"help": "BS-T belief weight lambda"})
    top_k: int = field(default=20, metadata={"help": "BS-T beliefs per position"})
    belief_temperature: float = field(default=1.0, metadata={"help": "BS-T belief temperature"})
    beta: float = field(default=0.1, metadata={"help": "NPO beta"})
    lam_s: float = field(default=0.5, metadata={"help": "BS-S belief-set weight"})
    bs_s_base: str = field(
        default="ga",
        metadata={
            "help": "BS-S base forget loss: ga (the authors' trainer), bs-t (the paper's best), npo",
            "choices": ["ga", "bs-t", "npo"],
            "parse": lambda value: value.replace("-", "_"),
        },
    )
    forget_reduction: str | None = field(
        default=None,
        metadata={
            "help": "forget-term reduction (default: token_mean for ga, sequence_mean for bs-t)",
            "choices": list(FORGET_REDUCTIONS),
        },
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, got {self.method!r}")
        if self.retain_loss == "default":
            self.retain_loss = METHODS[self.method][1]
        if self.retain_loss not in (None, *RETAIN_OBJECTIVES):
            raise ValueError(f"retain_loss must be one of {RETAIN_OBJECTIVES} or None, got {self.retain_loss!r}")
        if self.bs_s_base not in FORGET_OBJECTIVES:
            raise ValueError(f"bs_s_base must be one of {FORGET_OBJECTIVES}, got {self.bs_s_base!r}")
        if self.forget_reduction is not None and self.forget_reduction not in FORGET_REDUCTIONS:
            raise ValueError(f"forget_reduction must be one of {FORGET_REDUCTIONS}, got {self.forget_reduction!r}")
        self.check_values()

    def check_values(self) -> None:
        """The weights, beta and lam_s: finite and in range (lam, top_k and belief_temperature: ``validate``)."""
        check_real("forget_weight", self.forget_weight, low=0.0)
        check_real("retain_weight", self.retain_weight, low=0.0)
        check_real("beta", self.beta, low=0.0, low_open=True)
        check_real("lam_s", self.lam_s, low=0.0, high=1.0)

    def validate(self) -> None:
        """Every value again (a field may have been set after building), then lam, top_k and belief_temperature as
        the loss checks them (bs_kernels, the same messages); a separate step because bs_kernels imports torch, which
        building a configuration must not."""
        self.check_values()
        import bs_kernels

        bs_kernels.check_loss_options(lam=self.lam, top_k=self.top_k, belief_temperature=self.belief_temperature)

    @property
    def forget_objective(self) -> str:
        """The per-sequence-set forget objective (the base objective for bs-s)."""
        name = METHODS[self.method][0]
        return self.bs_s_base if name == "bs_s" else name

    @property
    def needs_reference(self) -> bool:
        return self.forget_objective == "npo" or self.retain_loss == "kl"

    @property
    def uses_beliefs(self) -> bool:
        return self.method == "bs-s"


@dataclass(kw_only=True)
class BeliefConfig:
    """How BS-S samples its belief set (docs/math.md, "BS-S"; defaults from the authors' config)."""

    num_beliefs: int = field(default=3, metadata={"help": "BS-S samples per forget prompt"})
    gen_temperature: float = field(default=1.0, metadata={"help": "BS-S sampling temperature"})
    max_new_tokens: int = field(default=200, metadata={"help": "BS-S belief length limit (new tokens)"})
    gen_batch_size: int = field(default=8, metadata={"help": "prompts per generate call"})
    on_policy: bool = field(default=False, metadata={"help": "BS-S: resample beliefs every --regen-every epochs"})
    regen_every: int = field(default=2, metadata={"help": "on-policy resampling period in epochs"})

    def __post_init__(self) -> None:
        self.check_values()

    def check_values(self) -> None:
        for name in ("num_beliefs", "max_new_tokens", "gen_batch_size", "regen_every"):
            check_int(name, getattr(self, name), low=1)
        check_real("gen_temperature", self.gen_temperature, low=0.0, low_open=True)

    def sample_kwargs(self) -> dict:
        """The keyword arguments of :func:`sample_beliefs` for this configuration."""
        return dict(
            num_samples=self.num_beliefs,
            temperature=self.gen_temperature,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.gen_batch_size,
        )


@dataclass(kw_only=True)
class TrainConfig:
    """Settings shared by fine-tuning and unlearning. The CLI's training options are generated from these fields."""

    model: str = field(
        default="default", metadata={"help": "HF model directory, .gguf file, or 'default' (SmolLM2-135M-Instruct)"}
    )
    output: str | None = field(
        default=None, metadata={"help": "directory to write the model and run.json to (None: nothing is saved)"}
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace an earlier bs-unlearn output there (never another folder)"}
    )
    epochs: float = field(default=3.0, metadata={"help": "training epochs"})
    max_steps: int | None = field(
        default=None, metadata={"help": "stop after this many optimiser steps, >= 1 (default: train for --epochs)"}
    )
    batch_size: int = field(
        default=8, metadata={"help": "per-device batch (unlearning: forget examples, each with one retain partner)"}
    )
    grad_accum: int = field(default=1, metadata={"help": "gradient accumulation steps"})
    lr: float = field(default=1e-4, metadata={"help": "learning rate"})
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler: str = field(default="constant_with_warmup", metadata={"help": "transformers scheduler name"})
    seed: int = 0
    max_length: int = field(default=256, metadata={"help": "tokens per example (prompt + answer)"})
    max_examples_per_file: int | None = field(
        default=None, metadata={"help": "use a seeded random subset of each data file"}
    )
    impl: str = field(default="auto", metadata={"help": "bs_kernels backend: auto, torch, native, triton, reference"})
    fused_linear: bool = field(
        default=True,
        metadata={
            "help": "materialise the [B, T, V] logits for the losses (default: from hidden states and the lm_head "
            "weight in row chunks, wherever bs_kernels.patch_causal_lm supports the model)",
            "flag": "--no-fused-linear",
        },
    )
    logging_steps: int = field(default=1, metadata={"help": "log the averaged metrics every this many steps"})
    progress: bool = field(default=True, metadata={"help": "no progress bar", "flag": "--no-progress"})

    # The fields that name input files (a path or a list of paths); the model is an input too.
    INPUT_FILES: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        """Every check of the run, cheapest first: the paths, then the settings (nothing is loaded or written; an
        error names the field). The CLI calls it before its heavy imports and the run again as it starts; a
        configuration that passed and has not changed since is not checked twice."""
        checked = repr(self)
        if self.__dict__.get("_checked") == checked:
            return
        check_run_paths(type(self), vars(self))
        self.check_settings()
        self.__dict__["_checked"] = checked

    def check_settings(self) -> None:
        for name in ("batch_size", "grad_accum", "max_length", "logging_steps"):
            check_int(name, getattr(self, name), low=1)
        check_int("warmup_steps", self.warmup_steps, low=0)
        check_int("seed", self.seed, low=0)
        steps = self.max_steps
        if steps is not None and (not isinstance(steps, numbers.Integral) or isinstance(steps, bool) or steps < 1):
            raise ValueError(f"max_steps must be >= 1, an integer (leave it out to train for epochs), got {steps!r}")
        # The Trainer ignores the epochs under max_steps, but an infinite or NaN count is still a mistake to refuse.
        check_real("epochs", self.epochs, low=0.0, low_open=self.max_steps is None)
        check_real("lr", self.lr, low=0.0, low_open=True)
        check_real("weight_decay", self.weight_decay, low=0.0)
        if self.max_examples_per_file is not None:
            check_int("max_examples_per_file", self.max_examples_per_file, low=1)
        check_impl_available(self.impl)


def check_impl_available(impl: str) -> None:
    """Refuse, before any model is loaded, an unknown backend or one that cannot run on the device a run uses (e.g.
    ``triton`` on a machine without a GPU), with bs_kernels' reason."""
    import bs_kernels

    bs_kernels.check_loss_options(impl=impl)  # an unknown name
    if impl in ("auto", "reference"):
        return  # auto falls back to what runs; the reference runs everywhere
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the Trainer's choice (use_cpu)
    reason = bs_kernels.unavailable_reason(impl, device)
    if reason is not None:
        raise ValueError(f"impl {impl!r} cannot run here: {reason}")


def _input_files(config_class: type[TrainConfig], values: Mapping[str, object]) -> list[tuple[str, str]]:
    pairs = []
    for name in config_class.INPUT_FILES:
        value = values.get(name)
        pairs += [(name, path) for path in ([value] if isinstance(value, str) else list(value or []))]
    return pairs


def run_inputs(config_class: type[TrainConfig], values: Mapping[str, object]) -> list[str]:
    """The files and folders a run reads (its model and ``config_class.INPUT_FILES``, looked up in ``values``): an
    output may not be one of them or contain one."""
    return [str(model_input_path(values["model"])), *(path for _, path in _input_files(config_class, values))]


def check_run_paths(config_class: type[TrainConfig], values: Mapping[str, object]) -> None:
    """The path checks of a run, cheap enough to come before any heavy import: the input files readable, the model
    path loadable, the output neither an input nor a folder that --overwrite must not replace. ``values``: the
    configuration's fields (``vars(config)``, or ``vars(args)`` of the CLI before a configuration is built)."""
    for name, path in _input_files(config_class, values):
        check_readable_file(path, name)
    check_model_path(values["model"])
    if values.get("output") is not None:
        check_output_dir(
            values["output"], overwrite=bool(values.get("overwrite")), inputs=run_inputs(config_class, values)
        )


@dataclass(kw_only=True)
class FinetuneConfig(TrainConfig):
    """Fine-tune on QA files with the answer NLL (labels -100 on prompts)."""

    data: list[str] = field(default_factory=list, metadata={"help": "QA JSON Lines files (question, answer)"})
    INPUT_FILES: ClassVar[tuple[str, ...]] = ("data",)

    def check_settings(self) -> None:
        if not self.data:
            raise ValueError("data: give at least one QA JSON Lines file")
        super().check_settings()


@dataclass(kw_only=True)
class UnlearnConfig(TrainConfig):
    """Unlearn a forget set: the training settings, the method's loss (``objective``) and BS-S sampling (``beliefs``).

    Defaults: docs/math.md for the loss; lr / epochs / batch from open-unlearning's TOFU recipe.
    """

    forget: str = field(metadata={"help": "forget set, QA JSON Lines"})
    retain: str | None = field(default=None, metadata={"help": "retain set, QA JSON Lines (needed by a retain term)"})
    lr: float = field(default=1e-5, metadata={"help": "learning rate"})
    epochs: float = field(default=5.0, metadata={"help": "training epochs"})
    batch_size: int = field(
        default=4, metadata={"help": "per-device batch (unlearning: forget examples, each with one retain partner)"}
    )
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    beliefs: BeliefConfig = field(default_factory=BeliefConfig)
    INPUT_FILES: ClassVar[tuple[str, ...]] = ("forget", "retain")

    def check_settings(self) -> None:
        if self.objective.retain_loss is not None and self.retain is None:
            method, term = self.objective.method, self.objective.retain_loss
            raise ValueError(f"method {method!r} uses a retain term ({term}): give a retain file")
        super().check_settings()
        self.beliefs.check_values()
        self.objective.validate()
