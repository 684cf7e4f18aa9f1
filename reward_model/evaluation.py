"""How good is a reward model on held-out preferences: accuracy beside the rules that need no model.

On harmless-style data the shorter reply is the preferred one in well over half the pairs, so a
reward model that has learned nothing but "shorter is better" already scores about 0.56-0.60.
Its accuracy means something only beside that rule's, measured on the same pairs.
"""

from __future__ import annotations

import math

import torch

from reward_model.batching import EncodedGroup, collate_groups
from reward_model.scoring import at_last_token


def length_rule_accuracy(length_gap: torch.Tensor) -> float:
    """Accuracy of "the shorter reply wins" on pairs whose better-minus-worse reply lengths are
    `length_gap`: a tie in length counts half (a coin flip)."""
    if len(length_gap) == 0:
        return float("nan")
    return ((length_gap < 0).double() + 0.5 * (length_gap == 0).double()).mean().item()


@torch.no_grad()
def evaluate_preferences(scorer, groups: list[EncodedGroup], pad_token_id: int, batch_groups: int, accelerator) -> dict[str, float]:
    """Metrics over every held-out pair, each process scoring its share of the prompts.

    scorer: a module mapping (input_ids, attention_mask) to per-token scores (a TokenScorer).

    accuracy: fraction of pairs with r_better > r_worse (ties count as wrong)
    shorter_wins_accuracy: the rule "the shorter reply wins" on the same pairs (ties half);
        the best length-only rule is max(it, 1 - it)
    accuracy_longer_chosen / accuracy_shorter_chosen: accuracy on the pairs whose better reply is
        the longer / the shorter one (a model that only prefers short replies is below chance on
        the first)
    mean_margin: mean of r_better - r_worse over pairs
    reward_mean / reward_std: over every held-out completion; PPO normalises scores with them
    """
    was_training = scorer.training
    scorer.eval()
    mine = groups[accelerator.process_index :: accelerator.num_processes]
    # correct, pairs, margin, n, sum, sum_sq, shorter rule, longer chosen (n, correct), shorter chosen (n, correct)
    totals = torch.zeros(11, dtype=torch.float64, device=accelerator.device)
    for start in range(0, len(mine), batch_groups):
        batch = collate_groups(mine[start : start + batch_groups], pad_token_id)
        input_ids, attention_mask = batch["input_ids"].to(accelerator.device), batch["attention_mask"].to(accelerator.device)
        scores = at_last_token(scorer(input_ids, attention_mask), attention_mask).double()
        gap = scores[batch["better"].to(scores.device)] - scores[batch["worse"].to(scores.device)]
        right = (gap > 0).double()
        length_gap = batch["length_gap"].to(scores.device)
        longer, shorter = (length_gap > 0).double(), (length_gap < 0).double()
        totals += torch.stack([
            right.sum(),
            torch.tensor(float(len(gap)), dtype=torch.float64, device=scores.device),
            gap.sum(),
            torch.tensor(float(len(scores)), dtype=torch.float64, device=scores.device),
            scores.sum(),
            scores.pow(2).sum(),
            shorter.sum() + 0.5 * (length_gap == 0).double().sum(),
            longer.sum(),
            (right * longer).sum(),
            shorter.sum(),
            (right * shorter).sum(),
        ])
    correct, pairs, margin, count, total, total_sq, rule, longer_n, longer_right, shorter_n, shorter_right = (
        accelerator.reduce(totals, "sum").tolist()
    )
    scorer.train(was_training)
    mean = total / max(count, 1)
    return {
        "accuracy": correct / max(pairs, 1),
        "shorter_wins_accuracy": rule / pairs if pairs else float("nan"),
        "accuracy_longer_chosen": longer_right / longer_n if longer_n else float("nan"),
        "accuracy_shorter_chosen": shorter_right / shorter_n if shorter_n else float("nan"),
        "mean_margin": margin / max(pairs, 1),
        "reward_mean": mean,
        "reward_std": math.sqrt(max(total_sq / max(count, 1) - mean**2, 0.0)),
        "pairs": int(pairs),
    }


@torch.no_grad()
def preference_gaps(scorer, groups: list[EncodedGroup], pad_token_id: int, batch_groups: int, device) -> torch.Tensor:
    """r_better - r_worse for every pair of every group, in order, on this process alone: (pairs,) float64.

    Eval holds whole models on every process and compares several models pair by pair (their
    mean's accuracy needs each pair's gaps), so this returns the gaps rather than a total.
    """
    gaps = []
    for start in range(0, len(groups), batch_groups):
        batch = collate_groups(groups[start : start + batch_groups], pad_token_id)
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        scores = at_last_token(scorer(input_ids, attention_mask), attention_mask).double().cpu()
        gaps.append(scores[batch["better"]] - scores[batch["worse"]])
    return torch.cat(gaps) if gaps else torch.zeros(0, dtype=torch.float64)


def pair_length_gaps(groups: list[EncodedGroup]) -> torch.Tensor:
    """The better reply's length minus the worse one's, for every pair in the order `preference_gaps` gives: (pairs,)."""
    return torch.tensor([group.reply_lengths[better] - group.reply_lengths[worse]
                         for group in groups for better, worse in group.pairs], dtype=torch.float64)
