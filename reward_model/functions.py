"""A reward model as a reward function: what PPO optimises and what eval judges with.

    reward_fn = reward_model_function(TokenScorer(load_reward_model("runs/tiny/reward/final")))
    scores = reward_fn(query_ids, query_mask, response_ids, response_mask)      # (batch,)

A reward function is any callable of that shape, so a rule-based or synthetic reward (the PPO
benchmark's) plugs in where a trained model would.

Programmable rewards (`ppo.reward.functions` in a config) are plain Python on text, one float per reply:

    def exact_answer(prompts: list[str], replies: list[str], prompt_ids: list[list[int]],
                     reply_ids: list[list[int]]) -> list[float]: ...

prompts: the chat-formatted prompts as decoded (special tokens kept); replies: the replies decoded
without special tokens, cut after their EOS; prompt_ids, reply_ids: the same as token ids (a reply's
ids end with its EOS when it has one). `programmable_reward_function` makes them and the reward
model one RewardFunction: the model's standardised score times its weight plus each function's
value times its weight. A function that raises, returns a non-finite value or the wrong number of
values stops the run (RewardFunctionError naming the function and the reply), never a silent zero.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from pipeline.config import import_reward_function
from pipeline.errors import RewardFunctionError

from reward_model.scoring import at_last_token

# (query_ids, query_mask, response_ids, response_mask) -> one raw score per sequence: (batch,).
# Queries are left-padded, responses right-padded and cut after their EOS; a batch may be any
# subset of a rollout's rows, in any order, cut to its own widest query and longest response.
RewardFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def reward_model_function(reward_model) -> RewardFunction:
    """A reward model (a TokenScorer) as a RewardFunction: its score at each sequence's last real token."""

    @torch.no_grad()
    def score(query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
        attention_mask = torch.cat([query_mask, response_mask], dim=1)
        return at_last_token(reward_model(torch.cat([query_ids, response_ids], dim=1), attention_mask), attention_mask)

    return score


ENSEMBLE_DIR = "ensemble"  # RUN_DIR/reward/final/ensemble/member-<i>: the reward stage's other members


def ensemble_members(reward_dir: str | Path) -> list[Path]:
    """The folders of a reward checkpoint's other ensemble members (`reward.ensemble`), in order; [] without."""
    folder = Path(reward_dir) / ENSEMBLE_DIR
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: int(p.name.rsplit("-", 1)[-1]))


