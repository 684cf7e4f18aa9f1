"""A reward model as a reward function: what PPO optimises and what eval judges with.

    reward_fn = reward_model_function(TokenScorer(load_reward_model("runs/tiny/reward/final")))
    scores = reward_fn(query_ids, query_mask, response_ids, response_mask)      # (batch,)

A reward function is any callable of that shape, so a rule-based or synthetic reward (the PPO
benchmark's) plugs in where a trained model would.
"""

from __future__ import annotations

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
