"""Drop-in use of bs_kernels from other unlearning codebases.

Adapters over ``bs_unlearn.objectives`` and ``bs_unlearn.beliefs``, in the vocabulary of the codebase they plug into.
Plain training loops and TRL-style trainers need no adapter: they call the model-level terms directly,
``bs_unlearn.objectives.bs_t_forget_loss`` / ``answer_logprob_loss`` / ``answer_token_logprobs`` (no [B, T, V] logits).

- ``bs_unlearn.integrations.open_unlearning``: the ``BST`` and ``BSS`` trainers for open-unlearning (same
  constructor arguments and loss values as the method authors' trainers), ``FusedLossMixin`` / ``fused_trainer``
  for open-unlearning trainers that read only ``outputs.loss``, and ``register``.
- ``configs/``: open-unlearning trainer YAML for BST/BSS, accelerate + DeepSpeed ZeRO-3 and FSDP examples.

See docs/integrations.md. Submodules import transformers; this package itself imports nothing heavy.
"""