def conservative_reward_function(reward_models: list, statistics: list, penalty: float) -> RewardFunction:
    """Several reward models (TokenScorers) as one RewardFunction: the mean of their standardised
    scores less `penalty` standard deviations of them, where they disagree the reward is lower
    (uncertainty-weighted optimisation, Coste et al., "Reward Model Ensembles Help Mitigate
    Overoptimization", 2023). Returned in the first model's raw units, so PPO normalises it with
    that model's statistics as it would the model alone.

    statistics: each model's ScoreStatistics (held-out mean and std).
    """
    members = [reward_model_function(model) for model in reward_models]
    first = statistics[0]

    @torch.no_grad()
    def score(query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
        standard = torch.stack([
            (member(query_ids, query_mask, response_ids, response_mask).float() - stats.mean) / (stats.std or 1.0)
            for member, stats in zip(members, statistics)
        ])
        conservative = standard.mean(0) - penalty * standard.std(0, correction=0)
        return first.mean + (first.std or 1.0) * conservative

    return score


# (prompts, replies, prompt_ids, reply_ids) -> one float per reply; see the module docstring.
TextRewardFunction = Callable[[list[str], list[str], list[list[int]], list[list[int]]], Sequence[float]]


@dataclass(frozen=True)
class WeightedFunction:
    """A programmable reward as the combination uses it: its log name, config path, callable and weight."""

    name: str
    path: str
    function: TextRewardFunction
    weight: float


class ProgrammableReward:
    """A RewardFunction: `model_weight` x the reward model's standardised score (when there is a
    model) plus each function's weight x its value, returned in the model's raw units
    (`mean + std x combined`), so the rollout's normalisation with the same mean and std gives back
    the combination itself. Without a model, mean 0 and std 1: the weighted sum of the functions.

    Keeps each function's sum and count since `reset()`, for its `reward/<name>` metric."""

    def __init__(self, functions: list[WeightedFunction], tokenizer, model_fn: RewardFunction | None = None,
                 model_weight: float = 1.0, score_mean: float = 0.0, score_std: float = 1.0):
        self.functions, self.tokenizer, self.model_fn, self.model_weight = functions, tokenizer, model_fn, model_weight
        self.score_mean, self.score_std = score_mean, score_std
        self.reset()

    def reset(self) -> None:
        self.sums = {f.name: 0.0 for f in self.functions}
        self.counts = {f.name: 0 for f in self.functions}

    def totals(self) -> dict[str, tuple[float, int]]:
        """{name: (sum of its values, replies scored)} since the last reset."""
        return {name: (self.sums[name], self.counts[name]) for name in self.sums}

    @torch.no_grad()
    def __call__(self, query_ids, query_mask, response_ids, response_mask) -> torch.Tensor:
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(query_ids, query_mask)]
        reply_ids = [ids[mask.bool()].tolist() for ids, mask in zip(response_ids, response_mask)]
        prompts = self.tokenizer.batch_decode(prompt_ids, skip_special_tokens=False)
        replies = self.tokenizer.batch_decode(reply_ids, skip_special_tokens=True)
        combined = torch.zeros(len(replies), dtype=torch.float32)
        for entry in self.functions:
            values = checked_values(entry, prompts, replies, prompt_ids, reply_ids)
            self.sums[entry.name] += float(values.sum())
            self.counts[entry.name] += len(values)
            combined += entry.weight * values
        combined = combined.to(response_ids.device)
        if self.model_fn is not None:
            model = self.model_fn(query_ids, query_mask, response_ids, response_mask).float()
            combined = combined + self.model_weight * (model - self.score_mean) / self.score_std
        return self.score_mean + self.score_std * combined


def checked_values(entry: WeightedFunction, prompts: list[str], replies: list[str],
                   prompt_ids: list[list[int]], reply_ids: list[list[int]]) -> torch.Tensor:
    """One function's values for a batch as a float tensor, or RewardFunctionError naming it and the reply at fault."""
    what = f"reward function {entry.name} ({entry.path})"
    try:
        values = entry.function(prompts, replies, prompt_ids, reply_ids)
    except Exception as error:
        raise RewardFunctionError(
            f"{what} raised {type(error).__name__}: {error} on a batch of {len(replies)} replies, "
            f"the first {replies[0]!r} to prompt {prompts[0]!r}"
        ) from error
    try:
        values = [float(value) for value in values]
    except (TypeError, ValueError) as error:
        raise RewardFunctionError(f"{what} must return one float per reply; it returned {values!r:.200} ({error})") from None
    if len(values) != len(replies):
        raise RewardFunctionError(f"{what} returned {len(values)} values for {len(replies)} replies; it must return one per reply")
    for index, value in enumerate(values):
        if not math.isfinite(value):
            raise RewardFunctionError(f"{what} returned {value} for reply {index} {replies[index]!r} to prompt {prompts[index]!r}; "
                                      "rewards must be finite")
    return torch.tensor(values, dtype=torch.float32)


def programmable_reward_function(specs, tokenizer, model_fn: RewardFunction | None = None, model_weight: float = 1.0,
                                 score_mean: float = 0.0, score_std: float = 1.0) -> ProgrammableReward:
    """`ppo.reward.functions` (RewardFunctionSpecs) imported and combined with the model's reward function, if any."""
    functions = [
        WeightedFunction(spec.name, spec.function, import_reward_function(spec.function, f"ppo.reward.functions[{i}].function"), spec.weight)
        for i, spec in enumerate(specs)
    ]
    return ProgrammableReward(functions, tokenizer, model_fn, model_weight, score_mean, score_std)
