"""Pretrain a causal LM from scratch on packed blocks of text, or adopt a base model.

    python -m stages.pretrain --run-dir runs/tiny
    accelerate launch --num_processes 8 -m stages.pretrain --run-dir runs/big

The same loop runs in one process, several CPU processes (gloo) or on many GPUs: accelerate
wraps the model and optimiser, and each process reads its own slice of every global batch from
one shuffled order of blocks. Re-running the stage after a crash resumes from the last checkpoint
in RUN_DIR/pretrain/checkpoints, at the same step, with the same data order ahead of it.
Output: RUN_DIR/pretrain/final, a Hugging Face model folder with the tokenizer.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from data.packing import batch_indices
from pipeline.optimization import adamw, warmup_cosine
from pipeline.distributed import fit_deepspeed_batch, replicas_in_sync
from pipeline.stage import StageContext, StageResult, resolve_mixed_precision, run_stage
from pipeline.training_state import latest_checkpoint, load_checkpoint, save_checkpoint
from stages.pretrain.corpus import prepare_blocks
from stages.pretrain.model import adopt_base_model, count_parameters, model_from_config


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.pretrain
    tokenizer_dir = context.inputs["tokenizer"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if config.model.base_model is not None:
        return adopt(context, tokenizer)

    # ---------------------------------------------------------------------------------- setup
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(section.launch.mixed_precision))
    set_seed(config.seed)  # the same initial weights on every process
    checkpoints = context.stage_dir / "checkpoints"

    # ----------------------------------------------------------------------------------- data
    with accelerator.main_process_first():  # the main process tokenizes; the others read its cache
        train_blocks, validation_blocks = prepare_blocks(section, tokenizer, tokenizer_dir, context.run_dir / "cache" / "pretrain")
    micro_batch = section.per_device_batch_size
    global_batch = micro_batch * accelerator.num_processes * section.gradient_accumulation_steps
    tokens_per_step = global_batch * section.block_size

    # ---------------------------------------------------------------------------------- model
    model = model_from_config(config.model, tokenizer)
    n_parameters = count_parameters(model)
    optimizer = adamw(model, section.learning_rate, section.weight_decay, (section.adam_beta1, section.adam_beta2))
    scheduler = warmup_cosine(optimizer, section.warmup_steps, section.max_steps, section.min_lr_ratio)
    fit_deepspeed_batch(accelerator, section.per_device_batch_size)
    model, optimizer = accelerator.prepare(model, optimizer)

    start_step, resumed_from, first_eval = 0, None, None
    latest = latest_checkpoint(checkpoints)
    if latest is not None:
        state = load_checkpoint(latest, accelerator=accelerator, model=model, optimizer=optimizer, scheduler=scheduler)
        start_step, resumed_from = state["step"], state["step"]
        first_eval = state["extra"].get("first_eval")
        accelerator.print(f"pretrain: resuming from {latest} (step {start_step} of {section.max_steps})")

    def micro_batch_at(step: int, micro: int) -> torch.Tensor:
        """This process's blocks for micro-step `micro` of optimiser step `step` (0-based)."""
        micro_index = step * section.gradient_accumulation_steps + micro
        position = (micro_index * accelerator.num_processes + accelerator.process_index) * micro_batch
        indices = batch_indices(position, micro_batch, len(train_blocks), config.seed)
        return torch.from_numpy(train_blocks[indices]).long().to(accelerator.device)

    @torch.no_grad()
    def evaluate() -> dict[str, float]:
        model.eval()
        mine = validation_blocks[accelerator.process_index :: accelerator.num_processes][: section.eval_batches * micro_batch]
        loss_sum = torch.zeros((), device=accelerator.device)
        count = torch.zeros((), device=accelerator.device)
        for start in range(0, len(mine), micro_batch):
            blocks = torch.from_numpy(mine[start : start + micro_batch]).long().to(accelerator.device)
            with accelerator.autocast():
                loss = model(input_ids=blocks, labels=blocks).loss
            loss_sum += loss.float() * len(blocks)
            count += len(blocks)
        loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
        model.train()
        mean = (loss_sum / count.clamp(min=1)).item()
        return {"eval/loss": mean, "eval/perplexity": math.exp(min(mean, 50.0))}

    # ----------------------------------------------------------------------------------- loop
    model.train()
    if start_step == 0:
        first_eval = evaluate()
        context.tracker.log(first_eval, step=0)
    progress = tqdm(
        total=section.max_steps, initial=start_step, desc="pretrain", disable=not accelerator.is_main_process
    )
    last_eval, train_loss = first_eval, float("nan")
    window_started, window_steps = time.perf_counter(), 0
    for step in range(start_step, section.max_steps):
        loss_total = torch.zeros((), device=accelerator.device)
        for micro in range(section.gradient_accumulation_steps):
            blocks = micro_batch_at(step, micro)
            last_micro = micro == section.gradient_accumulation_steps - 1
            # Gradients are all-reduced once per optimiser step, on its last micro-step.
            sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(model)
            with sync, accelerator.autocast():
                loss = model(input_ids=blocks, labels=blocks).loss / section.gradient_accumulation_steps
                accelerator.backward(loss)
            loss_total += loss.detach()
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), section.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        progress.update(1)
        window_steps += 1

        if done % section.log_every == 0 or done == section.max_steps:
            train_loss = accelerator.reduce(loss_total, "mean").item()
            elapsed = time.perf_counter() - window_started
            metrics = {
                "train/loss": train_loss,
                "train/grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "tokens": done * tokens_per_step,
                "throughput/tokens_per_second": window_steps * tokens_per_step / max(elapsed, 1e-9),
            }
            context.tracker.log(metrics, step=done)
            progress.set_postfix(loss=f"{train_loss:.3f}")
            window_started, window_steps = time.perf_counter(), 0
        # Evaluation and checkpoints are not training: their time is left out of the throughput window.
        paused = time.perf_counter()
        if done % section.eval_every == 0 or done == section.max_steps:
            last_eval = evaluate()
            context.tracker.log(last_eval, step=done)
        if done % section.save_every == 0 and done < section.max_steps:
            save_checkpoint(
                checkpoints,
                done,
                accelerator=accelerator,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                tokenizer=tokenizer,
                extra={"first_eval": first_eval},
                keep=section.keep_checkpoints,
            )
        window_started += time.perf_counter() - paused
    progress.close()

    # ----------------------------------------------------------------------------------- save
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        final_model = accelerator.unwrap_model(model)
        final_model.generation_config.pad_token_id = tokenizer.pad_token_id
        final_model.generation_config.eos_token_id = tokenizer.eos_token_id
        final_model.save_pretrained(context.output_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(context.output_dir)
    metrics = {
        "world_size": accelerator.num_processes,
        "replicas_in_sync": replicas_in_sync(model, accelerator.device),
        "steps": section.max_steps,
        "parameters": n_parameters,
        "tokens": section.max_steps * tokens_per_step,
        "train_blocks": len(train_blocks),
        "validation_blocks": len(validation_blocks),
        "train_loss": train_loss,
        "resumed_from_step": resumed_from,
    }
    if first_eval is not None:
        metrics["initial_eval_loss"] = first_eval["eval/loss"]
    if last_eval is not None:
        metrics["eval_loss"] = last_eval["eval/loss"]
        metrics["eval_perplexity"] = last_eval["eval/perplexity"]
    return StageResult(context.output_dir, metrics)


def adopt(context: StageContext, tokenizer) -> StageResult:
    """Skip pretraining: the base model named in the config becomes this stage's output."""
    model = None
    if context.is_main:
        model = adopt_base_model(context.config.model, tokenizer)
        model.save_pretrained(context.output_dir, safe_serialization=True)
        tokenizer.save_pretrained(context.output_dir)
    metrics = {"source": context.config.model.base_model}
    if model is not None:
        metrics["parameters"] = count_parameters(model)
    return StageResult(context.output_dir, metrics)


if __name__ == "__main__":
    run_stage("pretrain", train)
