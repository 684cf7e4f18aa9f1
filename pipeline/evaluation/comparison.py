"""Win rates between two policies' replies to the same prompts, with intervals and length control.

    outcome = outcomes(ppo_scores, sft_scores)             # (prompts, S, T): 1 win, 0.5 tie, 0 loss
    resamples = prompt_resamples(len(outcome), seed=0)
    raw = win_rate(outcome, resamples)                     # Estimate(value, low, high, count)
    equal_length = length_controlled_win_rate(outcome, ppo_lengths, sft_lengths, resamples)

Every reply of one policy to a prompt is compared with every reply of the other to the same prompt;
a prompt's comparisons average to its win rate and prompts weigh equally. Intervals are percentile
bootstraps over prompts: the prompts are the sample (the replies to one prompt are not independent
of each other). One set of resampled prompts serves every figure of a comparison, so their
intervals describe the same uncertainty.

Length control, as AlpacaEval's length-controlled win rate (Dubois et al., 2024): a logistic
regression of the outcome on tanh(length difference / its standard deviation) with an intercept;
the controlled win rate is the fitted probability at zero length difference, sigmoid(intercept).
A matched-length win rate keeps only the comparisons of replies of about the same length.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import combinations

import torch


@dataclass(frozen=True)
class Estimate:
    """A figure with its bootstrap interval and the number of comparisons behind it."""

    value: float
    low: float
    high: float
    count: int

    def as_metrics(self, key: str) -> dict[str, float]:
        """{key: value, key_low, key_high, key_n}: the flat form the manifest and W&B take."""
        return {key: self.value, f"{key}_low": self.low, f"{key}_high": self.high, f"{key}_n": self.count}

    def describe(self) -> str:
        """`0.53 [0.49, 0.57]`."""
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}]"


NOT_MEASURED = Estimate(float("nan"), float("nan"), float("nan"), 0)


def outcomes(challenger: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Every challenger reply against every baseline reply to the same prompt.

    challenger: (prompts, S) scores, baseline: (prompts, T) -> (prompts, S, T) float64 with 1 where
    the challenger's reply scores higher, 0.5 for a tie and 0 where it scores lower.
    """
    challenger, baseline = challenger.double(), baseline.double()
    if challenger.shape[0] != baseline.shape[0]:
        raise ValueError(f"the two policies answered different numbers of prompts: {challenger.shape[0]} and {baseline.shape[0]}")
    a, b = challenger[:, :, None], baseline[:, None, :]
    return (a > b).double() + 0.5 * (a == b).double()


def length_differences(challenger_lengths: torch.Tensor, baseline_lengths: torch.Tensor) -> torch.Tensor:
    """(prompts, S) and (prompts, T) reply lengths -> (prompts, S, T) challenger minus baseline, float64."""
    return challenger_lengths.double()[:, :, None] - baseline_lengths.double()[:, None, :]


def prompt_resamples(prompts: int, samples: int = 1000, seed: int = 0) -> torch.Tensor:
    """(samples, prompts) counts: how often each prompt is drawn in each bootstrap resample."""
    generator = torch.Generator().manual_seed(seed)
    drawn = torch.randint(prompts, (samples, prompts), generator=generator)
    return torch.zeros(samples, prompts, dtype=torch.float64).scatter_add_(1, drawn, torch.ones(samples, prompts, dtype=torch.float64))


