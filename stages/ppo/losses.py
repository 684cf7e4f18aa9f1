"""PPO's losses and the per-token quantities they use, as small pure functions on tensors.

Every reduction over tokens is masked: `mask` is 1 on real response tokens (up to and including
the EOS) and 0 on padding, so no padding leaks into a loss or a metric. Shapes use
`(batch, response_len)` for per-token tensors.

Defaults, and the measurement behind them (bench/ppo_vs_trl.py against TRL 1.16's RLOOTrainer
and GRPOTrainer, 2026-12-03: the tiny Llama, the known reward of target tokens per response,
256 episodes of 32 tokens, learning rate 3e-3, beta 0.05, 4 epochs, run seeds 0-2):
- The ratio per token (`importance_ratio: token`, the only one before) let RLOO raise the
  held-out score by 0.52-1.29 and GRPO by 0.59-1.58, against 3.15-6.04 and 1.15-1.83 for TRL's.
  Every run of either trainer, whatever its options, bought 5-10 target tokens per nat of KL
  per token; they differed in how far they moved (KL 0.10-0.20 against 0.50-0.83 for TRL's
  RLOO). A group baseline gives every token of a response one advantage, and the per-token clip
  stops each token's gradient once that token alone has moved 20%.
- A ratio per response lifts that limit: `sequence` (GSPO) gained 12.9-18.9 with RLOO and
  1.3-13.9 with GRPO, on the same reward-against-KL curve as TRL's at matched KL (over learning
  rates 3e-4 to 1e-2 on both sides); `sequence_sum` (TRL's RLOO loss) 3.0-4.7 with RLOO. So rloo
  and grpo default to `sequence`; ppo, whose GAE advantages differ per token, keeps `token`.
- Whitening after the group baseline off, Adam's epsilon 1e-8 instead of 1e-5, and reusing one
  minibatch order across epochs (TRL's) each moved single runs either way, none consistently:
  `whiten_advantages` stays on, the rest unchanged. `loss_aggregation` barely matters here
  (responses nearly all reach the length limit) and stays `token_mean`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.models.logprobs import masked_mean, masked_sum


def entropy_from_log_probs(log_probs: torch.Tensor) -> torch.Tensor:
    """Entropy per position from a log-softmax: (batch, len, vocab) -> (batch, len)."""
    return -(log_probs.exp() * log_probs).sum(-1)


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from the sampled tokens' log-probabilities.

    With r = q/p (reference over policy) at a token the policy sampled (Schulman, "Approximating KL
    Divergence", 2020):
    k1: -log r = log p - log q. Unbiased, can be negative per token. As a reward penalty it is the
        classic RLHF KL (Ziegler et al.; Ouyang et al.); as a loss term its expected gradient is 0,
        so it is refused there (pipeline/config.py).
    k2: (log r)^2 / 2. Biased, never negative; as a loss term its gradient is that of KL(p || q).
    k3: (r - 1) - log r. Unbiased and never negative, lower variance; GRPO's loss term (Shao et al.).
    """
    log_ratio = logprobs - ref_logprobs
    if estimator == "k1":
        return log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio**2
    if estimator == "k3":
        return torch.expm1(-log_ratio) + log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def importance_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor, level: str) -> torch.Tensor:
    """log pi/pi_old at each response token, at the level the ratio is formed and clipped: (batch, len).

    token: every token its own ratio (PPO; Schulman et al. 2017).
    sequence: one ratio per response, the geometric mean of its tokens' ratios, on every token
        (GSPO; Zheng et al. 2025): the length-normalised sequence likelihood ratio.
    sequence_sum: one ratio per response, the ratio of the whole response's probabilities (the
        product of its tokens' ratios; TRL's RLOOTrainer, after Ahmadian et al. 2024).
    """
    log_ratio = logprobs - old_logprobs
    if level == "token":
        return log_ratio
    per_sequence = masked_sum(log_ratio, mask, dim=1)
    if level == "sequence":
        per_sequence = per_sequence / mask.sum(1).clamp(min=1)
    elif level != "sequence_sum":
        raise ValueError(f"unknown importance ratio level {level!r}; use token, sequence or sequence_sum")
    return per_sequence.unsqueeze(1).expand_as(log_ratio)


@dataclass(frozen=True)
class MinibatchSize:
    """What a loss aggregation divides by: the minibatch a micro-batch belongs to.

    sequences and tokens count this process's share of the minibatch (tokens: real response
    tokens); global_tokens counts them over every process; response_length is the configured
    maximum (Dr. GRPO's constant).
    """

    sequences: int
    tokens: torch.Tensor
    global_tokens: torch.Tensor
    processes: int
    response_length: int


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, how: str, size: MinibatchSize) -> torch.Tensor:
    """One micro-batch's share of the minibatch loss from per-token losses; the shares add up over
    the minibatch's micro-batches (and average over processes, as data-parallel gradients do).

    token_mean: the mean over the minibatch's tokens on this process (TRL's "bnpo").
    sequence_mean: the mean over responses of each response's token mean (GRPO as published;
        a short response's tokens weigh more).
    token_sum: the token sum over the minibatch of every process, divided by its token count
        (DAPO; Yu et al. 2025): every token weighs the same, whatever process holds it.
    constant: the token sum divided by sequences x the maximum response length (Dr. GRPO;
        Liu et al. 2025): no length normalisation at all.
    """
    if how == "token_mean":
        return masked_sum(per_token, mask) / size.tokens.clamp(min=1)
    if how == "sequence_mean":
        return masked_mean(per_token, mask, dim=1).sum() / size.sequences
    if how == "token_sum":
        return masked_sum(per_token, mask) * size.processes / size.global_tokens.clamp(min=1)
    if how == "constant":
        return masked_sum(per_token, mask) / (size.sequences * size.response_length)
    raise ValueError(f"unknown loss aggregation {how!r}; use token_mean, sequence_mean, token_sum or constant")


def clipped_policy_loss(
    log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate objective as a per-token loss (batch, len), and its diagnostics.

    log_ratio: log pi/pi_old per token, at whatever level it was formed (`importance_log_ratio`).
    Returns the per-token loss (masked and aggregated by the caller) and {clipfrac, approxkl,
    ratio}, masked token means: the share of tokens whose ratio was clipped, 0.5 * E[(log ratio)^2]
    (an estimate of KL(old || new)), and the mean probability ratio.
    """
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    stats = {
        "clipfrac": masked_mean((clipped > unclipped).float(), mask),
        "approxkl": 0.5 * masked_mean(log_ratio**2, mask),
        "ratio": masked_mean(ratio, mask),
    }
    return torch.maximum(unclipped, clipped), {k: v.detach() for k, v in stats.items()}


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """0.5 * max((v - R)^2, (v_clipped - R)^2), v_clipped kept within cliprange_value of the old value."""
    clipped_values = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    unclipped_loss = (values - returns) ** 2
    clipped_loss = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(unclipped_loss, clipped_loss), mask)
    return loss, {"clipfrac": masked_mean((clipped_loss > unclipped_loss).float(), mask).detach()}
