"""The thin training driver: two ``transformers.Trainer`` subclasses and the programmatic entry points.

    finetune(FinetuneConfig(...)) -> RunResult   # plain answer NLL: make a model that has memorised a QA set
    unlearn(UnlearnConfig(...), callbacks=[...]) -> RunResult

Everything a Trainer already does (devices, DDP/FSDP/DeepSpeed through accelerate, gradient accumulation, the
optimiser and schedule, progress bars, logging) is left to it. The subclasses only replace ``compute_loss``: the
batch is ``{"forget", "retain"[, "beliefs"]}`` and the loss comes from ``objectives.UnlearnObjective``, built on the
bs_kernels per-token log-probs / BS-T values. Per-step metrics (forget loss, forget log-prob, retain loss, ...) are
averaged over the logging window and across processes and added to the Trainer's log history.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import pathlib
import sys
import time
from dataclasses import dataclass

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

import bs_kernels

from .beliefs import BeliefRefreshCallback, EpochCallback, prompt_ids_of, sample_beliefs
from .config import FinetuneConfig, TrainConfig, UnlearnConfig, run_inputs
from .data import ForgetRetainCollator, ForgetRetainDataset, QACollator, QADataset, read_qa_records, tokenize_dataset
from .fused import fused_supported
from .loss_guard import StopOnNonFiniteLoss
from .models import add_transformers4_keys, load_model_and_tokenizer
from .objectives import UnlearnObjective, answer_mask, answer_token_logprobs, nll_loss
from .outputs import atomic_output_dir, is_main_process, scratch_dir
from .step_timing import StepTimer

RUN_FILE = "run.json"


@dataclass
class RunResult:
    """What a run produced: the trained model/tokenizer, the Trainer's log history and a short summary."""

    model: torch.nn.Module
    tokenizer: object
    log_history: list[dict]
    summary: dict
    output_dir: pathlib.Path | None = None
    trainer: Trainer | None = None


def release_training_state(result: RunResult) -> None:
    """Free what a finished run holds besides its model: the optimizer's state (twice the parameters with AdamW), the
    schedule, the frozen reference model (NPO, KL) and the trainer itself. For pipelines that keep only the model;
    the trainer's reference cycles would otherwise keep them until a garbage collection happens to run."""
    trainer = result.trainer
    if trainer is not None:
        trainer.optimizer = trainer.lr_scheduler = None
        if hasattr(trainer, "ref_model"):
            trainer.ref_model = None
        trainer.accelerator.free_memory()  # its references to the prepared optimizer and schedule
        result.trainer = None
    gc.collect()


class ProgressLines(TrainerCallback):
    """Prints one line (``say``) at the first step after every ``seconds`` of training: step, of how many, the
    last logged loss. For runs with the progress bar off, so no stage is silent for long."""

    def __init__(self, say, *, prefix: str = "", seconds: float = 20.0) -> None:
        self.say = say
        self.prefix = prefix
        self.seconds = seconds
        self._last = time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if time.perf_counter() - self._last >= self.seconds:
            self._last = time.perf_counter()
            self.say(f"{self.prefix}step {state.global_step}/{state.max_steps}")


class _MetricsMixin:
    """Averages the per-micro-batch metrics that compute_loss records and adds them to each log entry."""

    def _record(self, metrics: dict[str, float]) -> None:
        sums = self.__dict__.setdefault("_metric_sums", {})
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + value
        self._metric_count = self.__dict__.get("_metric_count", 0) + 1

    def _loss_span(self):
        """The loss's timing span of a StepTimer among the callbacks (a no-op without one)."""
        for callback in self.callback_handler.callbacks:
            if isinstance(callback, StepTimer):
                return callback.loss_span()
        return contextlib.nullcontext()

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        sums = self.__dict__.get("_metric_sums")
        if sums and "loss" in logs:
            keys = sorted(sums)
            means = torch.tensor([sums[k] / self._metric_count for k in keys], device=self.args.device)
            means = self.accelerator.reduce(means, reduction="mean")  # every process logs the same numbers
            logs.update({key: round(float(value), 6) for key, value in zip(keys, means.tolist())})
            self._metric_sums, self._metric_count = {}, 0
        super().log(logs, *args, **kwargs)


