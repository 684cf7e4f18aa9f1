"""The optimisation half of RLHF: PPO epochs over a rollout, for ppo, rloo and grpo alike.

    trainer = RLTrainer(policy, reference, value, reward_fn, tokenizer, config, accelerator, ...)
    metrics = trainer.step(query_ids, query_mask)     # one rollout, then its updates

We build this on transformers + accelerate because TRL removed its PPO trainer (1.13). The
policy and the value model travel as one module (`PolicyAndValue`) so an engine that prepares
one model at a time can wrap them together; they keep separate learning rates (two parameter
groups) and separate gradient clipping.
"""

from __future__ import annotations

import functools
import time

import torch
from torch import nn

from pipeline.config import PPOConfig
from pipeline.models.generation import seeded_generator
from pipeline.models.logprobs import log_softmax_at, masked_mean, masked_sum, response_logits, token_logprobs
from pipeline.models.responses import Responses, length_sorted_micro_batches
from pipeline.training.distributed import engine_of
from pipeline.training.optimization import fused_adamw_supported, prepare_training
from reward_model.functions import ProgrammableReward, RewardFunction
from reward_model.judges import JudgePanel
from reward_model import policy_evaluation
from reward_model.policy_evaluation import PolicyEvaluation
from stages.ppo.kl_control import AdaptiveKLController, FixedKLController
from stages.ppo.losses import (
    MinibatchSize,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_log_probs,
    importance_log_ratio,
    kl_estimate,
)
from stages.ppo.rollout import Experience, ExperienceMaker, response_values


class PolicyAndValue(nn.Module):
    """The two trained models as one module: forward gives response logits and values."""

    def __init__(self, policy: nn.Module, value: nn.Module | None):
        super().__init__()
        self.policy, self.value = policy, value

    def forward(self, sequence_ids, attention_mask, response_length: int):
        logits = response_logits(self.policy, sequence_ids, attention_mask, response_length)
        values = response_values(self.value, sequence_ids, attention_mask, response_length) if self.value is not None else None
        return logits, values


