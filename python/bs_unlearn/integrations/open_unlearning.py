"""Drop-in BS-T / BS-S trainers for open-unlearning (locuslab/open-unlearning), computed with bs_kernels.

Registration (two lines in open-unlearning's ``src/trainer/__init__.py``, beside the other ``_register_trainer``):

    from bs_unlearn.integrations.open_unlearning import BSS, BST
    _register_trainer(BST); _register_trainer(BSS)

then ``trainer=BST`` with the YAML in ``bs_unlearn/integrations/configs/``. The classes take the method authors'
constructor arguments (their fork of open-unlearning) and return the same loss values:

    BST(lambda_bst=0.5, bst_mode="token", detach_mode="yes", top_k=20, *args, gamma=1.0, alpha=1.0,
        retain_loss_type="NLL", **trainer_kwargs)
        loss = gamma * forget_loss + alpha * retain_loss
        forget_loss = mean over sequences of the mean over answer tokens of <t, log pi>,
                      t = lambda_bst * softmax(top-k logits) + (1 - lambda_bst) * one_hot(label)   (authors: -CE(t))
        retain_loss = NLL (token mean) or KL(pi_ref || pi_theta) averaged over all B*T positions (open-unlearning's
                      compute_kl_divergence, "batchmean" over the flattened rows)
    BSS(lambda_bss=0.5, n_samples=3, temperature=1.0, regeneration_epochs=2, *args, **BST_kwargs)
        forget_loss = (1 - lambda_bss) * L(forget) + lambda_bss * L(beliefs), L = GA (the authors' base,
                      mean log p over tokens) or BS-T (bss_base="BST", the paper's best configuration)

Where the authors' code and these classes differ (on purpose):
- The forget term and the NLL retain term never materialise the [B, T, V] logits (``bs_unlearn.objectives``' model
  terms); the values are equal.
- A batch whose sequences have no answer token gives a forget term of 0, not NaN (docs/math.md, "Reductions").
- BSS samples beliefs for the whole forget set when training starts (off-policy) and resamples the whole set from
  the current model every ``regeneration_epochs`` epochs (on-policy), as the paper describes; the authors' code
  regenerates only for the micro-batch current at that step. ``regeneration_epochs=0`` (or None) is off-policy.
- BSS samples by pure temperature sampling over the whole vocabulary (top_k 0, top_p 1), where the authors' call
  leaves top-k / top-p to the model's generation config (generate's top-50, Llama-3-Instruct's top_p 0.9): the
  belief set is then the model's distribution at ``temperature`` whatever checkpoint files ship, and the same as
  the package's own driver samples (``bs_unlearn.beliefs.sample_beliefs``).
- The KL retain term still needs both models' logits (the reference model's distribution is the target); it is
  computed row chunk by row chunk (``objectives.kl_loss``), so only its log-softmax temporaries are saved.

When open-unlearning is importable (its ``src/`` on ``sys.path``, package name ``trainer``) the classes subclass its
``GradDiff``; otherwise :class:`GradDiff` below, the same trainer on plain ``transformers.Trainer``.
"""

from __future__ import annotations

import copy
import logging
import numbers
import warnings
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from transformers import Trainer

import bs_kernels
from bs_kernels import IGNORE_INDEX

from ..beliefs import BeliefRefreshCallback, prompt_of, sample_beliefs
from ..data import end_of_turn_ids, pad_examples
from ..objectives import answer_logprob_loss, bs_t_forget_loss, fused_labelled_calls, kl_loss, logits_of

__all__ = ["BSS", "BST", "FusedLossMixin", "GradDiff", "OPEN_UNLEARNING_AVAILABLE", "fused_trainer", "register"]

logger = logging.getLogger(__name__)


def _open_unlearning_graddiff():
    """open-unlearning's GradDiff class, or None when its ``trainer`` package is not importable."""
    try:
        from trainer.unlearn.grad_diff import GradDiff as open_unlearning_graddiff
    except ImportError:
        return None
    return open_unlearning_graddiff


def _retain_loss_type_check(retain_loss_type: object) -> None:
    if retain_loss_type not in ("NLL", "KL"):
        raise ValueError(f'retain_loss_type must be "NLL" or "KL", got {retain_loss_type!r}')


