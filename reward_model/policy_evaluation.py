"""One policy evaluator: a policy's seeded replies to held-out prompts, and what the reward model and
the judges make of them, as PPO's eval curve and the eval stage both report them.

    sample = reply_sampler(policy, reference, reward_fn, tokenizer, temperature=0.7, response_length=64, micro_batch_size=16)
    evaluation = evaluate_policy(sample, prompt_batches, seeded_generator(seed, device), panel, tokenizer, micro_batch_size=16)
    evaluation.metrics      # score, kl, response_length, eos_fraction (and judges_score with judges)

PPO evaluates the policy it is training by passing its experience maker's `score` as the sampler
(its rollouts' own sampling and scoring, with whole weights under sharding engines); the eval stage
passes `reply_sampler` over the saved checkpoints. Everything after sampling happens here, so for
the same policy, prompts, batches and seed the two report the same figures:

- `score`: the reward function's raw score of the reply as sampled (what PPO optimised);
- `kl`: log p_policy - log p_reference summed over the reply's tokens (k1), at the sampling
  temperature; eval samples at PPO's unless `eval.temperature` says otherwise, so its KL is the
  one PPO's penalty held down;
- `response_length` and `eos_fraction`: the reply's tokens, EOS included, and how many end in EOS;
- the judges' scores: each model of the panel scores the token ids the policy sampled, completed
  with EOS where the length limit cut them (never text decoded and tokenized again), and
  `judges_score` is their mean in each judge's own standard units (reward_model/judges.py).

It lives in reward_model/ because it scores with the judge panel and both stages call it: a stage
may not import another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from pipeline.models.generation import Sampling
from pipeline.models.logprobs import masked_sum
from pipeline.models.responses import (
    Responses,
    ScoredResponses,
    completed,
    response_logprobs,
    sample_responses,
    score_in_micro_batches,
)
from reward_model.functions import RewardFunction
from reward_model.judges import JudgePanel

# (query_ids, query_mask, generator) -> one sampled response per left-padded query, with the
# policy's and the reference's logprobs at the sampling temperature and the reward function's score.
Sampler = Callable[[torch.Tensor, torch.Tensor, torch.Generator], ScoredResponses]


@dataclass
class PolicyEvaluation:
    """One policy's replies to held-out prompts, in the order of the prompt batches. Per reply, on the CPU:

    scores: (replies,) the reward function's raw score of the reply as sampled
    kl: (replies,) the policy's log-ratio to the reference summed over the reply's tokens
    lengths: (replies,) response tokens, EOS included
    has_eos: (replies,) bool
    judged: {model: (replies,)} each panel model's raw score of the completed reply ({} without a panel)
    judges: (replies,) the held-out judges' mean standardized score; None without judges
    tokens: each reply's token ids without its EOS; None once gathered (only this process's are known)
    totals: float64 sums of replies, score, kl, tokens and EOS, added batch by batch, on the device
    """

    scores: torch.Tensor
    kl: torch.Tensor
    lengths: torch.Tensor
    has_eos: torch.Tensor
    judged: dict[str, torch.Tensor]
    judges: torch.Tensor | None
    tokens: list[list[int]] | None
    totals: torch.Tensor

    @property
    def metrics(self) -> dict[str, float]:
        """Means over the replies: score, kl, response_length, eos_fraction, and judges_score with judges."""
        count, score, kl, length, eos = self.totals.tolist()
        count = max(count, 1)
        metrics = {"score": score / count, "kl": kl / count, "response_length": length / count, "eos_fraction": eos / count}
        if self.judges is not None:
            metrics["judges_score"] = self.judges.double().mean().item()
        return metrics

    def gathered(self, accelerator) -> PolicyEvaluation:
        """Every process's replies, process by process, and the sums over all of them.

        A collective every process calls: PPO evaluates a share of the prompts on each process.
        """
        def gather(values: torch.Tensor) -> torch.Tensor:
            return accelerator.gather(values.to(accelerator.device)).cpu()

        return PolicyEvaluation(
            scores=gather(self.scores), kl=gather(self.kl), lengths=gather(self.lengths),
            has_eos=gather(self.has_eos.long()).bool(), judged={name: gather(values) for name, values in self.judged.items()},
            judges=gather(self.judges) if self.judges is not None else None, tokens=None,
            totals=accelerator.reduce(self.totals, "sum"),
        )


def reply_sampler(
    policy, reference, reward_fn: RewardFunction, tokenizer, *, temperature: float, response_length: int, micro_batch_size: int,
) -> Sampler:
    """A Sampler over two plain models: `policy` samples and is scored against `reference`, both at
    `temperature`, and `reward_fn` scores each reply as sampled; passes of `micro_batch_size` rows."""
    sampling = Sampling(temperature=temperature)

    @torch.no_grad()
    def sample(query_ids: torch.Tensor, query_mask: torch.Tensor, generator: torch.Generator) -> ScoredResponses:
        responses = sample_responses(
            policy, query_ids, query_mask, max_new_tokens=response_length, sampling=sampling,
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, generator=generator,
        )
        logprobs = response_logprobs(policy, responses, temperature, micro_batch_size)
        ref_logprobs = response_logprobs(reference, responses, temperature, micro_batch_size)
        raw_scores = score_in_micro_batches(responses, micro_batch_size, reward_fn, per_token=False)
        return ScoredResponses(responses, logprobs, ref_logprobs, None, raw_scores)

    return sample


@torch.no_grad()
def evaluate_policy(
    sample: Sampler, prompt_batches: list[tuple[torch.Tensor, torch.Tensor]], generator: torch.Generator,
    panel: JudgePanel | None, tokenizer, *, micro_batch_size: int,
) -> PolicyEvaluation:
    """One reply per query of every (left-padded query_ids, query_mask) batch, drawn from `generator`
    (a private seeded stream, on the device the prompts go to), scored by `sample`'s models and by
    every model of `panel`, `micro_batch_size` rows per pass.

    Under sharding engines the sampler's and the panel's forward passes are collectives: every
    process must evaluate the same number of batches.
    """
    device = generator.device
    totals = torch.zeros(5, dtype=torch.float64, device=device)  # replies, score, kl, length, eos
    per_reply: dict[str, list[torch.Tensor]] = {"scores": [], "kl": [], "lengths": [], "has_eos": []}
    judged: dict[str, list[torch.Tensor]] = {}
    tokens: list[list[int]] = []
    for query_ids, query_mask in prompt_batches:
        scored = sample(query_ids.to(device), query_mask.to(device), generator)
        responses, mask = scored.responses, scored.responses.response_mask
        kl = masked_sum(scored.logprobs - scored.ref_logprobs, mask, dim=1)
        totals += torch.stack([
            torch.tensor(float(len(responses)), device=device, dtype=torch.float64),
            scored.raw_scores.double().sum(),
            kl.double().sum(),
            mask.sum().double(),
            responses.has_eos.double().sum(),
        ])
        for name, values in zip(per_reply, (scored.raw_scores.float(), kl, mask.sum(1), responses.has_eos)):
            per_reply[name].append(values.cpu())
        if panel is not None:  # the judges read replies as replies: one the length limit cut gets its EOS
            whole = completed(responses, tokenizer.eos_token_id, tokenizer.pad_token_id)
            for name, values in panel.score(whole, micro_batch_size).items():
                judged.setdefault(name, []).append(values.cpu())
        tokens += reply_tokens(responses)
    judged_scores = {name: torch.cat(values) for name, values in judged.items()}
    return PolicyEvaluation(
        **{name: torch.cat(values) for name, values in per_reply.items()}, judged=judged_scores,
        judges=panel.ensemble(judged_scores) if panel is not None else None, tokens=tokens, totals=totals,
    )


def reply_tokens(responses: Responses) -> list[list[int]]:
    """Each response's token ids, without its EOS."""
    rows = []
    for ids, mask, has_eos in zip(responses.response_ids.cpu(), responses.response_mask.cpu(), responses.has_eos.cpu()):
        reply = ids[mask.bool()].tolist()
        rows.append(reply[:-1] if has_eos else reply)
    return rows
