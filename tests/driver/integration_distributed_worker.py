"""Worker for tests/driver/test_integrations_distributed.py: one unlearning run, alone or under torchrun (gloo, CPU).

    python tests/driver/integration_distributed_worker.py MODE OUTPUT_JSON
    torchrun --nproc_per_node 2 tests/driver/integration_distributed_worker.py MODE OUTPUT_JSON

MODE:
  trainer  BST (retain NLL) through transformers.Trainer for 3 steps on a 4-example forget set: 4 per device alone,
           2 per device on 2 processes (DDP), so every step sees the same 4 examples either way.
  fsdp2    A plain loop: the model sharded with FSDP2 ``fully_shard`` (decoder layers and the root), the BS-T forget
           term + NLL retain term through bs_unlearn.objectives.model_terms, 3 SGD steps on one 4-example batch split
           over the processes (alone: the whole batch).
  bss      BSS through transformers.Trainer, 2 steps: the belief set is sampled by all processes together.
  zero3    DeepSpeed ZeRO-3 on the CPU accelerator: the fused terms against the same terms over materialised logits,
           both under ZeRO-3 (needs deepspeed).
Rank 0 writes {"losses": [...], "checksum": float} to OUTPUT_JSON. float64 throughout, so the runs agree to rounding.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import tempfile

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from integration_fixtures import make_batch, make_dataset, tiny_model_and_tokenizer, training_arguments  # noqa: E402

STEPS = 3


def run_trainer(world: int) -> dict:
    from bs_unlearn.data import ForgetRetainCollator
    from bs_unlearn.integrations.open_unlearning import BST

    model, tokenizer = tiny_model_and_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        args = training_arguments(
            folder, per_device_train_batch_size=4 // world, max_steps=STEPS, learning_rate=5e-3, optim="sgd"
        )
        trainer = BST(
            lambda_bst=0.3,
            top_k=5,
            model=model,
            args=args,
            train_dataset=make_dataset(tokenizer, num_forget=4),
            data_collator=ForgetRetainCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
        )
        trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"losses": losses, "checksum": _checksum(model.parameters())}


def run_fsdp2(world: int, wrap: str = "fsdp2") -> dict:
    from bs_unlearn.objectives import model_terms as fused
    from torch.distributed.fsdp import fully_shard

    model, tokenizer = tiny_model_and_tokenizer()
    batch = make_batch(tokenizer, forget_indices=(0, 1, 2, 3), retain_indices=(9, 10, 11, 12))
    if world > 1:
        rank = torch.distributed.get_rank()
        rows = slice(rank * (4 // world), (rank + 1) * (4 // world))
        batch = {part: {key: value[rows] for key, value in tensors.items()} for part, tensors in batch.items()}
        if wrap == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(model)
        else:
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)  # the root unit holds embeddings, final norm and the lm_head
    optimizer = torch.optim.SGD(model.parameters(), lr=5e-2)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = fused.bs_t_forget_loss(model, batch["forget"], lam=0.3, top_k=5)
        loss = loss - fused.answer_logprob_loss(model, batch["retain"])
        loss.backward()
        optimizer.step()
        reported = loss.detach().clone()
        if world > 1:  # the per-process means average to the global one (equal answer lengths per process)
            torch.distributed.all_reduce(reported)
            reported /= world
        losses.append(float(reported))
    if world > 1 and wrap == "fsdp2":
        parameters = [p.full_tensor() for p in model.parameters()]
    else:
        parameters = list(model.parameters())
    return {"losses": losses, "checksum": _checksum(parameters)}


def run_bss(world: int) -> dict:
    """BSS through the Trainer, 2 steps: the belief set is sampled across the processes and shared by all of them."""
    from bs_unlearn.data import ForgetRetainCollator
    from bs_unlearn.integrations.open_unlearning import BSS

    model, tokenizer = tiny_model_and_tokenizer()
    with tempfile.TemporaryDirectory() as folder:
        args = training_arguments(folder, per_device_train_batch_size=4 // world, max_steps=2, optim="sgd")
        trainer = BSS(
            n_samples=2,
            max_new_tokens=4,
            model=model,
            args=args,
            train_dataset=make_dataset(tokenizer, num_forget=4),
            data_collator=ForgetRetainCollator(tokenizer.pad_token_id),
            processing_class=tokenizer,
        )
        trainer.train()
    belief_sets = [sorted(trainer.beliefs.items())]
    if world > 1:
        belief_sets = [None] * world
        torch.distributed.all_gather_object(belief_sets, sorted(trainer.beliefs.items()))
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {
        "losses": losses,
        "checksum": 0.0,
        "prompts": len(trainer.beliefs),
        "beliefs_per_prompt": sorted({len(beliefs) for beliefs in trainer.beliefs.values()}),
        "same_belief_set_everywhere": all(beliefs == belief_sets[0] for beliefs in belief_sets),
    }


def run_zero3(world: int) -> dict:
    """DeepSpeed ZeRO-3 (CPU accelerator, gloo): 3 steps with the fused terms and 3 with the same terms over the
    materialised logits, each from the same initial model; float32 (DeepSpeed's CPU optimiser path)."""
    import deepspeed
    from bs_unlearn.objectives import model_terms as fused

    import bs_kernels

    def trajectory(fused_path: bool) -> list[float]:
        model, tokenizer = tiny_model_and_tokenizer(dtype=torch.float32)
        batch = make_batch(tokenizer, forget_indices=(0, 1, 2, 3), retain_indices=(9, 10, 11, 12))
        rank = torch.distributed.get_rank()
        rows = slice(rank * (4 // world), (rank + 1) * (4 // world))
        batch = {part: {key: value[rows] for key, value in tensors.items()} for part, tensors in batch.items()}
        config = {
            "train_micro_batch_size_per_gpu": 4 // world,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,
        }
        optimizer = torch.optim.SGD(model.parameters(), lr=5e-2)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        assert engine.module.lm_head.weight.numel() == 0  # partitioned: the fused call must gather it

        def logits(part):
            return engine(input_ids=part["input_ids"], attention_mask=part["attention_mask"]).logits

        losses = []
        for _ in range(STEPS):
            if fused_path:
                loss = fused.bs_t_forget_loss(engine, batch["forget"], lam=0.3, top_k=5)
                loss = loss - fused.answer_logprob_loss(engine, batch["retain"])
            else:
                forget, retain = batch["forget"], batch["retain"]
                loss = bs_kernels.bs_token_loss(logits(forget), forget["labels"], lam=0.3, top_k=5, impl="reference")
                loss = loss - bs_kernels.bs_token_loss(
                    logits(retain), retain["labels"], lam=0.0, top_k=1, reduction="token_mean", impl="reference"
                )
            engine.backward(loss)
            engine.step()
            reported = loss.detach().clone()
            torch.distributed.all_reduce(reported)
            losses.append(float(reported) / world)
        return losses

    return {"losses": trajectory(True), "stock_losses": trajectory(False), "checksum": 0.0}


def _checksum(parameters) -> float:
    return float(sum((p.detach().double() * (index + 1)).sum() for index, p in enumerate(parameters)))


def main() -> None:
    mode, output = sys.argv[1], pathlib.Path(sys.argv[2])
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode == "zero3":
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    elif world > 1 and mode in ("fsdp2", "ddp"):
        torch.distributed.init_process_group("gloo")
    runs = {
        "trainer": run_trainer,
        "fsdp2": run_fsdp2,
        "ddp": lambda world: run_fsdp2(world, "ddp"),
        "zero3": run_zero3,
        "bss": run_bss,
    }
    result = runs[mode](world)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    if rank == 0:
        output.write_text(json.dumps(result))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        # Every rank is done and rank 0's file is written. Leave without the process group's teardown: once in CI
        # (bss mode, torch 2.13, gloo) a rank aborted there ("terminate called without an active exception", SIGABRT)
        # after all its work, which says nothing about the code under test.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    main()
