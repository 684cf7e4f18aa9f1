"""Forward passes that score responses: positions, response logits, token log-probabilities, masked sums.

Shared by the stages that read a causal LM's probabilities of given tokens: PPO (rollout,
reference and training logprobs), eval (KL between policies, perplexity) and the reward model
(positions). Every pass gives explicit position ids counting real tokens only, so a left-padded
row scores exactly like the same row unpadded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def position_ids_from(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens only: left padding does not shift where a sequence starts."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_logits(model, sequence_ids: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """Logits predicting each of the last `response_length` tokens: (batch, response_len, vocab).

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


def log_softmax_at(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) in float32: the distribution the tokens were sampled from.

    logits: (batch, len, vocab) -> (batch, len, vocab)
    """
    return F.log_softmax(logits.float() / temperature, dim=-1)


def token_logprobs(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) from a log-softmax: (batch, len, vocab), (batch, len) -> (batch, len)."""
    return torch.gather(log_probs, 2, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): (batch, len, vocab), (batch, len) -> (batch, len) float32."""
    return token_logprobs(log_softmax_at(logits, temperature), tokens)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum over the positions where mask is 1 (all of them, or along `dim`)."""
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is 1 (all of them, or along `dim`)."""
    if dim is None:
        return masked_sum(values, mask) / mask.sum().clamp(min=1)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)
