"""From rewards to advantages: KL-shaped per-token rewards, GAE, whitening, and group baselines.

Per-token tensors are `(batch, response_len)`; `mask` is 1 on real response tokens (up to and
including the EOS), 0 on padding.
"""

from __future__ import annotations

import torch


def shaped_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor, last_index: torch.Tensor
) -> torch.Tensor:
    """Per-token reward: -kl_coef * KL on every response token, plus the sequence score on its last token.

    scores: (batch,) normalised reward-model scores; kl: (batch, len); mask: (batch, len);
    last_index: (batch,) position of each response's last real token (its EOS when it has one).
    """
    rewards = -kl_coef * kl * mask
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, last_index] += scores
    return rewards


def generalized_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE (Schulman et al. 2016) over response tokens; returns (advantages, returns = advantages + values).

    Values and rewards at padded positions are zeroed first, so an episode ends at its last real
    token (the value after it is 0) and padding adds nothing.
    """
    rewards, values = rewards * mask, values * mask
    length = rewards.shape[1]
    last_advantage = torch.zeros_like(rewards[:, 0])
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last_advantage = delta + gamma * lam * last_advantage
        advantages[:, t] = last_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """(values - mean) / std with statistics given (computed over the whole rollout, all processes)."""
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def leave_one_out_advantages(rewards: torch.Tensor, samples_per_prompt: int) -> torch.Tensor:
    """RLOO: each sample's reward minus the mean of the other samples of its prompt.

    rewards: (n_prompts * k,) grouped so a prompt's k samples are adjacent -> (n_prompts * k,)
    """
    grouped = rewards.view(-1, samples_per_prompt)
    others = (grouped.sum(1, keepdim=True) - grouped) / (samples_per_prompt - 1)
    return (grouped - others).view(-1)


def group_normalized_advantages(
    rewards: torch.Tensor, samples_per_prompt: int, scale: bool = True, eps: float = 1e-4
) -> torch.Tensor:
    """GRPO: each sample's reward minus its group's mean, divided by the group's std when `scale`.

    Without the division (Dr. GRPO; Liu et al. 2025) a group whose rewards barely differ does not
    get its small differences blown up to unit size.
    """
    grouped = rewards.view(-1, samples_per_prompt)
    centred = grouped - grouped.mean(1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(1, keepdim=True) + eps)
    return centred.view(-1)
