"""Drop-in use of bs_kernels from other unlearning codebases.

- ``bs_unlearn.integrations.fused``: loss terms of a Hugging Face causal LM computed without its [B, T, V] logits
  (BS-T forget term, answer log-probs / NLL), for plain training loops and TRL-style trainers.
- ``bs_unlearn.integrations.open_unlearning``: the ``BST`` and ``BSS`` trainers for open-unlearning (same
  constructor arguments and loss values as the method authors' trainers), ``FusedLossMixin`` / ``fused_trainer``
  for open-unlearning trainers that read only ``outputs.loss``, and ``register``.
- ``configs/``: open-unlearning trainer YAML for BST/BSS, accelerate + DeepSpeed ZeRO-3 and FSDP examples.

See docs/integrations.md. Submodules import transformers; this package itself imports nothing heavy.
"""
