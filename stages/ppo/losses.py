"""PPO's losses and the per-token quantities they use, as small pure functions on tensors.

Every reduction over tokens is masked: `mask` is 1 on real response tokens (up to and including
the EOS) and 0 on padding, so no padding leaks into a loss or a metric. Shapes use
`(batch, response_len)` for per-token tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return (values * mask).sum() if dim is None else (values * mask).sum(dim)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean over the positions where mask is 1 (all of them, or along `dim`)."""
    if dim is None:
        return masked_sum(values, mask) / mask.sum().clamp(min=1)
    return masked_sum(values, mask, dim) / mask.sum(dim).clamp(min=1)


def log_softmax_at(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature) in float32: the distribution the tokens were sampled from.

    logits: (batch, len, vocab) -> (batch, len, vocab)
    """
    return F.log_softmax(logits.float() / temperature, dim=-1)


def token_logprobs(log_probs: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) from a log-softmax: (batch, len, vocab), (batch, len) -> (batch, len)."""
    return torch.gather(log_probs, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy per position from a log-softmax: (batch, len, vocab) -> (batch, len)."""
    return -(log_probs.exp() * log_probs).sum(-1)


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): (batch, len, vocab), (batch, len) -> (batch, len) float32."""
    return token_logprobs(log_softmax_at(logits, temperature), tokens)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities.

    k1: log p - log q. Unbiased, can be negative per token.
    k3: (q/p - 1) - log(q/p). Unbiased and never negative, lower variance (Schulman, "Approximating KL").
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1 or k3")


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective (as a loss) and its diagnostics, all masked means.

    Returns loss and {clipfrac, approxkl, ratio}: the share of tokens whose ratio was clipped,
    0.5 * E[(log ratio)^2] (an estimate of KL(old || new)), and the mean probability ratio.
    """
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return loss, {k: v.detach() for k, v in stats.items()}


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped kept within cliprange_value of the old value."""
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    return loss, {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()}
