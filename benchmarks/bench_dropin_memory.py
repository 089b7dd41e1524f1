"""Peak memory of one unlearning training step: the authors' BST trainer loss vs the bs_unlearn drop-in.

Same model (a Llama built from a config, random weights, float32), same batch, same optimiser; only the loss
computation differs:
  original  the method authors' BST + GradDiff loss over materialised logits: logits = model(**forget).logits,
            top-k -> softmax -> soft target lam*q + (1-lam)*one_hot -> -(t * log_softmax).sum -> per-sequence mean
            -> forget_loss = -mean; retain_loss = model(**retain).loss (transformers' NLL)
  dropin    bs_unlearn.integrations.open_unlearning.BST(...).compute_loss (fused lm_head + BS-T, fused NLL)
  graddiff  open-unlearning's GradDiff (forget -model(**forget).loss + retain NLL), stock   } the generic mixin,
  fused_graddiff  fused_trainer(GradDiff): the same loss with both terms fused              } for reference

Each variant runs in a fresh process (harness.peak_memory): build model + batch + AdamW, one warm-up step
(allocates the optimiser state and any lazy buffers), reset the peak RSS, then one measured step (zero_grad, loss,
backward, optimiser step). Reported: peak RSS during the measured step, its excess over the RSS before it, and the
step's wall time. CPU only here; on a GPU harness.peak_memory reads torch.cuda.max_memory_allocated instead.

    python benchmarks/bench_dropin_memory.py                          # all variants, Markdown table
    python benchmarks/bench_dropin_memory.py --variants original,dropin
    python benchmarks/bench_dropin_memory.py --vocab 512 --hidden 64 --intermediate 128 --layers 1 --heads 4 \
        --kv-heads 2 --batch 1 --length 32                            # a check that it runs
"""

from __future__ import annotations

import argparse
import tempfile

from harness import GIB, Bench, markdown_table, peak_memory

VARIANTS = ("original", "dropin", "graddiff", "fused_graddiff")


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.length),
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).float()
    generator = torch.Generator().manual_seed(0)

    def part():
        input_ids = torch.randint(0, args.vocab, (args.batch, args.length), generator=generator)
        labels = input_ids.clone()
        labels[:, : args.length // 4] = -100  # the prompt
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}

    return model, {"forget": part(), "retain": part()}


def authors_bst_loss(model, inputs, *, lambda_bst: float, top_k: int):
    """The authors' BST trainer loss (gamma = alpha = 1, detach_mode="yes", retain NLL) over materialised logits."""
    import torch
    import torch.nn.functional as F

    forget = inputs["forget"]
    logits = model(**forget).logits
    shift_logits = logits[..., :-1, :].contiguous()
    shift_labels = forget["labels"][..., 1:].contiguous()
    topk_values, topk_ids = shift_logits.topk(top_k, dim=-1)
    belief = F.softmax(topk_values, dim=-1).detach()
    soft_target = torch.zeros_like(shift_logits).scatter(-1, topk_ids, lambda_bst * belief)
    valid = shift_labels != -100
    one_hot = F.one_hot(shift_labels.clamp(min=0), shift_logits.shape[-1]).to(shift_logits.dtype)
    soft_target = soft_target + (1.0 - lambda_bst) * one_hot * valid.unsqueeze(-1)
    token_loss = -(soft_target * F.log_softmax(shift_logits, dim=-1)).sum(-1)
    forget_loss = -((token_loss * valid).sum(-1) / valid.sum(-1)).mean()
    return forget_loss + model(**inputs["retain"]).loss


def variant_bench(**settings) -> Bench:
    """One training step of ``settings["variant"]``: what harness.peak_memory runs in a fresh process."""
    import torch
    from bs_unlearn.integrations.open_unlearning import BST, GradDiffOnTrainer, fused_trainer
    from transformers import TrainingArguments

    args = argparse.Namespace(**settings)
    torch.set_num_threads(args.threads)
    model, inputs = build(args)
    folder = tempfile.mkdtemp()
    training_args = TrainingArguments(output_dir=folder, report_to=[], use_cpu=True, save_strategy="no")
    if args.variant == "original":

        def loss_of():
            return authors_bst_loss(model, inputs, lambda_bst=args.lam, top_k=args.top_k)
    else:
        trainer_class = {
            "dropin": BST,
            "graddiff": GradDiffOnTrainer,
            "fused_graddiff": fused_trainer(GradDiffOnTrainer),
        }
        method = dict(lambda_bst=args.lam, top_k=args.top_k) if args.variant == "dropin" else {}
        trainer = trainer_class[args.variant](**method, model=model, args=training_args)

        def loss_of():
            return trainer.compute_loss(model, inputs)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def backward_and_step(loss):
        loss.backward()
        optimizer.step()

    model.train()
    return Bench(forward=loss_of, backward=backward_and_step, reset=lambda: optimizer.zero_grad(set_to_none=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--lam", type=float, default=0.2)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    settings = {name: value for name, value in vars(args).items() if name != "variants"}
    rows = []
    for variant in args.variants.split(","):
        memory = peak_memory(variant_bench, dict(settings, variant=variant), "cpu")
        rows.append(
            [variant, f"{memory.value:.6f}", f"{memory.peak / GIB:.2f}", f"{memory.above_inputs / GIB:.2f}",
             f"{memory.seconds:.1f}"]
        )  # fmt: skip
    logits_gib = args.batch * args.length * args.vocab * 4 / GIB
    print(
        f"Llama: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; forget + retain batches of "
        f"{args.batch} x {args.length} tokens (one [B, T, V] float32 logits tensor = {logits_gib:.2f} GiB); AdamW; "
        "one step (fwd + bwd + optimiser) after a warm-up step."
    )
    header = ["variant", "loss", "peak RSS (GiB)", "peak above step start (GiB)", "step time (s)"]
    print("\n".join(markdown_table(header, rows)))


if __name__ == "__main__":
    main()
