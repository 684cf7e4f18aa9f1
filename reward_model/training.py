"""Training one reward model on preference groups: the loop the reward stage and its judges share.

    result = train_reward_model(
        "reward", accelerator, section, backbone_dir, tokenizer, train_groups, validation_groups,
        checkpoint_dir=stage_dir / "checkpoints", output_dir=stage_dir / "final", tracker=tracker,
        seed=config.seed, token_cache=run_dir / "cache" / "chat_tokens",
    )

The backbone starts from a causal LM (the SFT policy or the pretrained model) with a new scalar
head. Each micro-batch holds whole prompts with all their completions: every completion is scored
once and the loss averages each prompt's pairs (reward_model/losses.py). We write this loop rather
than use TRL's RewardTrainer because RewardTrainer treats pairs independently, so it can neither
share one forward pass among a prompt's K completions nor weight prompts equally.

The output folder is a plain `AutoModelForSequenceClassification` with its tokenizer, the score
statistics PPO normalises with (`reward_stats.json`: mean, std and the score's slope against
reply length on held-out completions) and the fingerprints of the groups it trained on
(`trained_on.json`), so no later accuracy is ever measured on them.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch

from data.preferences import PreferenceGroup
from pipeline.config import PreferenceTraining, RewardTraining
from accelerate.utils import set_seed

from pipeline.models.lora import add_lora_adapters
from pipeline.training.distributed import engine_of, whole_model_init
from pipeline.training.loop import Cadence, OptimizerStep, SupervisedStep, fit, save_final_model, step_indices
from pipeline.training.optimization import adamw, prepare_training, warmup_cosine
from pipeline.training.state import Checkpointer
from reward_model.batching import EncodedGroup, collate_groups, encode_groups, length_balancing_weights
from reward_model.evaluation import evaluate_preferences
from reward_model.losses import centering_penalty, grouped_pairwise_loss
from reward_model.model import TokenScorer, build_reward_model
from reward_model.provenance import write_trained_on
from reward_model.scoring import at_last_token
from reward_model.statistics import ScoreStatistics


@dataclass
class TrainedRewardModel:
    """What training one reward model measured (metrics for the manifest) and where it lies."""

    output_dir: Path
    metrics: dict[str, Any]


def training_steps(section: PreferenceTraining, train_prompts: int, world_size: int) -> int:
    """Optimiser steps to train on `train_prompts` groups: `max_steps`, else `epochs` passes."""
    groups_per_step = section.prompts_per_batch * world_size * section.gradient_accumulation_steps
    return section.max_steps or max(1, math.ceil(section.epochs * train_prompts / groups_per_step))


@torch.no_grad()
def length_trend(scorer, groups: list[EncodedGroup], pad_token_id: int, batch_groups: int, accelerator) -> tuple[float, float]:
    """(slope, mean length): the least-squares slope of the model's score against reply length
    (score per token) over every held-out completion, how much this reward model pays for length
    as such, and those completions' mean reply length."""
    was_training = scorer.training
    scorer.eval()
    mine = groups[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(5, dtype=torch.float64, device=accelerator.device)  # n, sum x, sum y, sum xy, sum xx
    for start in range(0, len(mine), batch_groups):
        chunk = mine[start : start + batch_groups]
        batch = collate_groups(chunk, pad_token_id)
        input_ids, attention_mask = batch["input_ids"].to(accelerator.device), batch["attention_mask"].to(accelerator.device)
        y = at_last_token(scorer(input_ids, attention_mask), attention_mask).double()
        x = torch.tensor([length for group in chunk for length in group.reply_lengths], dtype=torch.float64, device=y.device)
        totals += torch.stack([torch.tensor(float(len(x)), dtype=torch.float64, device=y.device), x.sum(), y.sum(), (x * y).sum(), (x * x).sum()])
    n, sx, sy, sxy, sxx = accelerator.reduce(totals, "sum").tolist()
    scorer.train(was_training)
    variance = sxx - sx * sx / max(n, 1)
    return ((sxy - sx * sy / max(n, 1)) / variance if variance > 0 else 0.0), sx / max(n, 1)


def train_reward_model(
    name: str,
    accelerator,
    section: RewardTraining,
    backbone_dir: Path,
    tokenizer,
    train_groups: list[PreferenceGroup],
    validation_groups: list[PreferenceGroup],
    *,
    checkpoint_dir: Path,
    output_dir: Path,
    tracker,
    seed: int,
    token_cache: Path | None = None,
) -> TrainedRewardModel:
    """Train, evaluate on the validation groups, and save one reward model (collective)."""
    # ----------------------------------------------------------------------------------- data
    with accelerator.main_process_first():  # rendered once, by the main process on all cores
        train_encoded = encode_groups(train_groups, tokenizer, section.max_length, token_cache)
        validation_encoded = encode_groups(validation_groups, tokenizer, section.max_length, token_cache)
    if section.length_balanced:
        train_encoded = length_balancing_weights(train_encoded)
    groups_per_step = section.prompts_per_batch * accelerator.num_processes * section.gradient_accumulation_steps
    total_steps = training_steps(section, len(train_encoded), accelerator.num_processes)

    # ---------------------------------------------------------------------------------- model
    optimizer_step = prepare_scorer(section, backbone_dir, tokenizer, accelerator, total_steps)
    scorer = optimizer_step.model

    # ----------------------------------------------------------------------------------- loop
    result = fit(
        name, accelerator,
        SupervisedStep(
            optimizer_step, group_batches(train_encoded, tokenizer, accelerator, section, seed, section.margin),
            preference_loss(scorer, section),
        ),
        Checkpointer(checkpoint_dir, accelerator, section.keep_checkpoints, parts={"": "pretrained_model"}),
        tracker,
        Cadence(total_steps, section.log_every, section.eval_every, section.save_every),
        evaluate=partial(
            evaluate_preferences, scorer, validation_encoded, tokenizer.pad_token_id, section.prompts_per_batch, accelerator
        ),
        units_per_step=groups_per_step, unit="prompt", tokenizer=tokenizer,
    )
    first_eval, last_eval = result.first_eval, result.last_eval
    slope, mean_length = length_trend(scorer, validation_encoded, tokenizer.pad_token_id, section.prompts_per_batch, accelerator)

    # ----------------------------------------------------------------------------------- save
    save_reward_model(accelerator, section, scorer, tokenizer, output_dir, last_eval, slope, mean_length, train_groups)
    metrics = {
        "world_size": accelerator.num_processes,
        "replicas_in_sync": engine_of(accelerator).replicas_in_sync(scorer),
        "steps": total_steps,
        "accuracy": last_eval["accuracy"],
        "shorter_wins_accuracy": last_eval["shorter_wins_accuracy"],
        "accuracy_longer_chosen": last_eval["accuracy_longer_chosen"],
        "mean_margin": last_eval["mean_margin"],
        "reward_mean": last_eval["reward_mean"],
        "reward_std": last_eval["reward_std"],
        "length_slope": slope,
        "validation_pairs": last_eval["pairs"],
        "validation_prompts": len(validation_encoded),
        "train_prompts": len(train_encoded),
        "train_pairs": sum(len(g.pairs) for g in train_encoded),
        "initial_accuracy": first_eval["accuracy"] if first_eval else None,
        "resumed_from_step": result.resumed_from,
    }
    return TrainedRewardModel(output_dir, metrics)


def prepare_scorer(section: RewardTraining, backbone_dir: Path, tokenizer, accelerator, total_steps: int) -> OptimizerStep:
    """The backbone with a fresh scalar head (and LoRA adapters if `lora`), scoring every token,
    with its optimiser and schedule, prepared for the launch's engine."""
    # Assembled whole (the backbone's weights copied into a new model with a fresh head), also
    # under ZeRO-3, whose zero.Init would leave the copy nothing to land in and draw the head apart.
    with whole_model_init():
        model = build_reward_model(backbone_dir, pad_token_id=tokenizer.pad_token_id)
    if section.lora is not None:
        model = add_lora_adapters(model, section.lora, task_type="SEQ_CLS", trained_whole=["score"])
    optimizer = adamw(model, section.learning_rate, section.weight_decay)
    scheduler = warmup_cosine(optimizer, int(section.warmup_ratio * total_steps), total_steps, section.min_lr_ratio)
    return prepare_training(
        accelerator, TokenScorer(model), optimizer, scheduler,
        micro_batch_size=section.prompts_per_batch, max_grad_norm=section.max_grad_norm,
    )


def group_batches(
    train_encoded: list[EncodedGroup], tokenizer, accelerator, section: PreferenceTraining, seed: int, margin: float = 0.0
) -> Callable[[int], list[dict]]:
    """`micro_batches(step)` for `fit`: whole prompts with all their completions, for each
    micro-step of optimiser step `step`, on this process's device (`margin` added to every pair's:
    the reward model's `margin`; DPO's pairs have none)."""
    def micro_batches(step: int) -> list[dict]:
        batches = []
        steps = step_indices(
            step, accelerator, accumulation=section.gradient_accumulation_steps,
            size=section.prompts_per_batch, examples=len(train_encoded), seed=seed,
        )
        for indices in steps:
            batch = collate_groups([train_encoded[i] for i in indices], tokenizer.pad_token_id, margin)
            batches.append({k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()})
        return batches

    return micro_batches


def preference_loss(scorer, section: RewardTraining) -> Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """`loss(batch)` for `fit`: the grouped pairwise loss plus the centering penalty, and the
    micro-batch's pair accuracy."""
    def loss(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        scores = at_last_token(scorer(batch["input_ids"], batch["attention_mask"]), batch["attention_mask"])
        value = grouped_pairwise_loss(
            scores, batch["better"], batch["worse"], batch["pair_group"], batch["margins"], batch["n_groups"],
            batch.get("weights"),
        ) + section.center_rewards_coefficient * centering_penalty(scores)
        gap = scores.detach()[batch["better"]] - scores.detach()[batch["worse"]]
        return value, {"accuracy": (gap > 0).float().mean()}

    return loss


def save_reward_model(
    accelerator, section: RewardTraining, scorer, tokenizer, output_dir: Path, last_eval: dict[str, float],
    slope: float, mean_length: float, train_groups: list[PreferenceGroup],
) -> None:
    """The model folder (LoRA merged), its score statistics and the fingerprints of the groups it
    trained on (collective)."""
    lora_save = "merged" if section.lora is not None else None
    save_final_model(accelerator, scorer, output_dir, tokenizer, part="pretrained_model", lora_save=lora_save)
    if accelerator.is_main_process:
        # PPO normalises scores with these; in the folder, they are covered by its digest.
        ScoreStatistics(
            mean=last_eval["reward_mean"], std=last_eval["reward_std"], length_slope=slope, length_mean=mean_length,
        ).write(output_dir)
        write_trained_on(output_dir, train_groups)


MEMBER_DONE = "member_metrics.json"  # written last into a model's folder by `train_in_turn`: that model is complete


@dataclass(frozen=True)
class Member:
    """One of several reward models a stage trains in turn: its name, seed, output folder and checkpoints."""

    name: str
    seed: int
    output_dir: Path
    checkpoint_dir: Path


def train_in_turn(
    members: list[Member], accelerator, section: RewardTraining, backbone_dir: Path, tokenizer,
    train_groups: list[PreferenceGroup], validation_groups: list[PreferenceGroup], *, tracker,
    token_cache: Path | None = None,
) -> list[dict[str, Any]]:
    """Train several reward models one after another on one launch (judges, an ensemble): each from
    its own seed, logged under its name at steps after the one before. A model whose folder holds
    its metrics file is complete and kept on a resumed run; one cut short resumes from its checkpoints.
    Returns each model's metrics. Collective."""
    steps = training_steps(section, len(train_groups), accelerator.num_processes)
    results = []
    for index, member in enumerate(members):
        done = member.output_dir / MEMBER_DONE
        if done.exists():  # trained before an interruption
            results.append(json.loads(done.read_text()))
            continue
        if member.output_dir.exists() and accelerator.is_main_process:
            shutil.rmtree(member.output_dir)  # a save cut short; the model resumes from its checkpoints
        accelerator.wait_for_everyone()
        set_seed(member.seed)
        trained = train_reward_model(
            member.name, accelerator, section, backbone_dir, tokenizer, train_groups, validation_groups,
            checkpoint_dir=member.checkpoint_dir, output_dir=member.output_dir,
            tracker=tracker.prefixed(member.name, step_offset=index * (steps + 1)),
            seed=member.seed, token_cache=token_cache,
        ).metrics
        if accelerator.is_main_process:
            done.write_text(json.dumps(trained, indent=2) + "\n")
        accelerator.free_memory()  # the next model is prepared afresh (DeepSpeed allows one engine at a time)
        results.append(trained)
    return results