def disable_dropout(model: nn.Module) -> None:
    """Dropout off: with it, logprobs of the same tokens differ between rollout and training passes.

    Besides nn.Dropout modules, attention layers keep their rate as a float attribute read at
    forward time (Llama's `attention_dropout`), so those are zeroed too, and so is the config.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if isinstance(value, float) and ("dropout" in name or "pdrop" in name):
                setattr(module, name, 0.0)
    config = getattr(model, "config", None)
    if config is not None:
        for key, value in config.to_dict().items():
            if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
                setattr(config, key, 0.0)


class RLTrainer:
    def __init__(
        self,
        policy: nn.Module,
        reference: nn.Module | None,
        value: nn.Module | None,
        reward_fn: RewardFunction,
        tokenizer,
        config: PPOConfig,
        accelerator,
        *,
        score_mean: float = 0.0,
        score_std: float = 1.0,
        length_trend: tuple[float, float] = (0.0, 0.0),
        total_updates: int,
        seed: int = 0,
        reference_context=None,
        reward_model: nn.Module | None = None,
    ):
        """reward_model: the model behind `reward_fn`, if any, placed like the reference (sharded
        under a sharding engine)."""
        self.config, self.accelerator, self.tokenizer = config, accelerator, tokenizer
        for model in (policy, reference, value):
            if model is not None:
                disable_dropout(model)
        use_value = config.algorithm.estimator == "ppo"
        wrapper = PolicyAndValue(policy, value if use_value else None)
        groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": config.algorithm.policy_learning_rate}]
        if use_value:
            groups.append({"params": [p for p in value.parameters() if p.requires_grad], "lr": config.algorithm.value_learning_rate})
        trainable = [p for group in groups for p in group["params"]]
        optimizer = torch.optim.AdamW(groups, eps=1e-5, weight_decay=0.0, fused=fused_adamw_supported(trainable))
        schedule = (lambda step: 1.0 - step / max(total_updates, 1)) if config.algorithm.lr_schedule == "linear" else (lambda step: 1.0)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        # Policy and value gradients are clipped apart: their scales differ.
        self.optimizer_step = prepare_training(
            accelerator, wrapper, optimizer, self.scheduler,
            micro_batch_size=config.algorithm.micro_batch_size, max_grad_norm=config.algorithm.max_grad_norm,
            clip_groups=lambda: {"policy": accelerator.unwrap_model(self.model).policy, "value": accelerator.unwrap_model(self.model).value},
        )
        self.model, self.optimizer = self.optimizer_step.model, self.optimizer_step.optimizer
        self.kl_controller = (
            AdaptiveKLController(config.reward.kl_coef, config.reward.target_kl, config.reward.kl_horizon)
            if config.reward.adaptive_kl
            else FixedKLController(config.reward.kl_coef)
        )
        # Frozen models are placed after the trained one (the engine's `auto` settings are resolved by
        # then), in place: the reward function keeps calling the module it holds.
        for frozen in (reference, reward_model):
            if frozen is not None:
                engine_of(accelerator).place_frozen(frozen)
        self.maker = ExperienceMaker(
            functools.partial(engine_of(accelerator).whole_for_rollout, self.model), reference, reward_fn, tokenizer,
            config, accelerator, score_mean=score_mean, score_std=score_std, length_trend=length_trend,
            reference_context=reference_context,
        )
        self.generator = torch.Generator().manual_seed(seed + accelerator.process_index)
        self.episode = 0

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        """What a checkpoint carries beyond the weights and optimiser (the Checkpointer's component)."""
        return {"episode": self.episode, "kl_controller": self.kl_controller.state_dict(),
                "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.episode = state["episode"]
        self.kl_controller.load_state_dict(state["kl_controller"])
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    # ------------------------------------------------------------------------------ rollout
    def rollout(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> Experience:
        self.model.eval()
        if isinstance(self.maker.reward_fn, ProgrammableReward):  # its reward/<name> means cover this rollout alone
            self.maker.reward_fn.reset()
        scored = self.maker.score(query_ids.to(self.accelerator.device), query_mask.to(self.accelerator.device))
        return self.maker.experience(scored, self.kl_controller.value)

    # ------------------------------------------------------------------------------- update
    def update(self, experience: Experience) -> dict[str, float]:
        """ppo_epochs passes over the rollout, each in num_mini_batches optimiser steps."""
        config, accelerator = self.config, self.accelerator
        self.model.train()
        local = len(experience)
        mini_size = local // config.algorithm.num_mini_batches
        totals: dict[str, list[torch.Tensor]] = {}
        for _ in range(config.algorithm.ppo_epochs):
            order = torch.randperm(local, generator=self.generator)
            for mini_start in range(0, mini_size * config.algorithm.num_mini_batches, mini_size):
                mini = order[mini_start : mini_start + mini_size]
                # Gradients add up over the minibatch whatever its order: group similar lengths.
                micro_batches = [experience.select(mini[rows].to(experience.response_ids.device)).without_padding_columns()
                                 for rows in length_sorted_micro_batches(
                                     experience.query_mask[mini], experience.response_mask[mini], config.algorithm.micro_batch_size)]
                size = self.minibatch_size(micro_batches)
                output = self.optimizer_step(
                    micro_batches, functools.partial(self.micro_loss, size=size), weights=[1.0] * len(micro_batches)
                )
                for stats in output.micro_stats:
                    for key, value in stats.items():
                        totals.setdefault(key, []).append(value)
                for name, norm in output.grad_norms.items():
                    if norm is not None:  # an engine that clips inside itself reports nothing here
                        totals.setdefault(f"{name}/grad_norm", []).append(torch.as_tensor(float(norm), device=accelerator.device))
        means = {key: torch.stack(values).mean() for key, values in totals.items()}
        keys = sorted(means)
        reduced = accelerator.reduce(torch.stack([means[k] for k in keys]), "mean").tolist()
        return dict(zip(keys, reduced))

    def minibatch_size(self, micro_batches: list[Experience]) -> MinibatchSize:
        """This process's minibatch in sequences and tokens, and its tokens over every process."""
        tokens = sum(micro.response_mask.sum() for micro in micro_batches)
        global_tokens = self.accelerator.reduce(tokens.detach().clone(), "sum") if self.config.algorithm.loss_aggregation == "token_sum" else tokens
        return MinibatchSize(
            sequences=sum(len(micro) for micro in micro_batches), tokens=tokens, global_tokens=global_tokens,
            processes=self.accelerator.num_processes, response_length=self.config.sampling.response_length,
        )

    def micro_loss(self, batch: Experience, size: MinibatchSize | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """This micro-batch's share of the minibatch loss: the policy loss (and the KL term) as
        `loss_aggregation` says; the entropy bonus and the value loss as token means weighted by
        the micro-batch's share of the minibatch's responses. Without `size`, the batch is its
        own minibatch."""
        size = size or self.minibatch_size([batch])
        config, mask = self.config, batch.response_mask
        algorithm = config.algorithm
        share = len(batch) / size.sequences
        logits, values = self.model(batch.sequence_ids, batch.attention_mask, batch.response_ids.shape[1])
        log_probs = log_softmax_at(logits, config.sampling.temperature)
        logprobs = token_logprobs(log_probs, batch.response_ids)
        log_ratio = importance_log_ratio(logprobs, batch.logprobs, mask, algorithm.importance_ratio)
        per_token, policy_stats = clipped_policy_loss(log_ratio, batch.advantages, mask, algorithm.cliprange)
        policy_loss = aggregate(per_token, mask, algorithm.loss_aggregation, size)
        loss = policy_loss
        stats = {
            "loss/policy": policy_loss.detach() / share,
            "policy/clipfrac": policy_stats["clipfrac"],
            "policy/approxkl": policy_stats["approxkl"],
            "policy/ratio": policy_stats["ratio"],
            "policy/entropy": masked_mean(entropy_from_log_probs(log_probs.detach()), mask),
        }
        if algorithm.entropy_coef > 0:  # a bonus for keeping the next-token distribution spread
            entropy = masked_mean(entropy_from_log_probs(log_probs), mask)
            loss = loss - algorithm.entropy_coef * entropy * share
        if config.reward.kl_penalty == "loss":
            kl_loss = aggregate(kl_estimate(logprobs, batch.ref_logprobs, config.reward.kl_estimator), mask, algorithm.loss_aggregation, size)
            loss = loss + self.kl_controller.value * kl_loss
            stats["loss/kl"] = kl_loss.detach() / share
        if values is not None:
            value_loss, value_stats = clipped_value_loss(values, batch.values, batch.returns, mask, algorithm.cliprange_value)
            loss = loss + algorithm.vf_coef * value_loss * share
            stats["loss/value"] = value_loss.detach()
            stats["val/clipfrac"] = value_stats["clipfrac"]
        return loss, stats

    # --------------------------------------------------------------------------------- step
    def step(self, query_ids: torch.Tensor, query_mask: torch.Tensor) -> tuple[dict[str, float], Experience]:
        """One rollout and its updates; returns RL metrics (over all processes) and the experience."""
        started = time.perf_counter()
        experience = self.rollout(query_ids, query_mask)
        rollout_seconds = time.perf_counter() - started
        rollout_metrics = self.rollout_metrics(experience)
        started = time.perf_counter()
        update_metrics = self.update(experience)
        update_seconds = time.perf_counter() - started
        episodes = len(experience) * self.accelerator.num_processes
        self.episode += episodes
        self.kl_controller.update(rollout_metrics["objective/kl"], episodes)
        generated = rollout_metrics.pop("_generated_tokens")
        return {
            **rollout_metrics,
            **update_metrics,
            "objective/kl_coef": self.kl_controller.value,
            "lr": self.scheduler.get_last_lr()[0],
            "episode": self.episode,
            "time/rollout": rollout_seconds,
            "time/update": update_seconds,
            "throughput/episodes_per_second": episodes / (rollout_seconds + update_seconds),
            "throughput/generated_tokens_per_second": generated / rollout_seconds,
        }, experience

    def rollout_metrics(self, experience: Experience) -> dict[str, float]:
        """Sequence-level means over every process's episodes, all masked to real tokens."""
        mask = experience.response_mask
        sequence_kl = masked_sum(experience.kl, mask, dim=1)
        beta = self.kl_controller.value
        per_episode = torch.stack([
            sequence_kl,
            masked_sum(-experience.logprobs, mask, dim=1),
            experience.scores,
            experience.raw_scores,
            experience.scores - beta * sequence_kl,
            -beta * sequence_kl,
            mask.sum(1).float(),
            experience.has_eos.float(),
        ])
        means = self.accelerator.reduce(per_episode.mean(1), "mean").tolist()
        num_eos = self.accelerator.reduce(experience.has_eos.sum().float(), "sum").item()
        generated = self.accelerator.reduce(mask.sum().float(), "sum").item() / self.accelerator.num_processes
        names = [
            "objective/kl", "objective/entropy", "objective/scores", "objective/raw_scores",
            "objective/rlhf_reward", "objective/non_score_reward", "val/response_length", "val/eos_fraction",
        ]
        return {**dict(zip(names, means)), **self.reward_function_means(), "val/num_eos": num_eos, "_generated_tokens": generated}

    def reward_function_means(self) -> dict[str, float]:
        """`reward/<name>`: each programmable reward's mean value over the rollout's replies on every process."""
        reward_fn = self.maker.reward_fn
        if not isinstance(reward_fn, ProgrammableReward):
            return {}
        totals = reward_fn.totals()
        names = sorted(totals)
        local = torch.tensor([[totals[name][0], totals[name][1]] for name in names], dtype=torch.float64, device=self.accelerator.device)
        summed = self.accelerator.reduce(local, "sum").tolist()
        return {f"reward/{name}": total / max(count, 1) for name, (total, count) in zip(names, summed)}


def evaluate_policy(
    trainer: RLTrainer, prompt_batches: list[tuple[torch.Tensor, torch.Tensor]], seed: int, panel: JudgePanel | None = None
) -> PolicyEvaluation:
    """The policy in training on held-out prompts, through the one policy evaluator
    (reward_model/policy_evaluation.py) the eval stage uses too: sampled and scored as its rollouts
    are, with the judges (when there are any) scoring the same replies.

    Sampling is seeded, so the same policy gets the same numbers, and the reference scored against
    itself gets KL exactly 0. Each process evaluates its own share of the batches (the same number
    on every process: under sharding engines scoring is a collective); the result holds every
    process's replies, process by process.
    """
    accelerator = trainer.accelerator
    trainer.model.eval()
    # A private stream: the training RNG (checkpointed for exact resume) is left where it was.
    generator = seeded_generator(seed + accelerator.process_index, accelerator.device)
    evaluation = policy_evaluation.evaluate_policy(
        trainer.maker.score, prompt_batches, generator, panel, trainer.tokenizer,
        micro_batch_size=trainer.config.algorithm.micro_batch_size,
    )
    return evaluation.gathered(accelerator)


def decode_samples(tokenizer, responses: Responses | Experience, raw_scores: torch.Tensor) -> list[dict]:
    """(query, response, score, has_eos) rows as text, for sample tables."""
    rows = []
    for index in range(len(responses)):
        query = responses.query_ids[index][responses.query_mask[index].bool()]
        response = responses.response_ids[index][responses.response_mask[index].bool()]
        rows.append({
            "query": tokenizer.decode(query, skip_special_tokens=False),
            "response": tokenizer.decode(response, skip_special_tokens=True),
            "score": float(raw_scores[index]),
            "has_eos": bool(responses.has_eos[index]),
        })
    return rows
