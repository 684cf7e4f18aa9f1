"""The reward model's ranking loss, per prompt as in InstructGPT (DPO averages its pairs the same way).

A prompt ranked with K completions contributes K*(K-1)/2 pairs. Treating every pair as its own
example would let prompts with many completions dominate, and (InstructGPT notes) overfit,
since each completion appears in K-1 pairs. So all of a prompt's pairs share one batch, each
completion is scored once, and the loss is the mean over prompts of each prompt's mean pair loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def grouped_pairwise_loss(
    scores: torch.Tensor,
    better: torch.Tensor,
    worse: torch.Tensor,
    pair_group: torch.Tensor,
    margins: torch.Tensor,
    n_groups: int,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean over prompts of mean over that prompt's pairs of -log sigmoid(r_better - r_worse - margin).

    scores: (n_completions,) one reward per completion in the batch
    better, worse: (n_pairs,) indices into scores; better was ranked above worse
    pair_group: (n_pairs,) the prompt (0..n_groups-1) each pair belongs to
    margins: (n_pairs,) how far apart the pair should be (0 for a plain preference)
    weights: (n_pairs,) each pair's weight within its prompt's mean (default 1; see
        reward_model.batching.length_balancing_weights)
    """
    return per_prompt_mean(-F.logsigmoid(scores[better] - scores[worse] - margins), pair_group, n_groups, weights)


def per_prompt_mean(
    per_pair: torch.Tensor, pair_group: torch.Tensor, n_groups: int, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over prompts of the mean over each prompt's pairs: every prompt weighs the same, however
    many pairs its ranking gives (the reward model's loss and DPO's).

    per_pair: (n_pairs,) a loss per pair; pair_group: (n_pairs,) each pair's prompt, 0..n_groups-1;
    weights: (n_pairs,) multiplies each pair's loss (default 1).
    """
    if weights is not None:
        per_pair = per_pair * weights
    loss_sums = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add_(0, pair_group, per_pair)
    counts = torch.zeros(n_groups, dtype=per_pair.dtype, device=per_pair.device).index_add_(
        0, pair_group, torch.ones_like(per_pair)
    )
    return (loss_sums / counts.clamp(min=1)).mean()


def centering_penalty(scores: torch.Tensor) -> torch.Tensor:
    """mean(r^2): the pairwise loss only fixes differences; this keeps the rewards themselves near 0."""
    return scores.pow(2).mean()
