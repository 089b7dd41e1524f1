"""Peak memory of one unlearning training step: the authors' BST trainer loss vs the bs_unlearn drop-in.

Same model (a Llama built from a config, random weights, float32), same batch, same optimiser; only the loss
computation differs:
  original  the method authors' BST + GradDiff loss over materialised logits: logits = model(**forget).logits,
            top-k -> softmax -> soft target lam*q + (1-lam)*one_hot -> -(t * log_softmax).sum -> per-sequence mean
            -> forget_loss = -mean; retain_loss = model(**retain).loss (transformers' NLL)
  dropin    bs_unlearn.integrations.open_unlearning.BST(...).compute_loss (fused lm_head + BS-T, fused NLL)
  graddiff  open-unlearning's GradDiff (forget -model(**forget).loss + retain NLL), stock   } the generic mixin,
  fused_graddiff  fused_trainer(GradDiff): the same loss with both terms fused              } for reference

Each variant runs in a fresh process: build model + batch + AdamW, one warm-up step (allocates the optimiser state
and any lazy buffers), reset the peak RSS (/proc/self/clear_refs), then one measured step (zero_grad, loss,
backward, optimiser step). Reported: peak RSS during the measured step, its excess over the RSS before it, and the
step time. CPU only (peak RSS); on a GPU use torch.cuda.max_memory_allocated the same way (not run here).

    python benchmarks/bench_dropin_memory.py                     # all variants, markdown table
    python benchmarks/bench_dropin_memory.py --variant dropin    # one variant, one JSON line (used internally)
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time

VARIANTS = ("original", "dropin", "graddiff", "fused_graddiff")


def _status_kib(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(2048, args.length), tie_word_embeddings=False,
    )  # fmt: skip
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


def measure(args) -> dict:
    import torch
    from bs_unlearn.integrations.open_unlearning import BST, GradDiffOnTrainer, fused_trainer
    from transformers import TrainingArguments

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

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_of()
        loss.backward()
        optimizer.step()
        return float(loss)

    model.train()
    step()  # warm-up
    optimizer.zero_grad(set_to_none=True)
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
    before = _status_kib("VmRSS") * 1024
    start = time.perf_counter()
    loss = step()
    seconds = time.perf_counter() - start
    peak = _status_kib("VmHWM") * 1024
    return {
        "variant": args.variant, "loss": loss, "peak_rss_bytes": peak, "peak_above_start_bytes": peak - before,
        "step_seconds": seconds, "logits_bytes": args.batch * args.length * args.vocab * 4,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", choices=VARIANTS)
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
    if args.variant:
        print(json.dumps(measure(args)))
        return
    passed = [a for a in sys.argv[1:] if not a.startswith("--variants")]
    rows = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--variant", variant, *passed]
        completed = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    gib = 1024**3
    logits_gib = rows[0]["logits_bytes"] / gib
    print(
        f"Llama: vocab {args.vocab}, hidden {args.hidden}, {args.layers} layers; forget + retain batches of "
        f"{args.batch} x {args.length} tokens (one [B, T, V] float32 logits tensor = {logits_gib:.2f} GiB); AdamW; "
        "one step (fwd + bwd + optimiser) after a warm-up step."
    )
    print("| variant | loss | peak RSS (GiB) | peak above step start (GiB) | step time (s) |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['loss']:.6f} | {row['peak_rss_bytes'] / gib:.2f} | "
            f"{row['peak_above_start_bytes'] / gib:.2f} | {row['step_seconds']:.1f} |"
        )


if __name__ == "__main__":
    main()