def _is_number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_count(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_bst_arguments(lambda_bst, bst_mode, detach_mode, top_k, impl, retain_loss_type) -> None:
    """The BST arguments checked under the names the caller wrote (the YAML's method_args)."""
    if not _is_number(lambda_bst) or not 0.0 <= float(lambda_bst) <= 1.0:
        raise ValueError(f"lambda_bst must be a number in [0, 1], got {lambda_bst!r}")
    if bst_mode != "token":
        raise ValueError(f'bst_mode must be "token" (sequence-level beliefs are the BSS trainer), got {bst_mode!r}')
    if detach_mode not in _DETACH_MODES:
        raise ValueError(f'detach_mode must be "yes" or "no" (quote it in YAML), got {detach_mode!r}')
    if not _is_count(top_k) or top_k < 1:
        raise ValueError(f"top_k must be an int >= 1, got {top_k!r}")
    _retain_loss_type_check(retain_loss_type)
    bs_kernels.BSTokenLoss(impl=impl)  # an unknown impl is refused with bs_kernels' message, which names impl


class GradDiffOnTrainer(Trainer):
    """open-unlearning's GradDiff on plain ``transformers.Trainer`` (used when open-unlearning is not importable).

    Same constructor and loss: ``gamma * (-NLL(forget)) + alpha * retain``, retain = NLL or open-unlearning's KL
    (``kl_div(log_softmax(theta), log_softmax(ref), "batchmean", log_target=True)`` over all B*T rows). The stock
    computation over materialised logits: the baseline the fused trainers are compared with.
    ``evaluators`` / ``template_args`` (passed by open-unlearning's ``load_trainer``) are kept as attributes.
    """

    def __init__(
        self, gamma=1.0, alpha=1.0, retain_loss_type="NLL", *args, evaluators=None, template_args=None, **kwargs
    ):
        _retain_loss_type_check(retain_loss_type)
        super().__init__(*args, **kwargs)
        self.evaluators = evaluators
        self.template_args = template_args
        self.gamma = gamma
        self.alpha = alpha
        self.retain_loss_type = retain_loss_type
        self.ref_model = None
        if retain_loss_type == "KL":
            self.ref_model = self._prepare_ref_model(self.model)
        # compute_loss returns a per-micro-batch mean: the Trainer divides it by the accumulation steps.
        self.loss_is_scaled_for_ga = False

    def _prepare_ref_model(self, model):
        ref_model = copy.deepcopy(model).to(self.accelerator.device)
        ref_model.eval().requires_grad_(False)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def compute_retain_loss(self, model, retain_inputs):
        if self.retain_loss_type == "NLL":
            return model(**retain_inputs).loss
        with torch.no_grad():
            ref_logits = self.ref_model(**retain_inputs).logits
        logits = model(**retain_inputs).logits
        vocab_size = logits.shape[-1]
        return F.kl_div(
            F.log_softmax(logits, dim=-1).view(-1, vocab_size),
            F.log_softmax(ref_logits, dim=-1).view(-1, vocab_size),
            reduction="batchmean",
            log_target=True,
        )

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        forget_outputs = model(**_forward_inputs(inputs["forget"]))
        forget_loss = -forget_outputs.loss
        retain_loss = self.compute_retain_loss(model, _forward_inputs(inputs["retain"]))
        loss = self.gamma * forget_loss + self.alpha * retain_loss
        return (loss, forget_outputs) if return_outputs else loss


_OPEN_UNLEARNING_GRADDIFF = _open_unlearning_graddiff()
OPEN_UNLEARNING_AVAILABLE = _OPEN_UNLEARNING_GRADDIFF is not None
# The base of BST/BSS: open-unlearning's own GradDiff when importable, else the same trainer on transformers.Trainer.
GradDiff = _OPEN_UNLEARNING_GRADDIFF if OPEN_UNLEARNING_AVAILABLE else GradDiffOnTrainer


def _forward_inputs(batch: dict) -> dict:
    """input_ids, attention_mask, labels of a sub-batch (open-unlearning's batches may carry more keys)."""
    return {key: batch[key] for key in ("input_ids", "attention_mask", "labels") if key in batch}


_DETACH_MODES = {"yes": True, "no": False}


class BST(GradDiff):
    """BS-T on GradDiff: the authors' ``BST`` trainer with the forget and NLL retain terms computed by bs_kernels.

    Args (the authors' names and defaults; gamma, alpha, retain_loss_type go to GradDiff):
        lambda_bst: weight of the model's top-k belief distribution in the soft target (the paper's lambda).
        bst_mode: "token" (BS-T; the only token-level mode).
        detach_mode: "yes" stops the gradient through the belief distribution (the paper's choice), "no" lets it flow.
        top_k: number of beliefs per position.
        impl: bs_kernels backend ("auto", "torch", "native", "triton").
    """

    def __init__(self, lambda_bst=0.5, bst_mode="token", detach_mode="yes", top_k=20, *args, impl="auto", **kwargs):
        # Checked before the (slow) Trainer set-up, in the names of the caller's configuration.
        _check_bst_arguments(lambda_bst, bst_mode, detach_mode, top_k, impl, kwargs.get("retain_loss_type", "NLL"))
        super().__init__(*args, **kwargs)
        self.warned_no_answer_tokens = False
        self.lambda_bst = float(lambda_bst)
        self.bst_mode = bst_mode
        self.detach_mode = detach_mode
        self.top_k = top_k
        self.impl = impl
        self.loss_is_scaled_for_ga = False

    def warn_if_no_answer_tokens(self, forget_inputs: dict) -> None:
        """Warns once per trainer when a forget batch has no answer token (its forget term is then 0, not the
        authors' NaN): usually prompts truncated to ``max_length`` or a chat template that swallows the answer."""
        if self.warned_no_answer_tokens:
            return
        if not bool((forget_inputs["labels"][..., 1:] != IGNORE_INDEX).any()):
            self.warned_no_answer_tokens = True
            warnings.warn(
                "a forget batch holds no answer token (every label is -100): its forget term is 0 (the authors' "
                "trainer gives NaN); check max_length and the template_args (warned once)",
                RuntimeWarning,
                stacklevel=3,
            )

    def compute_forget_loss(self, model, forget_inputs: dict) -> torch.Tensor:
        """The BS-T term of one sub-batch: mean over sequences of the per-sequence mean <t, log pi> (<= 0)."""
        self.warn_if_no_answer_tokens(forget_inputs)
        return bs_t_forget_loss(
            model,
            forget_inputs,
            lam=self.lambda_bst,
            top_k=self.top_k,
            detach_belief=_DETACH_MODES[self.detach_mode],
            reduction="sequence_mean",
            impl=self.impl,
        )

    def compute_retain_loss(self, model, retain_inputs):
        if self.retain_loss_type == "NLL":
            return -answer_logprob_loss(model, retain_inputs, impl=self.impl)
        if self.retain_loss_type == "KL":
            return _batchmean_kl(model, self.ref_model, retain_inputs)
        raise ValueError(f'retain_loss_type must be "NLL" or "KL", got {self.retain_loss_type!r}')

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        forget_loss = self.compute_forget_loss(model, inputs["forget"])
        loss = self.gamma * forget_loss
        if "retain" in inputs:
            loss = loss + self.alpha * self.compute_retain_loss(model, _forward_inputs(inputs["retain"]))
        elif self.alpha != 0:
            raise ValueError(f"alpha={self.alpha} weights a retain term, but the batch has no 'retain' part")
        # There are no forget logits to return (they never existed); the Trainer's evaluation uses its own loss.
        return (loss, None) if return_outputs else loss


def _batchmean_kl(model, ref_model, batch: dict) -> torch.Tensor:
    """open-unlearning's KL retain term: sum over all B*T rows of KL(pi_ref || pi_theta), divided by B*T."""
    if ref_model is None:
        raise ValueError('retain_loss_type="KL" needs the reference model (created by GradDiff for "KL")')
    with torch.no_grad():
        ref_logits = logits_of(ref_model, batch)
    return kl_loss(logits_of(model, batch), ref_logits)


class BSS(BST):
    """BS-S: the forget term also suppresses the model's own sampled answers (beliefs) to each forget prompt.

    Args (the authors' names and defaults, then BST's):
        lambda_bss: weight of the belief set in the forget term, (1 - lambda_bss) * L(forget) + lambda_bss * L(beliefs).
        n_samples: beliefs sampled per forget prompt.
        temperature: sampling temperature.
        regeneration_epochs: resample the whole belief set from the current model every this many epochs (on-policy);
            0 or None samples once from the initial model (off-policy).
        bss_base: "GA" (the authors' trainer: L = mean log p over tokens) or "BST" (L = the BS-T term, with BST's
            lambda_bst, top_k, detach_mode).
        max_new_tokens, generation_batch_size: belief sampling limits (docs/math.md, "BS-S": up to 200 new tokens).

    The belief set is keyed by prompt tokens, so any open-unlearning collator works: each forget row of a batch
    brings the beliefs sampled for its prompt. A prompt not in the set (e.g. ``compute_loss`` called outside
    ``train()``) is sampled on first use in a single-process run.
    """

    def __init__(
        self,
        lambda_bss=0.5,
        n_samples=3,
        temperature=1.0,
        regeneration_epochs=2,
        *args,
        bss_base="GA",
        max_new_tokens=200,
        generation_batch_size=8,
        **kwargs,
    ):
        if not _is_number(lambda_bss) or not 0.0 <= float(lambda_bss) <= 1.0:
            raise ValueError(f"lambda_bss must be a number in [0, 1], got {lambda_bss!r}")
        if not _is_count(n_samples) or n_samples < 1:
            raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
        if not _is_number(temperature) or temperature <= 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        if regeneration_epochs is not None and (not _is_count(regeneration_epochs) or regeneration_epochs < 0):
            raise ValueError(f"regeneration_epochs must be an int >= 0 or None, got {regeneration_epochs!r}")
        if bss_base not in ("GA", "BST"):
            raise ValueError(f'bss_base must be "GA" or "BST", got {bss_base!r}')
        for name, value in (("max_new_tokens", max_new_tokens), ("generation_batch_size", generation_batch_size)):
            if not _is_count(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        super().__init__(*args, **kwargs)
        self.lambda_bss = float(lambda_bss)
        self.n_samples = n_samples
        self.temperature = float(temperature)
        self.regeneration_epochs = regeneration_epochs or 0
        self.bss_base = bss_base
        self.max_new_tokens = max_new_tokens
        self.generation_batch_size = generation_batch_size
        self.beliefs: dict[tuple[int, ...], list[dict[str, list[int]]]] = {}
        # One entry per sampling call: {"epoch", "step", "prompts", "on_demand"} (also logged as bss_* metrics).
        self.sampling_calls: list[dict] = []
        self.belief_schedule = BeliefRefreshCallback(self._resample_all, every=self.regeneration_epochs, at_start=True)
        self.add_callback(self.belief_schedule)

    @property
    def sampled_at_epochs(self) -> list[int]:
        """The epochs at whose start the whole belief set was (re)sampled."""
        return self.belief_schedule.refreshed_at

    # -- the belief set ------------------------------------------------------------------------------------------

    @property
    def _tokenizer(self):
        tokenizer = getattr(self, "processing_class", None) or getattr(self, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("BSS samples beliefs with the tokenizer: pass processing_class= (or tokenizer=)")
        return tokenizer

    def _sample(self, model, prompts: list[tuple[int, ...]], answer_labels, *, on_demand: bool) -> None:
        """Beliefs for ``prompts``; ``answer_labels``: one forget example's labels (what follows its end-of-turn
        token follows every belief that stopped, as in the driver)."""
        sampled = sample_beliefs(
            model,
            self._tokenizer,
            [list(prompt) for prompt in prompts],
            answer_labels=answer_labels,
            num_samples=self.n_samples,
            temperature=self.temperature,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.generation_batch_size,
        )
        self.beliefs.update(zip(prompts, sampled))
        epoch = round(self.state.epoch or 0)
        call = {"epoch": epoch, "step": self.state.global_step, "prompts": len(prompts), "on_demand": on_demand}
        self.sampling_calls.append(call)
        logger.info(
            "BSS sampled %d beliefs for %d forget prompts (%s)",
            len(prompts) * self.n_samples,
            len(prompts),
            "on demand" if on_demand else f"belief set, epoch {epoch}",
        )
        # In the Trainer's log history (trainer_state.json) too, so a run shows when its belief set was sampled.
        self.log({"bss_sampled_prompts": float(len(prompts)), "bss_sampled_on_demand": float(on_demand)})

    def _forget_examples(self) -> Iterator[dict]:
        """The training set's forget examples (open-unlearning's ``ForgetRetainDataset`` exposes them as
        ``.forget``; any dataset whose items have a ``"forget"`` example works); none without a training set."""
        dataset = self.train_dataset
        if dataset is None:
            return iter(())
        forget = getattr(dataset, "forget", None)
        if forget is None:
            return (dataset[index]["forget"] for index in range(len(dataset)))
        return (forget[index] for index in range(len(forget)))

    def forget_prompts(self) -> list[tuple[int, ...]]:
        """The distinct prompts of the training set's forget examples."""
        prompts = {}
        for example in self._forget_examples():
            prompts[prompt_of(example["input_ids"], example["labels"], example.get("attention_mask"))] = None
        return list(prompts)

    def _resample_all(self, model) -> bool:
        prompts = self.forget_prompts()
        if not prompts:
            return False
        self.beliefs = {}
        answer_labels = next(self._forget_examples())["labels"]
        self._sample(model if model is not None else self.model, prompts, answer_labels, on_demand=False)
        return True

    def refresh_beliefs_for_epoch(self, epoch: int, model) -> None:
        """Epoch 0: sample the whole set; epoch e > 0: resample it when regeneration_epochs divides e."""
        self.belief_schedule.refresh_if_due(epoch, model)

    def belief_batch(self, model, forget_inputs: dict) -> dict[str, torch.Tensor]:
        """The beliefs of the batch's forget prompts, right-padded: ``input_ids``, ``attention_mask``, ``labels``."""
        masks = forget_inputs.get("attention_mask")
        prompts = [
            prompt_of(ids, labels, None if masks is None else masks[row])
            for row, (ids, labels) in enumerate(zip(forget_inputs["input_ids"], forget_inputs["labels"]))
        ]
        missing = list(dict.fromkeys(prompt for prompt in prompts if prompt not in self.beliefs))
        if missing:
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Processes see different batches, so on-demand sampling (a collective) cannot line up.
                raise RuntimeError(
                    f"{len(missing)} forget prompt(s) of this batch have no beliefs; in a distributed run the belief "
                    "set must be sampled before training (train_dataset must expose the forget examples)"
                )
            self._sample(model, missing, forget_inputs["labels"][0], on_demand=True)
        tokenizer = self._tokenizer
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_ids(tokenizer)[0]
        batch = pad_examples([belief for prompt in prompts for belief in self.beliefs[prompt]], pad_id)
        device = forget_inputs["input_ids"].device
        return {key: value.to(device) for key, value in batch.items()}

    # -- the loss ------------------------------------------------------------------------------------------------

    def _base_loss(self, model, batch: dict) -> torch.Tensor:
        if self.bss_base == "BST":
            return BST.compute_forget_loss(self, model, batch)
        return answer_logprob_loss(model, batch, impl=self.impl)  # open-unlearning's GA term, -model(**batch).loss

    def compute_forget_loss(self, model, forget_inputs: dict) -> torch.Tensor:
        self.warn_if_no_answer_tokens(forget_inputs)
        beliefs = self.belief_batch(model, forget_inputs)
        forget_loss = self._base_loss(model, _forward_inputs(forget_inputs))
        belief_loss = self._base_loss(model, beliefs)
        return (1.0 - self.lambda_bss) * forget_loss + self.lambda_bss * belief_loss


# -- any open-unlearning trainer ----------------------------------------------------------------------------------


class FusedLossMixin:
    """Put first in the bases of an open-unlearning trainer: every labelled ``model(**batch)`` call inside its
    ``compute_loss`` returns the stock NLL computed without logits (same value and gradients; ``logits`` None).

        class FusedGradDiff(FusedLossMixin, GradDiff): ...        # or: FusedGradDiff = fused_trainer(GradDiff)

    Covers trainers that read only ``outputs.loss`` of their labelled calls: GradAscent and GradDiff with the NLL
    retain term (forget term ``-model(**forget).loss`` and retain term ``model(**retain).loss`` both fused). Trainers
    that read ``outputs.logits`` (NPO, SimNPO, WGA, UNDIAL, the KL retain term) need a compute_loss written with
    ``fused.answer_token_logprobs`` / ``fused.bs_t_forget_loss`` instead (see docs/integrations.md).
    """

    fused_impl = "auto"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if getattr(self, "retain_loss_type", None) == "KL":
            raise ValueError(
                'FusedLossMixin cannot fuse retain_loss_type="KL": the KL term reads both models\' logits; use BST '
                "(or the unfused trainer) for KL"
            )

    def compute_loss(self, model, inputs, *args, **kwargs):
        with fused_labelled_calls(model, impl=self.fused_impl):
            return super().compute_loss(model, inputs, *args, **kwargs)


def fused_trainer(trainer_class: type) -> type:
    """``FusedX = fused_trainer(X)``: the trainer class X with :class:`FusedLossMixin` in front of it."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"trainer_class must be a transformers.Trainer subclass, got {trainer_class!r}")
    return type(f"Fused{trainer_class.__name__}", (FusedLossMixin, trainer_class), {"__module__": __name__})


def register(registry: dict | None = None) -> dict:
    """Add BST and BSS to open-unlearning's ``TRAINER_REGISTRY`` (or to ``registry``); returns the registry."""
    if registry is None:
        from trainer import TRAINER_REGISTRY as registry  # open-unlearning's src/trainer/__init__.py
    for trainer_class in (BST, BSS):
        registry[trainer_class.__name__] = trainer_class
    return registry
