"""How good is a reward model on held-out preferences: accuracy, margin, and reward statistics."""

from __future__ import annotations

import math

import torch

from reward_model.batching import EncodedGroup, collate_groups
from reward_model.scoring import at_last_token


@torch.no_grad()
def evaluate_preferences(scorer, groups: list[EncodedGroup], pad_token_id: int, batch_groups: int, accelerator) -> dict[str, float]:
    """Metrics over every held-out pair, each process scoring its share of the prompts.

    scorer: a module mapping (input_ids, attention_mask) to per-token scores (a TokenScorer).

    accuracy: fraction of pairs with r_better > r_worse (ties count as wrong)
    mean_margin: mean of r_better - r_worse over pairs
    reward_mean / reward_std: over every held-out completion; PPO normalises scores with them
    """
    was_training = scorer.training
    scorer.eval()
    mine = groups[accelerator.process_index :: accelerator.num_processes]
    totals = torch.zeros(6, dtype=torch.float64, device=accelerator.device)  # correct, pairs, margin, n, sum, sum_sq
    for start in range(0, len(mine), batch_groups):
        batch = collate_groups(mine[start : start + batch_groups], pad_token_id)
        input_ids, attention_mask = batch["input_ids"].to(accelerator.device), batch["attention_mask"].to(accelerator.device)
        scores = at_last_token(scorer(input_ids, attention_mask), attention_mask).double()
        gap = scores[batch["better"].to(scores.device)] - scores[batch["worse"].to(scores.device)]
        totals += torch.stack([
            (gap > 0).sum().double(),
            torch.tensor(float(len(gap)), dtype=torch.float64, device=scores.device),
            gap.sum(),
            torch.tensor(float(len(scores)), dtype=torch.float64, device=scores.device),
            scores.sum(),
            scores.pow(2).sum(),
        ])
    correct, pairs, margin, count, total, total_sq = accelerator.reduce(totals, "sum").tolist()
    scorer.train(was_training)
    mean = total / max(count, 1)
    return {
        "accuracy": correct / max(pairs, 1),
        "mean_margin": margin / max(pairs, 1),
        "reward_mean": mean,
        "reward_std": math.sqrt(max(total_sq / max(count, 1) - mean**2, 0.0)),
        "pairs": int(pairs),
    }