def percentile_interval(values: torch.Tensor, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap values (NaNs, from resamples with nothing to measure, left out)."""
    values = values[~torch.isnan(values)]
    if len(values) == 0:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    low, high = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=values.dtype))
    return low.item(), high.item()


def win_rate(outcome: torch.Tensor, resamples: torch.Tensor, level: float = 0.95) -> Estimate:
    """Mean over prompts of each prompt's share of won comparisons (ties half)."""
    if outcome.numel() == 0:
        return NOT_MEASURED
    per_prompt = outcome.mean(dim=(1, 2))
    boot = resamples @ per_prompt / resamples.sum(1)
    return Estimate(per_prompt.mean().item(), *percentile_interval(boot, level), outcome.numel())


def length_controlled_win_rate(
    outcome: torch.Tensor, differences: torch.Tensor, resamples: torch.Tensor, level: float = 0.95
) -> Estimate:
    """The win rate a logistic fit of outcome ~ 1 + tanh(difference / sd) predicts at equal length.

    outcome, differences: (prompts, S, T); each prompt's comparisons weigh 1/(S*T) in the fit, so
    prompts weigh equally as in `win_rate`. Ties enter as half a win (a soft label).
    """
    if outcome.numel() == 0:
        return NOT_MEASURED
    prompts, per_prompt = outcome.shape[0], outcome.shape[1] * outcome.shape[2]
    scale = differences.std() if differences.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    x = torch.tanh(differences / scale) if scale > 0 else torch.zeros_like(differences)
    features = torch.stack([torch.ones_like(x).flatten(), x.flatten()], dim=1)  # (N, 2)
    labels = outcome.flatten()
    # The full sample first, then every resample: one batched fit.
    prompt_weights = torch.cat([torch.ones(1, prompts, dtype=torch.float64), resamples], dim=0)
    weights = prompt_weights.repeat_interleave(per_prompt, dim=1) / per_prompt  # (B, N)
    intercepts = logistic_intercepts(features, labels, weights)
    rates = torch.sigmoid(intercepts)
    return Estimate(rates[0].item(), *percentile_interval(rates[1:], level), outcome.numel())


def logistic_intercepts(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Weighted logistic regressions sharing features, by Newton's method: (B,) fitted intercepts.

    features: (N, 2) with a column of ones first; labels: (N,) in [0, 1]; weights: (B, N), one fit
    per row. A small ridge keeps a fit whose outcomes are all one way finite (its intercept then
    sits at the clamp, where sigmoid is 1 or 0 to many digits).
    """
    theta = torch.zeros(weights.shape[0], features.shape[1], dtype=torch.float64)
    ridge = 1e-6 * torch.eye(features.shape[1], dtype=torch.float64) * weights.sum(1).clamp(min=1)[:, None, None]
    for _ in range(iterations):
        p = torch.sigmoid(theta @ features.T)  # (B, N)
        gradient = (weights * (labels - p)) @ features  # (B, 2)
        curvature = torch.einsum("bn,ni,nj->bij", weights * p * (1 - p), features, features) + ridge
        step = torch.linalg.solve(curvature, gradient.unsqueeze(-1)).squeeze(-1)
        theta = (theta + step).clamp(-30, 30)
        if step.abs().max() < 1e-10:
            break
    return theta[:, 0]


def matched_length_win_rate(
    outcome: torch.Tensor, challenger_lengths: torch.Tensor, baseline_lengths: torch.Tensor, resamples: torch.Tensor,
    *, tolerance: float = 0.1, min_tokens: int = 2, level: float = 0.95,
) -> Estimate:
    """The win rate over comparisons of replies of about the same length only.

    Two replies match when their lengths differ by at most `min_tokens` or `tolerance` of the longer
    one, whichever is more. Pooled over prompts (a prompt weighs by its matched comparisons); NaN
    when nothing matches.
    """
    a, b = challenger_lengths.double()[:, :, None], baseline_lengths.double()[:, None, :]
    matched = ((a - b).abs() <= torch.maximum(torch.full_like(a - b, float(min_tokens)), tolerance * torch.maximum(a, b))).double()
    count = int(matched.sum().item())
    if count == 0:
        return Estimate(float("nan"), float("nan"), float("nan"), 0)
    wins, counts = (outcome * matched).sum(dim=(1, 2)), matched.sum(dim=(1, 2))
    boot = (resamples @ wins) / (resamples @ counts)  # NaN where a resample drew no matched prompt
    return Estimate((wins.sum() / counts.sum()).item(), *percentile_interval(boot, level), count)


def judge_agreement(outcomes_by_judge: list[torch.Tensor]) -> dict[str, float]:
    """How often judges agree on the same comparisons.

    all_agree: share of comparisons where every judge gives the same verdict (win, tie or loss);
    pairwise: mean over pairs of judges of the share of comparisons they agree on. NaN with fewer
    than two judges.
    """
    if len(outcomes_by_judge) < 2:
        return {"all_agree": float("nan"), "pairwise": float("nan")}
    stacked = torch.stack([outcome.flatten() for outcome in outcomes_by_judge])
    all_agree = (stacked == stacked[:1]).all(dim=0).double().mean().item()
    pairwise = [(stacked[i] == stacked[j]).double().mean().item() for i, j in combinations(range(len(stacked)), 2)]
    return {"all_agree": all_agree, "pairwise": sum(pairwise) / len(pairwise)}


def correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's r of two equally long vectors; NaN when either is constant."""
    x, y = x.double().flatten(), y.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt((x * x).sum().item() * (y * y).sum().item())
    return (x * y).sum().item() / denominator if denominator > 0 else float("nan")
