"""PPO's losses and the per-token quantities they use, as small pure functions on tensors.

Every reduction over tokens is masked: `mask` is 1 on real response tokens (up to and including
the EOS) and 0 on padding, so no padding leaks into a loss or a metric. Shapes use
`(batch, response_len)` for per-token tensors.
"""

from __future__ import annotations

import torch

from pipeline.models.logprobs import masked_mean


def entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy per position from a log-softmax: (batch, len, vocab) -> (batch, len)."""
    return -(log_probs.exp() * log_probs).sum(-1)


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
