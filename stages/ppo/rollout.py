"""Experience making: prompts in, a batch of scored, advantage-annotated responses out.

    maker = ExperienceMaker(policy, reference, value, reward_fn, tokenizer, settings, accelerator)
    experience = maker.make(query_ids, query_mask)     # one rollout on this process

The implementation details that make RLHF PPO work (Huang et al., "The N Implementation
Details of RLHF with PPO") live here:

- queries are left-padded with a pad token that is not EOS; every forward pass, sampling
  included, gets explicit position ids (cumulative sum of the attention mask);
- responses are sampled at the configured temperature with no top-k, top-p or other processor
  (stages/ppo/sampling.py), and every logprob (rollout, reference and, later, training) comes
  from a separate forward pass on logits divided by that same temperature, never from the
  sampling loop's own logits;
- a response is cut after its first EOS (later tokens become pad); the reward model scores the
  cut (query, response) and the score lands on the EOS token itself; a response with no EOS gets
  the configured penalty;
- the per-token reward is -beta * KL(policy || reference) plus the normalised score on the last
  token; advantages come from GAE (PPO) or a group baseline (RLOO, GRPO) and are whitened over
  the whole rollout across processes. Every statistic is masked to real response tokens.

Speed: no forward pass computes a column that is padding in every row of its batch. Scoring
passes run over the rollout sorted by length, so each micro-batch holds sequences of similar
length, and each micro-batch is cut to its own widest prompt and longest response
(`real_columns`); the results go back to their rows. The update does the same per micro-batch.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Callable

import torch

from reward_model.model import position_ids_from
from reward_model.scoring import at_last_token
from stages.ppo.advantages import (
    generalized_advantages,
    group_normalized_advantages,
    leave_one_out_advantages,
    shaped_rewards,
    whiten,
)
from stages.ppo.losses import kl_estimate, logprobs_from_logits, masked_sum
from stages.ppo.sampling import sample_responses

# (query_ids, query_mask, response_ids, response_mask) -> one raw score per sequence: (batch,).
# Queries are left-padded, responses right-padded and cut after their EOS; a batch may be any
# subset of a rollout's rows, in any order, cut to its own widest query and longest response.
RewardFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


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


def truncate_after_eos(
    responses: torch.Tensor, eos_token_id: int, pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each response after its first EOS.

    responses: (batch, response_len) -> (responses with pad after the first EOS, mask (1 up to and
    including the EOS, or everywhere when there is none), has_eos (batch,), last_index (batch,):
    the EOS position, or response_len - 1).
    """
    is_eos = responses == eos_token_id
    has_eos = is_eos.any(dim=1)
    length = responses.shape[1]
    positions = torch.arange(length, device=responses.device).expand_as(responses)
    first_eos = torch.where(has_eos, is_eos.int().argmax(dim=1), torch.full_like(has_eos, length - 1, dtype=torch.long))
    mask = (positions <= first_eos.unsqueeze(1)).long()
    truncated = torch.where(mask.bool(), responses, torch.full_like(responses, pad_token_id))
    return truncated, mask, has_eos, first_eos


def real_columns(query_mask: torch.Tensor, response_mask: torch.Tensor) -> tuple[slice, slice]:
    """The query and response columns that hold a real token in at least one row.

    query_mask: (batch, query_len), left-padded; response_mask: (batch, response_len), right-padded.
    Dropping the other columns changes no real token's output: left padding is masked out of
    attention and positions count real tokens only, and causal attention never looks right.
    """
    first_query = int(query_mask.any(0).int().argmax()) if query_mask.any() else query_mask.shape[1]
    response_length = int(response_mask.sum(1).max()) if len(response_mask) else 0
    return slice(first_query, None), slice(0, response_length)


