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

import contextlib
import math
import time

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from data.packing import batch_indices
from data.preferences import normalize_preferences
from data.sources import load_source
from data.splits import held_out_split
from pipeline.optimization import adamw, warmup_cosine
from pipeline.distributed import fit_deepspeed_batch, replicas_in_sync
from pipeline.stage import StageContext, StageResult, resolve_mixed_precision, run_stage
from pipeline.training_state import latest_checkpoint, load_checkpoint, save_checkpoint
from reward_model.model import TokenScorer, build_reward_model
from reward_model.scoring import at_last_token
from stages.reward.batching import collate_groups, encode_groups
from stages.reward.evaluation import evaluate_preferences
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
    accelerator = Accelerator(mixed_precision=resolve_mixed_precision(section.launch.mixed_precision))
    set_seed(config.seed)
    checkpoints = context.stage_dir / "checkpoints"

    # ----------------------------------------------------------------------------------- data
    cache = context.run_dir / "cache" / "datasets"
    groups, rows = load_groups(section.data, section, cache)
    if section.validation_data is not None:
        train_groups, validation_groups = groups, load_groups(section.validation_data, section, cache)[0]
    else:
        train_groups, validation_groups = held_out_split(groups, section.validation_fraction, config.seed, what="prompts")
    train_encoded = encode_groups(train_groups, tokenizer, section.max_length)
    validation_encoded = encode_groups(validation_groups, tokenizer, section.max_length)
    groups_per_step = section.prompts_per_batch * accelerator.num_processes * section.gradient_accumulation_steps
    total_steps = section.max_steps or max(1, math.ceil(section.epochs * len(train_encoded) / groups_per_step))

    # ---------------------------------------------------------------------------------- model
    model = build_reward_model(backbone_dir, pad_token_id=tokenizer.pad_token_id)
    if section.lora is not None:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(
            r=section.lora.r, lora_alpha=section.lora.alpha, lora_dropout=section.lora.dropout,
            target_modules=section.lora.target_modules, task_type="SEQ_CLS", modules_to_save=["score"],
        ))
    optimizer = adamw(model, section.learning_rate, section.weight_decay)
    scheduler = warmup_cosine(optimizer, int(section.warmup_ratio * total_steps), total_steps, section.min_lr_ratio)
    fit_deepspeed_batch(accelerator, section.prompts_per_batch)
    scorer, optimizer = accelerator.prepare(TokenScorer(model), optimizer)
    evaluate = lambda: evaluate_preferences(  # noqa: E731
        scorer, validation_encoded, tokenizer.pad_token_id, section.prompts_per_batch, accelerator
    )

    start_step, resumed_from, first_eval = 0, None, None
    latest = latest_checkpoint(checkpoints)
    if latest is not None:
        state = load_checkpoint(latest, accelerator=accelerator, model=scorer, optimizer=optimizer, scheduler=scheduler)
        start_step, resumed_from, first_eval = state["step"], state["step"], state["extra"].get("first_eval")
        accelerator.print(f"reward: resuming from {latest} (step {start_step} of {total_steps})")

    def micro_batch_at(step: int, micro: int) -> dict:
        micro_index = step * section.gradient_accumulation_steps + micro
        position = (micro_index * accelerator.num_processes + accelerator.process_index) * section.prompts_per_batch
        indices = batch_indices(position, section.prompts_per_batch, len(train_encoded), config.seed)
        return collate_groups([train_encoded[i] for i in indices], tokenizer.pad_token_id, section.margin)

    # ----------------------------------------------------------------------------------- loop
    scorer.train()
    if start_step == 0:
        first_eval = evaluate()
        context.tracker.log({f"eval/{k}": v for k, v in first_eval.items()}, step=0)
    progress = tqdm(total=total_steps, initial=start_step, desc="reward", disable=not accelerator.is_main_process)
    last_eval, window_started, window_steps = first_eval, time.perf_counter(), 0
    for step in range(start_step, total_steps):
        loss_total = torch.zeros((), device=accelerator.device)
        accuracy_total = torch.zeros((), device=accelerator.device)
        for micro in range(section.gradient_accumulation_steps):
            batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in micro_batch_at(step, micro).items()}
            last_micro = micro == section.gradient_accumulation_steps - 1
            with (contextlib.nullcontext() if last_micro else accelerator.no_sync(scorer)), accelerator.autocast():
                scores = at_last_token(scorer(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
                loss = grouped_pairwise_loss(
                    scores, batch["better"], batch["worse"], batch["pair_group"], batch["margins"], batch["n_groups"]
                ) + section.center_rewards_coefficient * centering_penalty(scores)
                accelerator.backward(loss / section.gradient_accumulation_steps)
            loss_total += loss.detach() / section.gradient_accumulation_steps
            gap = scores.detach()[batch["better"]] - scores.detach()[batch["worse"]]
            accuracy_total += (gap > 0).float().mean() / section.gradient_accumulation_steps
        grad_norm = accelerator.clip_grad_norm_(scorer.parameters(), section.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        progress.update(1)
        window_steps += 1

        if done % section.log_every == 0 or done == total_steps:
            elapsed = time.perf_counter() - window_started
            train_loss = accelerator.reduce(loss_total, "mean").item()
            context.tracker.log({
                "train/loss": train_loss,
                "train/accuracy": accelerator.reduce(accuracy_total, "mean").item(),
                "train/grad_norm": float(grad_norm),
                "lr": scheduler.get_last_lr()[0],
                "throughput/prompts_per_second": window_steps * groups_per_step / max(elapsed, 1e-9),
            }, step=done)
            progress.set_postfix(loss=f"{train_loss:.3f}")
            window_started, window_steps = time.perf_counter(), 0
        if done % section.eval_every == 0 or done == total_steps:
            last_eval = evaluate()
            context.tracker.log({f"eval/{k}": v for k, v in last_eval.items()}, step=done)
        if done % section.save_every == 0 and done < total_steps:
            save_checkpoint(
                checkpoints, done, accelerator=accelerator, model=scorer, optimizer=optimizer,
                scheduler=scheduler, tokenizer=tokenizer, extra={"first_eval": first_eval}, keep=section.keep_checkpoints,
            )
    progress.close()

    # ----------------------------------------------------------------------------------- save
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(scorer)
    final_model = accelerator.unwrap_model(scorer).pretrained_model
    if section.lora is not None:
        final_model, state_dict = final_model.merge_and_unload(), None
    if accelerator.is_main_process:
        if state_dict is not None:
            state_dict = {key.removeprefix("pretrained_model."): value for key, value in state_dict.items()}
        final_model.save_pretrained(context.output_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(context.output_dir)
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
        "resumed_from_step": resumed_from,
    }
    return StageResult(context.output_dir, metrics)


if __name__ == "__main__":
    run_stage("reward", train)
