"""A reward model as a reward function: what PPO optimises and what eval judges with.

    reward_fn = reward_model_function(TokenScorer(load_reward_model("runs/tiny/reward/final")))
    scores = reward_fn(query_ids, query_mask, response_ids, response_mask)      # (batch,)

A reward function is any callable of that shape, so a rule-based or synthetic reward (the PPO
benchmark's) plugs in where a trained model would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

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
