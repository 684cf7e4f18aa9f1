"""The reward model: a causal-LM backbone with a scalar head, scoring (conversation, reply)."""

from reward_model.model import TokenScorer, build_reward_model, load_reward_model, per_token_scores
from reward_model.scoring import last_token_index

__all__ = ["TokenScorer", "build_reward_model", "last_token_index", "load_reward_model", "per_token_scores"]
