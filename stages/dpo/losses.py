"""Direct preference losses, as small pure functions on tensors, selected by `dpo.loss`.

Each takes the summed (or, for SimPO, length-normalised) log-probabilities of the better and
the worse reply of every pair and returns a `PairLosses`: one loss per pair and the implicit
reward of each side, the quantity the loss pushes apart. Shapes: every tensor is `(pairs,)`.

For the losses with a reference (sigmoid, ipo, hinge) the implicit reward of a reply is
beta * (log pi(reply) - log pi_ref(reply)) (Rafailov et al. 2023, eq. 5): at step 0, when the
policy is the reference, every reward is 0. SimPO has no reference; its reward is beta times the
policy's mean log-probability per reply token (Meng et al. 2024, eq. 4).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairLosses:
    """Per pair: the loss, and the implicit rewards of the better (chosen) and worse (rejected) reply. Each (pairs,)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def log_ratio_margin(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor
) -> torch.Tensor:
    """h = (log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l)): (pairs,) -> (pairs,)."""
    return (chosen_logps - ref_chosen_logps) - (rejected_logps - ref_rejected_logps)


def implicit_rewards(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(beta * (log pi - log pi_ref) of the chosen replies, of the rejected ones), detached: each (pairs,)."""
    return (beta * (chosen_logps - ref_chosen_logps)).detach(), (beta * (rejected_logps - ref_rejected_logps)).detach()


def sigmoid_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
    beta: float, label_smoothing: float = 0.0,
) -> PairLosses:
    """DPO (Rafailov et al. 2023, eq. 7): -log sigmoid(beta * h), h from `log_ratio_margin`.

    With `label_smoothing` eps > 0, conservative DPO (cDPO; Mitchell, "A note on DPO with noisy
    preferences", 2023): each label is taken to be flipped with probability eps, so the loss is
    -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), whose optimum is a finite margin
    rather than an ever-growing one. (Not robust DPO, Chowdhury et al. 2024, which divides by 1 - 2 eps
    and subtracts the flipped term.)

    *_logps: (pairs,) summed log-probabilities of each reply's tokens under the policy / reference.
    """
    logits = beta * log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PairLosses(losses, *implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta))


def ipo_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
    beta: float,
) -> PairLosses:
    """IPO (Azar et al. 2023, eq. 17, with their tau as `beta`): (h - 1 / (2 beta))^2.

    A squared loss that drives the margin h to a fixed 1 / (2 beta) instead of to infinity, so a
    deterministic preference does not push the policy arbitrarily far from the reference.

    *_logps: (pairs,) summed log-probabilities of each reply's tokens under the policy / reference.
    """
    margin = log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = (margin - 1 / (2 * beta)) ** 2
    return PairLosses(losses, *implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta))


def hinge_loss(
    chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor,
    beta: float,
) -> PairLosses:
    """The SLiC calibration loss (Zhao et al. 2023, eq. 1), on the reference-normalised margin as
    Liu et al. 2023 (RSO, "normalised SLiC") write it: max(0, 1 - beta * h).

    Pairs already separated by 1 / beta contribute nothing.

    *_logps: (pairs,) summed log-probabilities of each reply's tokens under the policy / reference.
    """
    margin = log_ratio_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps)
    losses = torch.relu(1 - beta * margin)
    return PairLosses(losses, *implicit_rewards(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta))


def simpo_loss(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, beta: float, gamma: float) -> PairLosses:
    """SimPO (Meng et al. 2024, eq. 6): -log sigmoid(beta * (mean log pi(y_w) - mean log pi(y_l)) - gamma).

    Reference-free: the reward of a reply is beta times the policy's mean log-probability per
    reply token (length-normalised, so a longer reply is not rewarded for being longer), and
    `gamma` is the margin the chosen reply's reward must clear.

    *_mean_logps: (pairs,) each reply's log-probability divided by its token count.
    """
    chosen_rewards, rejected_rewards = beta * chosen_mean_logps, beta * rejected_mean_logps
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return PairLosses(losses, chosen_rewards.detach(), rejected_rewards.detach())


REFERENCE_FREE = frozenset({"simpo"})  # losses that need no reference log-probs


def pair_losses(
    loss: str, logps: torch.Tensor, tokens: torch.Tensor, reference_logps: torch.Tensor | None,
    better: torch.Tensor, worse: torch.Tensor, *, beta: float, label_smoothing: float = 0.0, simpo_gamma: float = 0.0,
) -> PairLosses:
    """The loss named `loss` (sigmoid, ipo, hinge, simpo) on every pair of a batch.

    logps, tokens: (n_completions,) each completion's summed reply log-probability and its reply
    token count; reference_logps: (n_completions,) the reference's, or None for simpo;
    better, worse: (n_pairs,) indices into the completions.
    """
    if loss == "simpo":
        mean = logps / tokens.clamp(min=1)
        return simpo_loss(mean[better], mean[worse], beta, simpo_gamma)
    sides = (logps[better], logps[worse], reference_logps[better], reference_logps[worse])
    if loss == "sigmoid":
        return sigmoid_loss(*sides, beta, label_smoothing)
    if loss == "ipo":
        return ipo_loss(*sides, beta)
    if loss == "hinge":
        return hinge_loss(*sides, beta)
    raise ValueError(f"unknown DPO loss {loss!r}; use sigmoid, ipo, hinge or simpo")


def reward_accuracy(pairs: PairLosses) -> torch.Tensor:
    """Per pair, 1 where the chosen reply's implicit reward is the higher, 0.5 on a tie (the policy at
    the reference: every reward 0), else 0: (pairs,)."""
    margin = pairs.chosen_rewards - pairs.rejected_rewards
    return (margin > 0).float() + 0.5 * (margin == 0).float()
