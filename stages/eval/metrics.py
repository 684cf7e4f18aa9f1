"""Comparison metrics over paired replies: small pure functions."""

from __future__ import annotations

import torch


def win_rate(challenger: torch.Tensor, baseline: torch.Tensor) -> float:
    """Share of prompts where the challenger's reply scores higher; a tie counts half. In [0, 1]."""
    if len(challenger) == 0:
        return float("nan")
    wins = (challenger > baseline).float() + 0.5 * (challenger == baseline).float()
    return wins.mean().item()


def length_stats(lengths: torch.Tensor) -> dict[str, float]:
    """Mean, median and 90th percentile of reply lengths in tokens."""
    lengths = lengths.float()
    return {
        "length_mean": lengths.mean().item(),
        "length_median": lengths.median().item(),
        "length_p90": torch.quantile(lengths, 0.9).item(),
    }
