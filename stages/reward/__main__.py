"""Train a reward model on ranked completions, InstructGPT-style.

    python -m stages.reward --run-dir runs/tiny
    accelerate launch --num_processes 8 -m stages.reward --run-dir runs/big

The backbone starts from the SFT policy (or the pretrained model: `reward.init_from`) with a new
scalar head. Each micro-batch holds whole prompts with all their completions: every completion is
scored once and the loss averages each prompt's pairs (stages/reward/losses.py). We write this
loop rather than use TRL's RewardTrainer because RewardTrainer treats pairs independently, so it
can neither share one forward pass among a prompt's K completions nor weight prompts equally.
Held-out accuracy, mean margin and the reward mean/std (which PPO uses to normalise scores) go
into the manifest. Output: RUN_DIR/reward/final, a plain `AutoModelForSequenceClassification`.
"""

from __future__ import annotations

import math

import torch
from accelerate.utils import set_seed
from transformers import AutoTokenizer

from data.preferences import normalize_preferences
from data.sources import load_source
from data.splits import held_out_split
from pipeline.orchestration.stage import StageContext, StageResult, resolve_mixed_precision, run_stage
from pipeline.training.distributed import fit_deepspeed_batch, make_accelerator, replicas_in_sync, whole_model_init
from pipeline.training.loop import Cadence, OptimizerStep, fit, save_final_model, step_indices
from pipeline.training.optimization import adamw, warmup_cosine
from pipeline.training.state import Checkpointer
from reward_model.batching import collate_groups, encode_groups
from reward_model.evaluation import evaluate_preferences
from reward_model.model import TokenScorer, build_reward_model
from reward_model.scoring import at_last_token
from reward_model.statistics import ScoreStatistics
from stages.reward.losses import centering_penalty, grouped_pairwise_loss


def load_groups(source, section, cache_dir):
    rows = load_source(source, cache_dir=cache_dir)
    return normalize_preferences(
        rows,
        ranking_is=source.ranking_is,
        on_bad_row=section.on_bad_row,
        max_bad_fraction=section.max_bad_fraction,
        source=source.hub or source.path,
    )


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.reward
    backbone_dir = context.inputs[section.init_from]
    tokenizer = AutoTokenizer.from_pretrained(backbone_dir)

    # ---------------------------------------------------------------------------------- setup
    accelerator = make_accelerator(resolve_mixed_precision(section.launch.mixed_precision))
    set_seed(config.seed)

    # ----------------------------------------------------------------------------------- data
    cache = context.run_dir / "cache" / "datasets"
    groups, rows = load_groups(section.data, section, cache)
    if section.validation_data is not None:
        train_groups, validation_groups = groups, load_groups(section.validation_data, section, cache)[0]
    else:
        train_groups, validation_groups = held_out_split(groups, section.validation_fraction, config.seed, what="prompts")
    token_cache = context.run_dir / "cache" / "chat_tokens"  # rendered once, by the main process on all cores
    with accelerator.main_process_first():
        train_encoded = encode_groups(train_groups, tokenizer, section.max_length, token_cache)
        validation_encoded = encode_groups(validation_groups, tokenizer, section.max_length, token_cache)
    groups_per_step = section.prompts_per_batch * accelerator.num_processes * section.gradient_accumulation_steps
    total_steps = section.max_steps or max(1, math.ceil(section.epochs * len(train_encoded) / groups_per_step))

    # ---------------------------------------------------------------------------------- model
    # Assembled whole (the backbone's weights copied into a new model with a fresh head), also
    # under ZeRO-3, whose zero.Init would leave the copy nothing to land in and draw the head apart.
    with whole_model_init():
        model = build_reward_model(backbone_dir, pad_token_id=tokenizer.pad_token_id)
    if section.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=section.lora.r, lora_alpha=section.lora.alpha, lora_dropout=section.lora.dropout,
            target_modules=section.lora.target_modules, task_type="SEQ_CLS", modules_to_save=["score"],
        ))
    optimizer = adamw(model, section.learning_rate, section.weight_decay)
    scheduler = warmup_cosine(optimizer, int(section.warmup_ratio * total_steps), total_steps, section.min_lr_ratio)
    fit_deepspeed_batch(accelerator, section.prompts_per_batch, section.max_grad_norm)
    scorer, optimizer = accelerator.prepare(TokenScorer(model), optimizer)

    def micro_batches(step: int) -> list[dict]:
        """Whole prompts with all their completions, for each micro-step of optimiser step `step`."""
        batches = []
        steps = step_indices(
            step, accelerator, accumulation=section.gradient_accumulation_steps,
            size=section.prompts_per_batch, examples=len(train_encoded), seed=config.seed,
        )
        for indices in steps:
            batch = collate_groups([train_encoded[i] for i in indices], tokenizer.pad_token_id, section.margin)
            batches.append({k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()})
        return batches

    def loss(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = at_last_token(scorer(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
        value = grouped_pairwise_loss(
            scores, batch["better"], batch["worse"], batch["pair_group"], batch["margins"], batch["n_groups"]
        ) + section.center_rewards_coefficient * centering_penalty(scores)
        gap = scores.detach()[batch["better"]] - scores.detach()[batch["worse"]]
        return value, {"accuracy": (gap > 0).float().mean()}

    def evaluate() -> dict[str, float]:
        return evaluate_preferences(scorer, validation_encoded, tokenizer.pad_token_id, section.prompts_per_batch, accelerator)

    # ----------------------------------------------------------------------------------- loop
    result = fit(
        "reward", accelerator,
        OptimizerStep(accelerator, scorer, optimizer, scheduler, section.max_grad_norm),
        Checkpointer(context.stage_dir / "checkpoints", accelerator, section.keep_checkpoints, parts={"": "pretrained_model"}),
        context.tracker,
        Cadence(total_steps, section.log_every, section.eval_every, section.save_every),
        micro_batches=micro_batches, loss=loss, evaluate=evaluate,
        units_per_step=groups_per_step, unit="prompt", tokenizer=tokenizer,
    )
    first_eval, last_eval = result.first_eval, result.last_eval

    # ----------------------------------------------------------------------------------- save
    lora_save = "merged" if section.lora is not None else None
    save_final_model(accelerator, scorer, context.output_dir, tokenizer, part="pretrained_model", lora_save=lora_save)
    if accelerator.is_main_process:
        # PPO normalises scores with these; in the folder, they are covered by its digest.
        ScoreStatistics(mean=last_eval["reward_mean"], std=last_eval["reward_std"]).write(context.output_dir)
    metrics = {
        "world_size": accelerator.num_processes,
        "replicas_in_sync": replicas_in_sync(scorer, accelerator.device),
        "steps": total_steps,
        "accuracy": last_eval["accuracy"],
        "mean_margin": last_eval["mean_margin"],
        "reward_mean": last_eval["reward_mean"],
        "reward_std": last_eval["reward_std"],
        "validation_pairs": last_eval["pairs"],
        "validation_prompts": len(validation_encoded),
        "train_prompts": len(train_encoded),
        "train_pairs": sum(len(g.pairs) for g in train_encoded),
        "rows_read": rows.total,
        "rows_dropped": rows.dropped,
        "dropped_reasons": dict(rows.reasons),
        "initial_accuracy": first_eval["accuracy"] if first_eval else None,
        "resumed_from_step": result.resumed_from,
    }
    return StageResult(context.output_dir, metrics)


if __name__ == "__main__":
    run_stage("reward", train)
