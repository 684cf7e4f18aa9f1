"""DPO's losses against hand-computed values (stages/dpo/losses.py)."""

import math

import pytest
import torch

from stages.dpo.losses import hinge_loss, ipo_loss, log_ratio_margin, pair_losses, reward_accuracy, sigmoid_loss, simpo_loss

# Two pairs. Pair 0: the policy raised the chosen reply by 1 nat over the reference and lowered the
# rejected one by 1 (h = 2); pair 1: the policy moved the wrong way (h = -1).
CHOSEN = torch.tensor([-9.0, -12.0])
REJECTED = torch.tensor([-11.0, -10.0])
REF_CHOSEN = torch.tensor([-10.0, -11.0])
REF_REJECTED = torch.tensor([-10.0, -10.0])
LOGPS = (CHOSEN, REJECTED, REF_CHOSEN, REF_REJECTED)


def close(actual: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-5)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_log_ratio_margin_is_the_chosen_gain_over_the_rejected_gain():
    close(log_ratio_margin(*LOGPS), [2.0, -1.0])


def test_sigmoid_loss_and_implicit_rewards():
    result = sigmoid_loss(*LOGPS, beta=0.5)
    # -log sigmoid(0.5 * 2) and -log sigmoid(0.5 * -1)
    close(result.losses, [0.31326169, 0.97407698])
    close(result.chosen_rewards, [0.5, -0.5])  # 0.5 * (-9 + 10), 0.5 * (-12 + 11)
    close(result.rejected_rewards, [-0.5, 0.0])


def test_label_smoothing_is_conservative_dpo():
    result = sigmoid_loss(*LOGPS, beta=0.5, label_smoothing=0.1)
    expected = [-0.9 * log_sigmoid(z) - 0.1 * log_sigmoid(-z) for z in (1.0, -0.5)]
    close(result.losses, expected)
    assert expected[0] == pytest.approx(0.9 * 0.31326169 + 0.1 * 1.31326169)
    # Smoothing keeps a finite optimum: at a huge margin the loss grows again.
    far = sigmoid_loss(torch.tensor([0.0]), torch.tensor([-100.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.5, label_smoothing=0.1)
    assert far.losses.item() == pytest.approx(0.1 * 50.0, rel=1e-3)


def test_ipo_drives_the_margin_to_one_over_two_beta():
    result = ipo_loss(*LOGPS, beta=0.25)  # target margin 1 / (2 * 0.25) = 2
    close(result.losses, [0.0, 9.0])  # (2 - 2)^2, (-1 - 2)^2
    close(result.chosen_rewards, [0.25, -0.25])


def test_hinge_loss_is_zero_past_a_margin_of_one_over_beta():
    result = hinge_loss(*LOGPS, beta=0.5)
    close(result.losses, [0.0, 1.5])  # max(0, 1 - 0.5 * 2), max(0, 1 + 0.5)
    close(result.rejected_rewards, [-0.5, 0.0])


def test_simpo_is_reference_free_and_length_normalised():
    # Mean log-probability per token: chosen -1.0 and -2.0, rejected -1.5 and -1.0.
    result = simpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0]), beta=2.0, gamma=0.5)
    # -log sigmoid(2 * (-1 + 1.5) - 0.5) = -log sigmoid(0.5); -log sigmoid(2 * (-2 + 1) - 0.5) = -log sigmoid(-2.5)
    close(result.losses, [0.47407698, 2.57888973])
    close(result.chosen_rewards, [-2.0, -4.0])
    close(result.rejected_rewards, [-3.0, -2.0])


def test_losses_give_gradients_to_the_policy_only():
    chosen = CHOSEN.clone().requires_grad_()
    result = sigmoid_loss(chosen, REJECTED, REF_CHOSEN, REF_REJECTED, beta=0.5)
    result.losses.sum().backward()
    # d/dc -log sigmoid(beta h) = -beta * sigmoid(-beta h)
    close(chosen.grad, [-0.5 / (1 + math.e), -0.5 / (1 + math.exp(-0.5))])
    assert not result.chosen_rewards.requires_grad


def test_the_loss_is_chosen_by_name_and_simpo_divides_by_reply_tokens():
    logps, tokens = torch.tensor([-9.0, -11.0, -12.0, -10.0]), torch.tensor([3.0, 11.0, 4.0, 5.0])
    reference = torch.tensor([-10.0, -10.0, -11.0, -10.0])
    better, worse = torch.tensor([0, 2]), torch.tensor([1, 3])  # the pairs of LOGPS above
    close(pair_losses("hinge", logps, tokens, reference, better, worse, beta=0.5).losses, [0.0, 1.5])
    close(pair_losses("sigmoid", logps, tokens, reference, better, worse, beta=0.5).losses, [0.31326169, 0.97407698])
    simpo = pair_losses("simpo", logps, tokens, None, better, worse, beta=1.0, simpo_gamma=0.0)
    close(simpo.chosen_rewards, [-3.0, -3.0])  # -9 / 3, -12 / 4
    close(simpo.rejected_rewards, [-1.0, -2.0])  # -11 / 11, -10 / 5
    with pytest.raises(ValueError, match="unknown DPO loss 'kto'"):
        pair_losses("kto", logps, tokens, reference, better, worse, beta=0.5)


def test_reward_accuracy_counts_a_tie_as_half():
    pairs = sigmoid_loss(*LOGPS, beta=0.5)
    close(reward_accuracy(pairs), [1.0, 0.0])
    at_reference = sigmoid_loss(CHOSEN, REJECTED, CHOSEN, REJECTED, beta=0.5)
    close(reward_accuracy(at_reference), [0.5, 0.5])
