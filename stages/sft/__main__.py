"""Supervised fine-tuning on conversations, loss on the assistant's tokens only.

    python -m stages.sft --run-dir runs/tiny
    accelerate launch --num_processes 8 -m stages.sft --run-dir runs/big

Reads the pretrain stage's checkpoint (trained here, or an adopted base model) from the manifest,
fine-tunes it with TRL's SFTTrainer on conversations normalised from any accepted format, and
writes RUN_DIR/sft/final: full weights, LoRA merged into them, or a LoRA adapter with a note of
its base (`sft.lora.save`). Evaluates loss/perplexity on held-out assistant tokens before, during
and after training, and answers a few held-out prompts at the end (RUN_DIR/sft/samples.jsonl).
Re-running after a crash resumes from the last Trainer checkpoint in RUN_DIR/sft/checkpoints.
"""

from __future__ import annotations

import json
import math

import torch

from transformers import AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig as TRLSFTConfig

from pipeline.training.distributed import replicas_in_sync
from pipeline.checkpoints import load_causal_lm, write_adapter_note
from pipeline.tracking import read_metrics
from pipeline.stage import StageContext, StageResult, resolve_mixed_precision, run_stage
from data.splits import held_out_split
from stages.sft.dataset import load_conversations, tokenize_conversations
from stages.sft.samples import generate_replies, sample_rows
from stages.sft.trainer import ChatpipeSFTTrainer, TrackerCallback


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.sft
    base_dir = context.inputs["pretrain"]
    tokenizer = AutoTokenizer.from_pretrained(base_dir)

    # ----------------------------------------------------------------------------------- data
    cache = context.run_dir / "cache" / "datasets"
    conversations, rows = load_conversations(section.data, section, cache)
    if section.validation_data is not None:
        train_conversations = conversations
        validation_conversations, _ = load_conversations(section.validation_data, section, cache)
    else:
        train_conversations, validation_conversations = held_out_split(
            conversations, section.validation_fraction, config.seed, what="conversations"
        )
    train_dataset, train_lengths = tokenize_conversations(
        train_conversations, tokenizer, section.max_length, section.overlong
    )
    validation_dataset, validation_lengths = tokenize_conversations(
        validation_conversations, tokenizer, section.max_length, section.overlong
    )

    # ---------------------------------------------------------------------------------- model
    model = load_causal_lm(base_dir)
    peft_config = None
    if section.lora is not None:
        from peft import LoraConfig

        peft_config = LoraConfig(
            r=section.lora.r,
            lora_alpha=section.lora.alpha,
            lora_dropout=section.lora.dropout,
            target_modules=section.lora.target_modules,
            task_type="CAUSAL_LM",
        )
    precision = resolve_mixed_precision(section.launch.mixed_precision)
    checkpoints = context.stage_dir / "checkpoints"
    resume_from = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    arguments = TRLSFTConfig(
        output_dir=str(checkpoints),
        per_device_train_batch_size=section.per_device_batch_size,
        per_device_eval_batch_size=section.per_device_batch_size,
        gradient_accumulation_steps=section.gradient_accumulation_steps,
        num_train_epochs=section.epochs,
        max_steps=section.max_steps or -1,
        learning_rate=section.learning_rate,
        lr_scheduler_type=section.lr_scheduler,
        warmup_steps=section.warmup_ratio,  # a float below 1 is a ratio of all steps
        weight_decay=section.weight_decay,
        max_grad_norm=section.max_grad_norm,
        logging_steps=section.log_every,
        eval_strategy="steps",
        eval_steps=section.eval_every,
        eval_on_start=resume_from is None,
        save_strategy="steps",
        save_steps=section.save_every,
        save_total_limit=section.keep_checkpoints,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        seed=config.seed,
        max_length=section.max_length,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        activation_checkpointing=section.activation_checkpointing,
        dataloader_num_workers=0,
    )
    trainer = ChatpipeSFTTrainer(
        model=model,
        args=arguments,
        train_dataset=train_dataset,
        eval_dataset=validation_dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[TrackerCallback(context.tracker)],
    )

    # ----------------------------------------------------------------------------------- loop
    # The step-0 baseline comes from eval_on_start, inside train(): calling trainer.evaluate()
    # before train() makes the Trainer skip its DDP wrapping, and replicas silently diverge.
    trainer.train(resume_from_checkpoint=resume_from)
    step = trainer.state.global_step
    final = next((row for row in trainer.state.log_history if row.get("step") == step and "eval_loss" in row), None)
    final = final or trainer.evaluate()

    # ----------------------------------------------------------------------------------- save
    output = context.output_dir
    trained = trainer.model
    if section.lora is not None and section.lora.save == "merged":
        trained = trainer.accelerator.unwrap_model(trained).merge_and_unload()
    if context.is_main:
        trained.generation_config.pad_token_id = tokenizer.pad_token_id
        trained.generation_config.eos_token_id = tokenizer.eos_token_id
        trainer.accelerator.unwrap_model(trained).save_pretrained(output, safe_serialization=True)
        tokenizer.save_pretrained(output)
        if section.lora is not None and section.lora.save == "adapter":
            write_adapter_note(output, base_dir, context.input_digests["pretrain"])

    # -------------------------------------------------------------------------------- samples
    samples = []
    if context.is_main and section.sample_prompts:
        prompts = sample_rows(
            validation_conversations, section.sample_prompts, tokenizer, section.max_length - section.sample_max_new_tokens
        )
        replies = generate_replies(
            trainer.accelerator.unwrap_model(trained), tokenizer, [prompt for prompt, _ in prompts],
            section.sample_max_new_tokens, seed=config.seed,
        )
        samples = [
            {"prompt": prompt, "reference": reference, "reply": reply}
            for (prompt, reference), reply in zip(prompts, replies)
        ]
        with open(context.stage_dir / "samples.jsonl", "w") as handle:
            for sample in samples:
                handle.write(json.dumps(sample) + "\n")
        context.tracker.log_table(
            "samples",
            ["prompt", "reference", "reply"],
            [[s["prompt"][-1]["content"], s["reference"], s["reply"]] for s in samples],
            step=trainer.state.global_step,
        )

    metrics = {
        "world_size": trainer.accelerator.num_processes,
        "replicas_in_sync": replicas_in_sync(trainer.model, trainer.accelerator.device),
        "steps": trainer.state.global_step,
        "eval_loss": final["eval_loss"],
        "eval_perplexity": math.exp(min(final["eval_loss"], 50.0)),
        "rows_read": rows.total,
        "rows_dropped": rows.dropped,
        "dropped_reasons": dict(rows.reasons),
        **train_lengths.as_metrics("train"),
        **validation_lengths.as_metrics("validation"),
        "checkpoint_kind": "adapter" if section.lora is not None and section.lora.save == "adapter" else "full",
        "resumed_from_step": int(resume_from.rsplit("-", 1)[1]) if resume_from else None,
    }
    baseline = [row["eval/loss"] for row in read_metrics(context.stage_dir) if row["step"] == 0 and "eval/loss" in row]
    if baseline:
        metrics["initial_eval_loss"] = baseline[0]
    context.tracker.log({"data/" + key: value for key, value in metrics.items() if key.startswith(("train_", "validation_", "rows_"))}, step=trainer.state.global_step)
    return StageResult(output, metrics)


if __name__ == "__main__":
    run_stage("sft", train)