class FinetuneTrainer(_MetricsMixin, Trainer):
    """Answer NLL from bs_kernels.forget_logprobs (token mean over answer tokens)."""

    def __init__(self, *args, impl: str = "auto", fused_linear: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.impl = impl
        self.fused_linear = fused_linear
        self.loss_is_scaled_for_ga = False  # a per-micro-batch mean: let the Trainer divide by accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._loss_span():
            token_logprobs = answer_token_logprobs(model, inputs, impl=self.impl, fused=self.fused_linear)
            loss = nll_loss(token_logprobs, answer_mask(inputs["labels"]))
        self._record({"answer_logprob": -float(loss.detach())})
        return (loss, None) if return_outputs else loss


class UnlearnTrainer(_MetricsMixin, Trainer):
    """compute_loss = objectives.UnlearnObjective on ``{"forget", "retain"[, "beliefs"]}`` batches."""

    def __init__(self, *args, objective: UnlearnObjective, ref_model=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.objective = objective
        self.ref_model = ref_model
        if ref_model is not None:
            self.ref_model = ref_model.to(self.args.device).eval().requires_grad_(False)
        self.loss_is_scaled_for_ga = False

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._loss_span():
            loss, metrics = self.objective(model, inputs, self.ref_model)
        self._record(metrics)
        return (loss, None) if return_outputs else loss


def _training_arguments(config: TrainConfig, work_dir: pathlib.Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(work_dir),
        per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps if config.max_steps is not None else -1,  # -1: the Trainer's "use the epochs"
        logging_steps=config.logging_steps,
        logging_nan_inf_filter=False,  # a NaN loss is logged as NaN, for StopOnNonFiniteLoss to stop the run
        save_strategy="no",
        report_to=[],
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        disable_tqdm=not config.progress,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        optim="adamw_torch",
        ddp_find_unused_parameters=False,  # every parameter takes part in every loss term
    )


def _summary(kind: str, config: TrainConfig, trainer: Trainer, seconds: float) -> dict:
    steps = [entry for entry in trainer.state.log_history if "loss" in entry]
    summary = {"command": kind, "steps": trainer.state.global_step, "seconds": round(seconds, 1)}
    # Whether the losses ran without materialised logits: asked for and the model's architecture supports it.
    summary["fused_linear"] = config.fused_linear and fused_supported(trainer.model)
    for key in ("loss", "forget_logprob", "retain_loss", "belief_logprob", "answer_logprob"):
        values = [entry[key] for entry in steps if key in entry]
        if values:
            summary[f"{key}_first"], summary[f"{key}_last"] = values[0], values[-1]
    return summary


def _run(kind: str, config: TrainConfig, build, callbacks) -> RunResult:
    """Shared skeleton: stage the output, build the trainer, train, save model + run.json atomically.

    The Trainer's own working directory is a per-process scratch folder (it writes nothing there with
    save_strategy="no"); only the main process touches the staging directory of the output.
    """
    main = is_main_process()
    staging_context = (
        atomic_output_dir(
            config.output,
            overwrite=config.overwrite,
            main_process=main,
            inputs=run_inputs(type(config), vars(config)),
        )
        if config.output is not None
        else contextlib.nullcontext(None)
    )
    with scratch_dir() as scratch:
        with staging_context as staging:
            args = _training_arguments(config, scratch)
            set_seed(config.seed)
            trainer = build(args, [StopOnNonFiniteLoss(), *(callbacks or [])])
            start = time.perf_counter()
            trainer.train()
            seconds = time.perf_counter() - start
            summary = _summary(kind, config, trainer, seconds)
            if staging is not None:
                trainer.save_model(str(staging))
                if main:
                    add_transformers4_keys(staging)
                    record = {
                        "command": kind,
                        "config": dataclasses.asdict(config),
                        "summary": summary,
                        "log_history": trainer.state.log_history,
                        "versions": _versions(),
                        "world_size": trainer.args.world_size,
                    }
                    (staging / RUN_FILE).write_text(json.dumps(record, indent=2) + "\n")
                trainer.accelerator.wait_for_everyone()
    if config.output is not None:
        trainer.accelerator.wait_for_everyone()  # the rename is done before any process returns
    model = trainer.accelerator.unwrap_model(trainer.model)
    output_dir = pathlib.Path(config.output).expanduser() if config.output is not None else None
    return RunResult(model, trainer.processing_class, trainer.state.log_history, summary, output_dir, trainer)


def _versions() -> dict[str, str]:
    import transformers

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "bs_kernels": bs_kernels.__version__,
    }


def _read_records(path: str, config: TrainConfig) -> list[dict]:
    """A data file's records (its seeded subset with ``max_examples_per_file``): read and checked once, before any
    model is loaded, so a bad line is reported first."""
    return read_qa_records(path, max_examples=config.max_examples_per_file, seed=config.seed)


def _tokenized(records: list[dict], tokenizer, config: TrainConfig) -> list[dict]:
    columns = {"question": [r["question"] for r in records], "answer": [r["answer"] for r in records]}
    return tokenize_dataset(columns, tokenizer, max_length=config.max_length)


def finetune(config: FinetuneConfig, *, callbacks: list[TrainerCallback] | None = None, model=None, tokenizer=None):
    """Fine-tune ``config.model`` (or the given model/tokenizer) on ``config.data``; returns a RunResult."""

    def build(args, extra_callbacks):
        nonlocal model, tokenizer
        if model is None:
            model, tokenizer = load_model_and_tokenizer(config.model)
        examples = [example for records in data for example in _tokenized(records, tokenizer, config)]
        return FinetuneTrainer(
            model=model,
            args=args,
            train_dataset=QADataset(examples),
            data_collator=QACollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=extra_callbacks,
            impl=config.impl,
            fused_linear=config.fused_linear,
        )

    config.validate()
    data = [_read_records(path, config) for path in config.data]
    return _run("finetune", config, build, callbacks)


def unlearn(config: UnlearnConfig, *, callbacks: list[TrainerCallback] | None = None, model=None, tokenizer=None):
    """Unlearn ``config.forget`` from ``config.model`` (or the given model/tokenizer); returns a RunResult.

    ``callbacks``: extra TrainerCallbacks (e.g. an evaluation probe); they receive ``model`` in their events.
    """
    objective_config = config.objective

    def build(args, extra_callbacks):
        nonlocal model, tokenizer
        if model is None:
            model, tokenizer = load_model_and_tokenizer(config.model)
        forget = _tokenized(forget_records, tokenizer, config)
        retain = _tokenized(retain_records, tokenizer, config) if retain_records is not None else None
        dataset = ForgetRetainDataset(forget, retain, seed=config.seed)
        trainer_callbacks = [EpochCallback(dataset), *extra_callbacks]
        if objective_config.uses_beliefs:
            model.to(args.device)  # also sets up the process group, so sampling can be sharded across processes
            prompts = [prompt_ids_of(example) for example in forget]
            sample_kwargs = config.beliefs.sample_kwargs()

            def resample(current_model) -> None:
                dataset.set_beliefs(
                    sample_beliefs(
                        current_model, tokenizer, prompts, answer_labels=forget[0]["labels"], **sample_kwargs
                    )
                )

            resample(model)
            if config.beliefs.on_policy:
                trainer_callbacks.append(BeliefRefreshCallback(resample, every=config.beliefs.regen_every))
        ref_model = copy.deepcopy(model) if objective_config.needs_reference else None
        return UnlearnTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=ForgetRetainCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
            callbacks=trainer_callbacks,
            objective=UnlearnObjective(objective_config, impl=config.impl, fused_linear=config.fused_linear),
            ref_model=ref_model,
        )

    config.validate()
    forget_records = _read_records(config.forget, config)
    # No retain term: batches carry the forget set only, and a retain file is not read.
    uses_retain = config.retain is not None and objective_config.retain_loss is not None
    retain_records = _read_records(config.retain, config) if uses_retain else None
    return _run("unlearn", config, build, callbacks)
