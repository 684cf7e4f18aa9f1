"""Direct preference optimisation: the SFT policy trained on ranked completions, with no reward model.

    python -m stages.dpo --run-dir runs/tiny
    accelerate launch --num_processes 8 -m stages.dpo --run-dir runs/big

Reads the SFT policy (or the pretrained model when there is no SFT stage) from the manifest and
the same preference files the reward stage reads (pairs, and K-way rankings as every ordered
pair; reward_model/data.py and reward_model/batching.py), held out as it holds them out. Each
micro-batch holds whole prompts with all their completions, each completion scored once; the
loss (`dpo.loss`: sigmoid, ipo, hinge or simpo, stages/dpo/losses.py) averages each prompt's pairs,
then the prompts. The reference's log-probs are computed once before training and cached with the
run (stages/dpo/reference.py), so no reference model is held while training. Trains on the shared
loop (pipeline/training/loop.py): resumable `step-N` checkpoints in RUN_DIR/dpo/checkpoints.

Held-out metrics at step 0, during and after training: the loss, the implicit reward's accuracy
(chosen above rejected; 0.5 at step 0, where every reward is 0), margins and rewards, beside the
policy's own length-normalised preference (`likelihood_accuracy`: how often it gives the chosen
reply the higher log-probability per token; at step 0, the SFT policy's) and the rule "the
shorter reply wins" on the same pairs. Output: RUN_DIR/dpo/final, a causal LM like SFT's (LoRA
merged into it).

Why not TRL's DPOTrainer: it is a Trainer, with the pickled, in-place checkpoints SFT left
(stages/sft/__main__.py), and it treats pairs independently, so a K-way ranking's completions are
scored once per pair they appear in and a prompt with many pairs outweighs one with a single pair.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from accelerate.utils import set_seed
from transformers import AutoTokenizer

from pipeline.config import DPOConfig
from pipeline.models.checkpoints import load_causal_lm
from pipeline.models.lora import add_lora_adapters
from pipeline.orchestration.stage import StageContext, StageResult, resolve_mixed_precision, run_stage
from pipeline.training.distributed import engine_of, make_accelerator, whole_model_init
from pipeline.training.loop import Cadence, OptimizerStep, SupervisedStep, fit, save_final_model
from pipeline.training.optimization import adamw, prepare_training, warmup_cosine
from pipeline.training.state import Checkpointer
from reward_model.batching import EncodedGroup, collate_groups, encode_groups
from reward_model.data import held_out_groups, load_preference_groups, split_for_judges
from reward_model.losses import per_prompt_mean
from reward_model.training import group_batches, training_steps
from stages.dpo.losses import REFERENCE_FREE, PairLosses, pair_losses, reward_accuracy
from stages.dpo.reference import cached_reference, length_order, reference_key, reference_logps, reply_logps, with_reference


def train(context: StageContext) -> StageResult:
    config, section = context.config, context.config.dpo
    policy_dir = context.inputs[config.policy_stage]
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)

    # ---------------------------------------------------------------------------------- setup
    accelerator = make_accelerator(resolve_mixed_precision(section.launch.mixed_precision))
    set_seed(config.seed)

    # ----------------------------------------------------------------------------------- data
    cache = context.run_dir / "cache"
    groups, rows = load_preference_groups(section.data, section, cache / "datasets", config_section="dpo")
    given_to_judges, judges_share = 0, config.judges_share_of(section.data)
    if judges_share is not None:  # the reward data: its judges' prompts are eval's, held out from every model
        groups, judge_groups = split_for_judges(groups, judges_share, config.seed)
        given_to_judges = len(judge_groups)
    train_groups, validation_groups = held_out_groups(groups, section, config.seed, cache / "datasets", config_section="dpo")
    with accelerator.main_process_first():  # rendered once, by the main process on all cores
        train_encoded = encode_groups(train_groups, tokenizer, section.max_length, cache / "chat_tokens")
        validation_encoded = encode_groups(validation_groups, tokenizer, section.max_length, cache / "chat_tokens")
    total_steps = training_steps(section, len(train_encoded), accelerator.num_processes)

    # ------------------------------------------------------------------ model and reference
    needs_reference = section.loss not in REFERENCE_FREE
    # The main process scores the reference with the policy before the engine shards it, so the
    # policy is loaded whole (zero.Init would leave it empty placeholders to shard later).
    with whole_model_init() if needs_reference else contextlib.nullcontext():
        model = load_causal_lm(policy_dir)
    if section.lora is not None:
        model = add_lora_adapters(model, section.lora)
    reference_reused = None
    if needs_reference:
        everything = train_encoded + validation_encoded
        key = reference_key(context.input_digests[config.policy_stage], everything)

        def score(groups):
            return reference_logps(model.to(accelerator.device), groups, tokenizer.pad_token_id, section.prompts_per_batch, accelerator.device)

        # Computed by the main process, before the policy's first step; the others read its file.
        # The held-out groups apart, batched as evaluate_pairs batches them.
        with accelerator.main_process_first():
            logps, reference_reused = cached_reference(
                cache / "dpo_reference", key, lambda: torch.cat([score(train_encoded), score(validation_encoded)]),
            )
        split = sum(len(group.completion_ids) for group in train_encoded)
        train_encoded, validation_encoded = with_reference(train_encoded, logps[:split]), with_reference(validation_encoded, logps[split:])
    optimizer_step = prepare_policy(section, model, accelerator, total_steps)
    model = optimizer_step.model

    # ----------------------------------------------------------------------------------- loop
    groups_per_step = section.prompts_per_batch * accelerator.num_processes * section.gradient_accumulation_steps
    result = fit(
        "dpo", accelerator,
        SupervisedStep(optimizer_step, group_batches(train_encoded, tokenizer, accelerator, section, config.seed),
                       preference_loss(model, section)),
        Checkpointer(context.stage_dir / "checkpoints", accelerator, section.keep_checkpoints),
        context.tracker,
        Cadence(total_steps, section.log_every, section.eval_every, section.save_every),
        evaluate=lambda: evaluate_pairs(model, validation_encoded, section, tokenizer.pad_token_id, accelerator),
        units_per_step=groups_per_step, unit="prompt", tokenizer=tokenizer,
    )

    # ----------------------------------------------------------------------------------- save
    save_final_model(
        accelerator, model, context.output_dir, tokenizer,
        lora_save="merged" if section.lora is not None else None, generation_tokens=True,
    )
    first_eval, last_eval = result.first_eval, result.last_eval
    metrics = {
        "world_size": accelerator.num_processes,
        "replicas_in_sync": engine_of(accelerator).replicas_in_sync(model),
        "steps": total_steps,
        "loss_kind": section.loss,
        "train_loss": result.train_loss,
        **{f"eval_{name}": value for name, value in last_eval.items()},
        **({f"initial_eval_{name}": value for name, value in first_eval.items()} if first_eval is not None else {}),
        "train_prompts": len(train_encoded),
        "train_pairs": sum(len(group.pairs) for group in train_encoded),
        "validation_prompts": len(validation_encoded),
        "prompts_given_to_judges": given_to_judges,
        "rows_read": rows.total,
        "rows_dropped": rows.dropped,
        "dropped_reasons": dict(rows.reasons),
        "reference_cached": reference_reused,
        "resumed_from_step": result.resumed_from,
    }
    return StageResult(context.output_dir, metrics)


def prepare_policy(section: DPOConfig, model: torch.nn.Module, accelerator, total_steps: int) -> OptimizerStep:
    """The policy's optimiser and schedule, prepared with it for the launch's engine."""
    optimizer = adamw(model, section.learning_rate, section.weight_decay)
    scheduler = warmup_cosine(optimizer, int(section.warmup_ratio * total_steps), total_steps, section.min_lr_ratio)
    return prepare_training(
        accelerator, model, optimizer, scheduler, micro_batch_size=section.prompts_per_batch, max_grad_norm=section.max_grad_norm,
    )


def batch_pair_losses(model, batch: dict, section: DPOConfig) -> tuple[PairLosses, torch.Tensor, torch.Tensor]:
    """(the configured loss on every pair of `batch`, each completion's summed reply log-prob, its reply tokens)."""
    logps, tokens = reply_logps(model, batch["input_ids"], batch["attention_mask"], batch["reply_lengths"])
    pairs = pair_losses(
        section.loss, logps, tokens, batch.get("reference_logps"), batch["better"], batch["worse"],
        beta=section.beta, label_smoothing=section.label_smoothing, simpo_gamma=section.simpo_gamma,
    )
    return pairs, logps, tokens


def preference_loss(model, section: DPOConfig) -> Callable[[dict], tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """`loss(batch)` for `fit`: the mean over prompts of each prompt's mean pair loss, and the
    micro-batch's implicit rewards, margin and accuracy (logged as train/<key>)."""
    def loss(batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pairs, _, _ = batch_pair_losses(model, batch, section)
        statistics = {
            "chosen_reward": pairs.chosen_rewards.mean(),
            "rejected_reward": pairs.rejected_rewards.mean(),
            "margin": (pairs.chosen_rewards - pairs.rejected_rewards).mean(),
            "accuracy": reward_accuracy(pairs).mean(),
        }
        return per_prompt_mean(pairs.losses, batch["pair_group"], batch["n_groups"]), statistics

    return loss


@torch.no_grad()
def evaluate_pairs(model, groups: list[EncodedGroup], section: DPOConfig, pad_token_id: int, accelerator) -> dict[str, float]:
    """Metrics over every held-out pair, each process scoring its share of the prompts (collective).

    loss: mean over prompts of each prompt's mean pair loss, as in training
    accuracy: share of pairs whose chosen reply has the higher implicit reward (ties half: 0.5 at the reference)
    margin, chosen_reward, rejected_reward: means over pairs of the implicit rewards and their difference
    likelihood_accuracy: share of pairs whose chosen reply the policy gives the higher mean log-prob per
        reply token (ties half): the policy's own preference, which DPO should raise
    shorter_wins_accuracy: the rule "the shorter reply wins" on the same pairs (ties half)
    """
    was_training = model.training
    model.eval()
    mine = groups[accelerator.process_index :: accelerator.num_processes]
    mine = [mine[index] for index in length_order(mine)]  # the reference pass's batches: see length_order
    # loss (summed over prompts), prompts, pairs, accuracy, margin, chosen, rejected, likelihood accuracy, shorter rule
    totals = torch.zeros(9, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(mine), section.prompts_per_batch):
        batch = collate_groups(mine[start : start + section.prompts_per_batch], pad_token_id)
        batch = {key: value.to(accelerator.device) if torch.is_tensor(value) else value for key, value in batch.items()}
        pairs, logps, tokens = batch_pair_losses(model, batch, section)
        per_token = logps / tokens.clamp(min=1)
        likelihood_gap = per_token[batch["better"]] - per_token[batch["worse"]]
        length_gap = batch["length_gap"]
        totals += torch.stack([
            per_prompt_mean(pairs.losses, batch["pair_group"], batch["n_groups"]).double() * batch["n_groups"],
            torch.tensor(float(batch["n_groups"]), device=accelerator.device).double(),
            torch.tensor(float(len(pairs.losses)), device=accelerator.device).double(),
            reward_accuracy(pairs).double().sum(),
            (pairs.chosen_rewards - pairs.rejected_rewards).double().sum(),
            pairs.chosen_rewards.double().sum(),
            pairs.rejected_rewards.double().sum(),
            ((likelihood_gap > 0).double() + 0.5 * (likelihood_gap == 0).double()).sum(),
            ((length_gap < 0).double() + 0.5 * (length_gap == 0).double()).sum(),
        ])
    loss, prompts, count, correct, margin, chosen, rejected, likelihood, shorter = accelerator.reduce(totals, "sum").tolist()
    model.train(was_training)
    pairs_seen = max(count, 1)
    return {
        "loss": loss / max(prompts, 1),
        "accuracy": correct / pairs_seen,
        "margin": margin / pairs_seen,
        "chosen_reward": chosen / pairs_seen,
        "rejected_reward": rejected / pairs_seen,
        "likelihood_accuracy": likelihood / pairs_seen,
        "shorter_wins_accuracy": shorter / pairs_seen,
        "pairs": int(count),
    }


if __name__ == "__main__":
    run_stage("dpo", train)
