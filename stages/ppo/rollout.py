"""Experience making: prompts in, a batch of scored, advantage-annotated responses out.

    maker = ExperienceMaker(trained, reference, reward_fn, tokenizer, config, accelerator,
                            score_mean=stats.mean, score_std=stats.std)
    experience = maker.experience(maker.score(query_ids, query_mask), kl_coef)   # one rollout on this process

The implementation details that make RLHF PPO work (Huang et al., "The N Implementation
Details of RLHF with PPO") live here:

- queries are left-padded with a pad token that is not EOS; every forward pass, sampling
  included, gets explicit position ids (cumulative sum of the attention mask);
- responses are sampled at the configured temperature with no top-k, top-p or other processor
  (pipeline/models/generation.py), and every logprob (rollout, reference and, later, training)
  comes from a separate forward pass on logits divided by that same temperature, never from the
  sampling loop's own logits;
- a response is cut after its first EOS (later tokens become pad); the reward model scores the
  cut (query, response) and the score lands on the EOS token itself; a response with no EOS gets
  the configured penalty;
- the per-token reward is -beta * KL(policy || reference) plus the normalised score on the last
  token (or the score alone, with the KL a loss term: `ppo.reward.kl_penalty`); advantages come
  from GAE (PPO) or a group baseline (RLOO, GRPO) and, with `whiten_advantages`, are whitened
  over the whole rollout across processes. Every statistic is masked to real response tokens.

Sampling and the length-sorted, padding-free scoring passes are pipeline/models/responses.py,
shared with eval; the update cuts its micro-batches the same way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable

import torch

from pipeline.config import PPOConfig
from pipeline.models.generation import Sampling
from pipeline.models.logprobs import masked_sum
from pipeline.models.responses import (
    ScoredResponses,
    real_columns,
    response_logprobs,
    sample_responses,
    score_in_micro_batches,
)
from reward_model.functions import RewardFunction
from stages.ppo.advantages import (
    generalized_advantages,
    group_normalized_advantages,
    leave_one_out_advantages,
    shaped_rewards,
    whiten,
)
from stages.ppo.losses import kl_estimate


@dataclass
class Experience:
    """One rollout on one process. Per-token tensors are (batch, response_len)."""

    query_ids: torch.Tensor  # (batch, query_len), left-padded
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # cut after the first EOS, pad after it
    response_mask: torch.Tensor  # 1 on response tokens up to and including the EOS
    logprobs: torch.Tensor  # behaviour policy's, at the sampling temperature
    ref_logprobs: torch.Tensor
    values: torch.Tensor | None  # value model's estimate before each response token (PPO only)
    raw_scores: torch.Tensor  # (batch,) reward model's scores
    scores: torch.Tensor  # (batch,) normalised, penalised, clipped: what RL optimises
    has_eos: torch.Tensor  # (batch,) bool
    last_index: torch.Tensor  # (batch,) position of the EOS, or response_len - 1 without one
    kl: torch.Tensor  # per-token KL estimate to the reference
    rewards: torch.Tensor  # per-token shaped rewards (PPO) or the sequence reward on the last token
    advantages: torch.Tensor
    returns: torch.Tensor | None

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def select(self, indices: torch.Tensor) -> "Experience":
        return Experience(**{
            f.name: (getattr(self, f.name)[indices] if getattr(self, f.name) is not None else None)
            for f in fields(self)
        })

    def without_padding_columns(self) -> "Experience":
        """The same episodes, minus the query and response columns that are padding in every row."""
        query_columns, response_columns = real_columns(self.query_mask, self.response_mask)

        def cut(name: str, value: torch.Tensor | None) -> torch.Tensor | None:
            if value is None or value.dim() < 2:
                return value
            return value[:, query_columns] if name.startswith("query") else value[:, response_columns]

        return Experience(**{f.name: cut(f.name, getattr(self, f.name)) for f in fields(self)})

    @property
    def sequence_ids(self) -> torch.Tensor:
        return torch.cat([self.query_ids, self.response_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.response_mask], dim=1)


def response_values(value_scorer, sequence_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """The value of the state before each response token: (batch, response_len)."""
    per_token = value_scorer(sequence_ids, attention_mask)
    return per_token[:, -response_length - 1 : -1]


class ExperienceMaker:
    """Produces Experience from prompts; never changes a model."""

    def __init__(self, trained: Callable[[], contextlib.AbstractContextManager], reference, reward_fn: RewardFunction,
                 tokenizer, config: PPOConfig, accelerator, *, score_mean: float = 0.0, score_std: float = 1.0,
                 length_trend: tuple[float, float] = (0.0, 0.0),
                 reference_context: Callable[[], contextlib.AbstractContextManager] | None = None):
        """trained: a context that yields the trained models with whole weights and local forward
        passes (an object with `.policy`, the causal LM sampled from, and `.value`, a TokenScorer
        or None); reference: a frozen copy of the policy, or None when `reference_context()` turns
        the policy into the reference (LoRA with the adapter disabled); score_mean, score_std: the
        reward model's score statistics, used when `config.reward.normalize_scores`; length_trend:
        its score's slope against reply length and the mean length it is centred on,
        subtracted when `config.reward.length_correction`.

        Under sharding engines the reference and the reward function's model are sharded, so their
        forward passes are collectives: every process scores the same number of micro-batches."""
        self.trained, self.reference = trained, reference
        self.reward_fn, self.tokenizer, self.config, self.accelerator = reward_fn, tokenizer, config, accelerator
        self.reference_context = reference_context or contextlib.nullcontext
        self.sampling = Sampling(temperature=config.sampling.temperature)
        self.score_mean = score_mean if config.reward.normalize_scores else 0.0
        self.score_std = score_std if config.reward.normalize_scores and score_std > 0 else 1.0
        self.length_slope, self.length_mean = length_trend if config.reward.length_correction else (0.0, 0.0)

    @torch.no_grad()
    def score(self, query_ids: torch.Tensor, query_mask: torch.Tensor, generator: torch.Generator | None = None) -> ScoredResponses:
        """Sample one response per query (drawing from `generator`, else the global RNG) and score
        it with the policy, the reference, the value model and the reward function.

        Everything that reads the trained weights runs inside one `trained()` context (one gather
        per rollout under a sharding engine, never one per token); the frozen models run after it."""
        config, tokenizer, micro = self.config, self.tokenizer, self.config.algorithm.micro_batch_size
        ref_logprobs = values = None
        with self.trained() as models:
            responses = sample_responses(
                models.policy, query_ids, query_mask, max_new_tokens=config.sampling.response_length,
                sampling=self.sampling, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                generator=generator,
            )
            logprobs = response_logprobs(models.policy, responses, config.sampling.temperature, micro)
            if self.reference is None:
                with self.reference_context():
                    ref_logprobs = response_logprobs(models.policy, responses, config.sampling.temperature, micro)
            if models.value is not None:
                def value_of(queries, query_mask, tokens, token_mask):
                    ids, mask = torch.cat([queries, tokens], dim=1), torch.cat([query_mask, token_mask], dim=1)
                    return response_values(models.value, ids, mask, tokens.shape[1])

                values = score_in_micro_batches(responses, micro, value_of, per_token=True)
        if self.reference is not None:
            ref_logprobs = response_logprobs(self.reference, responses, config.sampling.temperature, micro)
        raw_scores = score_in_micro_batches(responses, micro, self.reward_fn, per_token=False)
        return ScoredResponses(responses, logprobs, ref_logprobs, values, raw_scores)

    def experience(self, scored: ScoredResponses, kl_coef: float) -> Experience:
        """The rollout as RL sees it: normalised scores, KL, rewards and advantages (whitened over all processes)."""
        responses, mask = scored.responses, scored.responses.response_mask
        scores = self.normalise(scored.raw_scores, responses.has_eos, mask.sum(1))
        kl = kl_estimate(scored.logprobs, scored.ref_logprobs, self.config.reward.kl_estimator) * mask
        rewards, advantages, returns = self.advantages(scores, kl, scored.values, mask, responses.last_index, kl_coef)
        return Experience(
            query_ids=responses.query_ids, query_mask=responses.query_mask, response_ids=responses.response_ids,
            response_mask=mask, logprobs=scored.logprobs, ref_logprobs=scored.ref_logprobs, values=scored.values,
            raw_scores=scored.raw_scores, scores=scores, has_eos=responses.has_eos, last_index=responses.last_index,
            kl=kl, rewards=rewards, advantages=advantages, returns=returns,
        )

    def normalise(self, raw_scores: torch.Tensor, has_eos: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Take out the length trend (with length_correction), standardise with the reward model's
        statistics, penalise missing EOS, clip. lengths: (batch,) response tokens."""
        config = self.config
        if self.length_slope and lengths is not None:
            # Centred on the held-out mean length: a reply of typical length keeps its score.
            raw_scores = raw_scores - self.length_slope * (lengths.to(raw_scores.dtype) - self.length_mean)
        scores = (raw_scores - self.score_mean) / self.score_std
        if config.reward.missing_eos_penalty == "subtract":
            scores = torch.where(has_eos, scores, scores - config.reward.missing_eos_value)
        elif config.reward.missing_eos_penalty == "replace":
            scores = torch.where(has_eos, scores, torch.full_like(scores, config.reward.missing_eos_value))
        if config.reward.score_clip is not None:
            scores = scores.clamp(-config.reward.score_clip, config.reward.score_clip)
        return scores

    def advantages(
        self, scores: torch.Tensor, kl: torch.Tensor, values: torch.Tensor | None, mask: torch.Tensor,
        last_index: torch.Tensor, kl_coef: float,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(rewards, advantages, returns or None): GAE for ppo, a group baseline for rloo and grpo.

        With `kl_penalty: reward` the KL to the reference is subtracted from the reward (per token
        for ppo, summed over the response for rloo and grpo); with `loss` it enters the update's
        loss instead and the reward is the score alone."""
        config, returns = self.config, None
        if config.reward.kl_penalty == "loss":
            kl_coef = 0.0
        if config.algorithm.estimator == "ppo":
            rewards = shaped_rewards(scores, kl, kl_coef, mask, last_index)
            advantages, returns = generalized_advantages(rewards, values, mask, config.algorithm.gamma, config.algorithm.lam)
        else:
            # A sequence-level reward, spread over the response's tokens by the group baseline.
            sequence_reward = scores - kl_coef * masked_sum(kl, mask, dim=1)
            k = config.sampling.samples_per_prompt
            if config.algorithm.estimator == "rloo":
                baseline = leave_one_out_advantages(sequence_reward, k)
            else:
                baseline = group_normalized_advantages(sequence_reward, k, scale=config.algorithm.scale_group_rewards)
            rewards = torch.zeros_like(mask, dtype=torch.float32)
            rewards[torch.arange(len(mask)), last_index] = sequence_reward
            advantages = baseline.unsqueeze(1) * mask
        if config.algorithm.whiten_advantages:
            mean, var = global_masked_moments(advantages, mask, self.accelerator)
            advantages = whiten(advantages, mask, mean, var)
        return rewards, advantages, returns


def global_masked_moments(values: torch.Tensor, mask: torch.Tensor, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) variance over the masked entries of every process's tensor."""
    totals = torch.stack([masked_sum(values, mask), masked_sum(values**2, mask), mask.sum().to(values.dtype)])
    total, total_sq, count = accelerator.reduce(totals.double(), "sum")
    mean = total / count.clamp(min=1)
    var = (total_sq / count.clamp(min=1) - mean**2) * count / (count - 1).clamp(min=1)
    return mean.to(values.dtype), var.clamp(min=0).to(values.dtype)