def length_sorted_micro_batches(query_mask: torch.Tensor, response_mask: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Row indices in micro-batches of `size`, longest sequences first, so each cuts away most padding."""
    lengths = query_mask.sum(1) + response_mask.sum(1)
    return list(torch.argsort(lengths, descending=True, stable=True).split(size))


def response_logits(model, sequence_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """Logits predicting each response token: (batch, response_len, vocab).

    Only the last response_len + 1 positions go through the LM head (`logits_to_keep`): the
    vocabulary projection over prompt tokens would be wasted work.
    """
    output = model(
        input_ids=sequence_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from(attention_mask),
        logits_to_keep=response_length + 1,
        use_cache=False,
    )
    return output.logits[:, :-1]


def response_values(value_scorer, sequence_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """The value of the state before each response token: (batch, response_len)."""
    per_token = value_scorer(sequence_ids, attention_mask)
    return per_token[:, -response_length - 1 : -1]


def reward_model_function(reward_model) -> RewardFunction:
    """A reward model (a TokenScorer) as a RewardFunction."""

    @torch.no_grad()
    def score(query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        return at_last_token(reward_model(torch.cat([query_ids, response_ids], dim=1), attention_mask), attention_mask)

    return score


@dataclass
class RolloutSettings:
    """The subset of the PPO config that experience making needs."""

    estimator: str
    samples_per_prompt: int
    response_length: int
    temperature: float
    micro_batch_size: int
    kl_estimator: str
    missing_eos_penalty: str
    missing_eos_value: float
    score_mean: float
    score_std: float
    score_clip: float | None
    gamma: float
    lam: float
    whiten_advantages: bool


class ExperienceMaker:
    """Produces Experience from prompts; never changes a model."""

    def __init__(self, policy, reference, value, reward_fn: RewardFunction, tokenizer, settings: RolloutSettings, accelerator,
                 reference_context: Callable[[], contextlib.AbstractContextManager] | None = None):
        """policy: the unwrapped causal LM to sample from; reference: a frozen copy, or None when
        `reference_context()` turns the policy into the reference (LoRA with the adapter disabled);
        value: a TokenScorer (PPO) or None."""
        self.policy, self.reference, self.value = policy, reference, value
        self.reward_fn, self.tokenizer, self.settings, self.accelerator = reward_fn, tokenizer, settings, accelerator
        self.reference_context = reference_context

    def generate(self, query_ids: torch.Tensor, query_mask: torch.Tensor, generation_model=None) -> torch.Tensor:
        """Sampled responses, (batch, response_len), pad after the EOS."""
        return sample_responses(
            generation_model or self.policy, query_ids, query_mask, max_new_tokens=self.settings.response_length,
            temperature=self.settings.temperature, eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.tokenizer.pad_token_id,
        )

    @torch.no_grad()
    def make(self, query_ids: torch.Tensor, query_mask: torch.Tensor, generation_model=None) -> Experience:
        settings = self.settings
        raw_responses = self.generate(query_ids, query_mask, generation_model)
        response_ids, response_mask, has_eos, last_index = truncate_after_eos(
            raw_responses, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        )
        # Filled micro-batch by micro-batch; columns past a micro-batch's longest response stay 0 (masked).
        logprobs = torch.zeros_like(response_ids, dtype=torch.float32)
        ref_logprobs = torch.zeros_like(logprobs)
        values = torch.zeros_like(logprobs) if self.value is not None else None
        raw_scores = logprobs.new_zeros(len(response_ids))
        for rows in length_sorted_micro_batches(query_mask, response_mask, settings.micro_batch_size):
            query_columns, response_columns = real_columns(query_mask[rows], response_mask[rows])
            queries, query_masks = query_ids[rows, query_columns], query_mask[rows, query_columns]
            tokens, token_masks = response_ids[rows, response_columns], response_mask[rows, response_columns]
            ids, mask = torch.cat([queries, tokens], dim=1), torch.cat([query_masks, token_masks], dim=1)
            width = tokens.shape[1]
            logprobs[rows, :width] = logprobs_from_logits(response_logits(self.policy, ids, mask, width), tokens, settings.temperature)
            with (self.reference_context() if self.reference_context else contextlib.nullcontext()):
                reference = self.reference if self.reference is not None else self.policy
                ref_logprobs[rows, :width] = logprobs_from_logits(response_logits(reference, ids, mask, width), tokens, settings.temperature)
            if values is not None:
                values[rows, :width] = response_values(self.value, ids, mask, width)
            raw_scores[rows] = self.reward_fn(queries, query_masks, tokens, token_masks).float()

        scores = self.normalise(raw_scores, has_eos)
        kl = kl_estimate(logprobs, ref_logprobs, settings.kl_estimator) * response_mask
        experience = Experience(
            query_ids=query_ids, query_mask=query_mask, response_ids=response_ids, response_mask=response_mask,
            logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, raw_scores=raw_scores, scores=scores,
            has_eos=has_eos, last_index=last_index, kl=kl, rewards=torch.zeros_like(logprobs),
            advantages=torch.zeros_like(logprobs), returns=None,
        )
        return experience

    def normalise(self, raw_scores: torch.Tensor, has_eos: torch.Tensor) -> torch.Tensor:
        """Standardise with the reward model's statistics, penalise missing EOS, clip."""
        settings = self.settings
        scores = (raw_scores - settings.score_mean) / settings.score_std
        if settings.missing_eos_penalty == "subtract":
            scores = torch.where(has_eos, scores, scores - settings.missing_eos_value)
        elif settings.missing_eos_penalty == "replace":
            scores = torch.where(has_eos, scores, torch.full_like(scores, settings.missing_eos_value))
        if settings.score_clip is not None:
            scores = scores.clamp(-settings.score_clip, settings.score_clip)
        return scores

    def assign_advantages(self, experience: Experience, kl_coef: float) -> None:
        """Fill rewards, advantages (whitened over all processes) and returns, in place."""
        settings, mask = self.settings, experience.response_mask
        last_index = experience.last_index
        if settings.estimator == "ppo":
            experience.rewards = shaped_rewards(experience.scores, experience.kl, kl_coef, mask, last_index)
            advantages, experience.returns = generalized_advantages(
                experience.rewards, experience.values, mask, settings.gamma, settings.lam
            )
        else:
            # A sequence-level reward, spread over the response's tokens by the group baseline.
            if settings.estimator == "rloo":
                sequence_reward = experience.scores - kl_coef * masked_sum(experience.kl, mask, dim=1)
                baseline = leave_one_out_advantages(sequence_reward, settings.samples_per_prompt)
            else:  # grpo: the KL enters the loss instead of the reward
                sequence_reward = experience.scores
                baseline = group_normalized_advantages(sequence_reward, settings.samples_per_prompt)
            experience.rewards = torch.zeros_like(mask, dtype=torch.float32)
            experience.rewards[torch.arange(len(mask)), last_index] = sequence_reward
            advantages = baseline.unsqueeze(1) * mask
        if settings.whiten_advantages:
            mean, var = global_masked_moments(advantages, mask, self.accelerator)
            advantages = whiten(advantages, mask, mean, var)
        experience.advantages = advantages


def global_masked_moments(values: torch.Tensor, mask: torch.Tensor, accelerator) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) variance over the masked entries of every process's tensor."""
    totals = torch.stack([masked_sum(values, mask), masked_sum(values**2, mask), mask.sum().to(values.dtype)])
    total, total_sq, count = accelerator.reduce(totals.double(), "sum")
    mean = total / count.clamp(min=1)
    var = (total_sq / count.clamp(min=1) - mean**2) * count / (count - 1).clamp(min=1)
    return mean.to(values.dtype), var.clamp(min=0).to(values.dtype)
