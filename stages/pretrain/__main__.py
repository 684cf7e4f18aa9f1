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

import os

import numpy as np
import torch
from accelerate.utils import set_seed
from transformers import AutoTokenizer

from pipeline.config import check_sequence_lengths
from pipeline.orchestration.stage import StageContext, StageResult, resolve_mixed_precision, run_stage
from pipeline.training.distributed import engine_of, make_accelerator, whole_model_init, whole_parameter_count
from pipeline.training.loop import Cadence, SupervisedStep, fit, save_final_model, step_indices
from pipeline.training.metrics import held_out_loss
from pipeline.training.optimization import adamw, prepare_training, warmup_cosine
from pipeline.training.state import Checkpointer
from stages.pretrain.corpus import prepare_blocks, prepare_store
from stages.pretrain.model import adopt_base_model, model_from_config


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.pretrain
    tokenizer_dir = context.inputs["tokenizer"]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if config.model.base_model is not None:
        return adopt(context, tokenizer)

    # ---------------------------------------------------------------------------------- setup
    accelerator = make_accelerator(resolve_mixed_precision(section.launch.mixed_precision))
    set_seed(config.seed)  # the same initial weights on every process

    # ----------------------------------------------------------------------------------- data
    # This machine's processes tokenize the corpus together into one store, and all of them read
    # their blocks from it, memory-mapped (no process holds the corpus).
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    store = prepare_store(
        section, tokenizer, tokenizer_dir, context.run_dir / "cache" / "pretrain",
        worker=accelerator.local_process_index, workers=local_processes,
    )
    train_blocks, validation_blocks = prepare_blocks(store, section)
    micro_batch = section.per_device_batch_size
    tokens_per_step = micro_batch * accelerator.num_processes * section.gradient_accumulation_steps * section.block_size

    # ---------------------------------------------------------------------------------- model
    # Initialised whole on every process, also under ZeRO-3 (whose zero.Init would draw each shard
    # apart): every engine starts from the same weights, so runs compare and resume alike.
    with whole_model_init():
        model = model_from_config(config.model, tokenizer)
    n_parameters = whole_parameter_count(model)
    optimizer = adamw(model, section.learning_rate, section.weight_decay, (section.adam_beta1, section.adam_beta2))
    scheduler = warmup_cosine(optimizer, section.warmup_steps, section.max_steps, section.min_lr_ratio)
    optimizer_step = prepare_training(
        accelerator, model, optimizer, scheduler, micro_batch_size=micro_batch, max_grad_norm=section.max_grad_norm
    )
    model = optimizer_step.model
    if section.compile:
        # In place (nn.Module.compile): the same module object, so checkpoints, evaluation and the
        # final save see unchanged parameter names; the first steps pay for the compilation.
        model.compile()

    def micro_batches(step: int) -> list[torch.Tensor]:
        """This process's blocks for each micro-step of optimiser step `step` (0-based)."""
        steps = step_indices(
            step, accelerator, accumulation=section.gradient_accumulation_steps,
            size=micro_batch, examples=len(train_blocks), seed=config.seed,
        )
        return [torch.from_numpy(train_blocks[indices]).to(accelerator.device) for indices in steps]

    def loss(blocks: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return model(input_ids=blocks, labels=blocks).loss, {}

    def evaluate() -> dict[str, float]:
        mine = np.arange(accelerator.process_index, len(validation_blocks), accelerator.num_processes)[: section.eval_batches * micro_batch]
        blocks = (torch.from_numpy(validation_blocks[mine[start : start + micro_batch]]) for start in range(0, len(mine), micro_batch))
        return held_out_loss(accelerator, model, ({"input_ids": block, "labels": block} for block in blocks))

    # ----------------------------------------------------------------------------------- loop
    result = fit(
        "pretrain", accelerator,
        SupervisedStep(optimizer_step, micro_batches, loss),
        Checkpointer(context.stage_dir / "checkpoints", accelerator, section.keep_checkpoints),
        context.tracker,
        Cadence(section.max_steps, section.log_every, section.eval_every, section.save_every),
        evaluate=evaluate, units_per_step=tokens_per_step, unit="token", tokenizer=tokenizer,
    )

    # ----------------------------------------------------------------------------------- save
    save_final_model(accelerator, model, context.output_dir, tokenizer, generation_tokens=True)
    metrics = {
        "world_size": accelerator.num_processes,
        "replicas_in_sync": engine_of(accelerator).replicas_in_sync(model),
        "steps": section.max_steps,
        "parameters": n_parameters,
        "tokens": section.max_steps * tokens_per_step,
        "train_blocks": len(train_blocks),
        "validation_blocks": len(validation_blocks),
        "corpus_tokens": store.tokens,
        "token_bytes": store.disk_bytes,
        "corpus_documents": store.documents,
        "train_loss": result.train_loss,
        "resumed_from_step": result.resumed_from,
    }
    if result.first_eval is not None:
        metrics["initial_eval_loss"] = result.first_eval["loss"]
    if result.last_eval is not None:
        metrics["eval_loss"] = result.last_eval["loss"]
        metrics["eval_perplexity"] = result.last_eval["perplexity"]
    return StageResult(context.output_dir, metrics)


def adopt(context: StageContext, tokenizer) -> StageResult:
    """Skip pretraining: the base model named in the config becomes this stage's output."""
    model = None
    if context.is_main:
        model = adopt_base_model(context.config.model, tokenizer)
        check_sequence_lengths(context.config, model.config)  # its position limit, unknown until now
        model.save_pretrained(context.output_dir, safe_serialization=True)
        tokenizer.save_pretrained(context.output_dir)
    metrics = {"source": context.config.model.base_model}
    if model is not None:
        metrics["parameters"] = whole_parameter_count(model)
    return StageResult(context.output_dir, metrics)


if __name__ == "__main__":
    run_stage("pretrain", train)
