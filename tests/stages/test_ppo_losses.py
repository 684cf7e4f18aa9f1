"""PPO math against hand-computed values (stages/ppo/losses.py, advantages.py, kl_control.py)."""

import math

import pytest
import torch

from pipeline.models.logprobs import log_softmax_at, logprobs_from_logits, masked_mean
from stages.ppo.advantages import (
    generalized_advantages,
    group_normalized_advantages,
    leave_one_out_advantages,
    shaped_rewards,
    whiten,
)
from stages.ppo.kl_control import AdaptiveKLController, FixedKLController
from stages.ppo.losses import (
    MinibatchSize,
    aggregate,
    clipped_policy_loss,
    clipped_value_loss,
    entropy_from_log_probs,
    importance_log_ratio,
    kl_estimate,
)


def close(actual: torch.Tensor, expected) -> None:
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=1e-6, rtol=1e-5)


def test_masked_mean_ignores_padding():
    values = torch.tensor([[1.0, 2.0, 99.0], [3.0, -50.0, -50.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    assert masked_mean(values, mask, dim=1).tolist() == pytest.approx([1.5, 3.0])


def test_logprobs_use_the_sampling_temperature():
    logits = torch.tensor([[[2.0, 0.0, math.log(3.0)]]])
    tokens = torch.tensor([[2]])
    # At temperature 2 the logits are [1, 0, ln(3)/2]: p(2) = sqrt(3) / (e + 1 + sqrt(3)).
    expected = math.log(math.sqrt(3) / (math.e + 1 + math.sqrt(3)))
    assert logprobs_from_logits(logits, tokens, temperature=2.0).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.zeros(1, 1, 4)
    assert entropy_from_log_probs(log_softmax_at(uniform, 0.7)).item() == pytest.approx(math.log(4), rel=1e-6)


def test_kl_estimators_k1_k2_and_k3():
    logprobs = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.4)])
    assert kl_estimate(logprobs, ref, "k1").tolist() == pytest.approx([math.log(2), math.log(0.5)])
    # k2 = (log p - log q)^2 / 2
    assert kl_estimate(logprobs, ref, "k2").tolist() == pytest.approx([0.5 * math.log(2) ** 2, 0.5 * math.log(0.5) ** 2])
    # k3 = (q/p - 1) - log(q/p): for q/p = 0.5 -> 0.5 - 1 + ln 2; for q/p = 2 -> 1 - ln 2
    assert kl_estimate(logprobs, ref, "k3").tolist() == pytest.approx([-0.5 + math.log(2), 1 - math.log(2)])
    assert (kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="k4"):
        kl_estimate(logprobs, ref, "k4")


def test_k1_k2_k3_estimate_the_same_kl_on_the_policys_samples():
    """On tokens drawn from p, k1 and k3 average to KL(p || q); k2 to about it when p and q are close."""
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.4, 0.35, 0.25])
    exact = (p * (p / q).log()).sum().item()
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[tokens], q.log()[tokens]
    assert kl_estimate(logp, logq, "k1").mean().item() == pytest.approx(exact, abs=2e-3)
    assert kl_estimate(logp, logq, "k3").mean().item() == pytest.approx(exact, abs=2e-3)
    assert kl_estimate(logp, logq, "k2").mean().item() == pytest.approx(exact, rel=0.1)


def test_per_token_reward_is_kl_penalty_plus_score_on_the_eos_token():
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    last_index = torch.tensor([2, 3])  # row 0's EOS at position 2; row 1 has no EOS
    rewards = shaped_rewards(torch.tensor([1.0, -2.0]), kl, kl_coef=0.5, mask=mask, last_index=last_index)
    close(rewards, [[-0.05, -0.1, -0.15 + 1.0, 0.0], [-0.25, -0.25, -0.25, -0.25 - 2.0]])


def test_gae_matches_a_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[0.5, 0.25, 0.75, 9.0]])
    mask = torch.tensor([[1, 1, 1, 0]])  # the last position is padding: its reward and value must not count
    gamma, lam = 0.9, 0.8
    # deltas: t2 = 1 - 0.75 = 0.25; t1 = 0 + 0.9*0.75 - 0.25 = 0.425; t0 = 0 + 0.9*0.25 - 0.5 = -0.275
    a2 = 0.25
    a1 = 0.425 + gamma * lam * a2
    a0 = -0.275 + gamma * lam * a1
    advantages, returns = generalized_advantages(rewards, values, mask, gamma, lam)
    close(advantages, [[a0, a1, a2, 0.0]])
    close(returns, [[a0 + 0.5, a1 + 0.25, a2 + 0.75, 0.0]])


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    advantages, returns = generalized_advantages(rewards, values, torch.ones(1, 3), 1.0, 1.0)
    close(advantages, [[5.5, 4.5, 2.5]])
    close(returns, [[6.0, 5.0, 3.0]])


def test_whiten_uses_the_given_statistics_and_zeroes_padding():
    values = torch.tensor([[1.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 0]])
    whitened = whiten(values, mask, mean=torch.tensor(2.0), var=torch.tensor(4.0))
    close(whitened, [[-0.5, 0.5, 0.0]])


def test_clipped_policy_loss_and_its_diagnostics():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    advantages = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.tensor([[1, 1, 1]])
    per_token, stats = clipped_policy_loss(importance_log_ratio(new, old, mask, "token"), advantages, mask, cliprange=0.2)
    # per token max(-A r, -A clip(r)): 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); 0.5 -> max(-0.5, -0.8) = -0.5;
    # 1.1 with A = -1 -> max(1.1, 1.1) = 1.1
    close(per_token, [[-1.2, -0.5, 1.1]])
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["ratio"].item() == pytest.approx((1.5 + 0.5 + 1.1) / 3)
    log_ratios = torch.log(torch.tensor([1.5, 0.5, 1.1]))
    assert stats["approxkl"].item() == pytest.approx(0.5 * (log_ratios**2).mean().item())


def test_padding_does_not_reach_the_policy_loss():
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.1, 50.0]])
    advantages = torch.tensor([[1.0, 1000.0]])
    mask = torch.tensor([[1, 0]])
    for level in ("token", "sequence", "sequence_sum"):
        per_token, stats = clipped_policy_loss(importance_log_ratio(new, old, mask, level), advantages, mask, cliprange=0.2)
        loss = aggregate(per_token, mask, "token_mean", size(sequences=1, tokens=1))
        assert loss.item() == pytest.approx(-math.exp(0.1)), level
        assert stats["clipfrac"].item() == 0.0


def test_sequence_level_ratios_are_one_per_response():
    old = torch.zeros(2, 3)
    new = torch.tensor([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    close(importance_log_ratio(new, old, mask, "token"), new.tolist())
    # GSPO: the mean of the response's log ratios (its geometric mean ratio), on every token
    close(importance_log_ratio(new, old, mask, "sequence"), [[0.2, 0.2, 0.2], [0.4, 0.4, 0.4]])
    # the whole response's likelihood ratio: their sum
    close(importance_log_ratio(new, old, mask, "sequence_sum"), [[0.6, 0.6, 0.6], [0.4, 0.4, 0.4]])
    with pytest.raises(ValueError, match="word"):
        importance_log_ratio(new, old, mask, "word")


def test_a_sequence_ratio_clips_the_whole_response():
    """A response whose geometric-mean ratio left the clip range gets no gradient on any token,
    even a token whose own ratio is inside it."""
    old = torch.zeros(1, 2)
    new = torch.tensor([[0.0, 0.6]], requires_grad=True)  # token ratios 1 and e^0.6; sequence ratio e^0.3 > 1.2
    mask = torch.ones(1, 2)
    per_token, stats = clipped_policy_loss(importance_log_ratio(new, old, mask, "sequence"), torch.ones(1, 2), mask, 0.2)
    aggregate(per_token, mask, "token_mean", size(sequences=1, tokens=2)).backward()
    assert new.grad.abs().sum().item() == 0.0
    assert stats["clipfrac"].item() == 1.0
    new.grad = None
    per_token, _ = clipped_policy_loss(importance_log_ratio(new, old, mask, "token"), torch.ones(1, 2), mask, 0.2)
    aggregate(per_token, mask, "token_mean", size(sequences=1, tokens=2)).backward()
    close(new.grad, [[-0.5, 0.0]])  # the first token, inside the range, still learns


def size(sequences: int, tokens: float, global_tokens: float | None = None, processes: int = 1, response_length: int = 4):
    return MinibatchSize(sequences, torch.tensor(float(tokens)), torch.tensor(float(global_tokens or tokens)), processes, response_length)


def test_loss_aggregations_by_hand():
    per_token = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    whole = size(sequences=2, tokens=4, response_length=4)
    assert aggregate(per_token, mask, "token_mean", whole).item() == pytest.approx(10 / 4)
    assert aggregate(per_token, mask, "sequence_mean", whole).item() == pytest.approx((2.0 + 4.0) / 2)
    assert aggregate(per_token, mask, "constant", whole).item() == pytest.approx(10 / (2 * 4))
    # DAPO: this process holds 4 of the minibatch's 10 tokens over 2 processes; gradients are then
    # averaged over the processes, so its share is scaled by 2 to make every token weigh 1/10.
    assert aggregate(per_token, mask, "token_sum", size(2, 4, global_tokens=10, processes=2)).item() == pytest.approx(2 * 10 / 10)
    with pytest.raises(ValueError, match="median"):
        aggregate(per_token, mask, "median", whole)


def test_micro_batch_shares_add_up_to_the_minibatch_loss():
    """Split a minibatch into micro-batches of unequal lengths: the shares sum to the whole's loss."""
    per_token = torch.rand(6, 5, generator=torch.Generator().manual_seed(0))
    mask = torch.tensor([[1] * 5, [1] * 5, [1, 1, 0, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 0, 0], [1] * 4 + [0]])
    whole = size(sequences=6, tokens=float(mask.sum()), response_length=5)
    for how in ("token_mean", "sequence_mean", "token_sum", "constant"):
        parts = aggregate(per_token[:2], mask[:2], how, whole) + aggregate(per_token[2:], mask[2:], how, whole)
        assert parts.item() == pytest.approx(aggregate(per_token, mask, how, whole).item()), how


def test_clipped_value_loss():
    old = torch.tensor([[1.0, 1.0]])
    new = torch.tensor([[2.0, 1.1]])
    returns = torch.tensor([[3.0, 0.0]])
    loss, stats = clipped_value_loss(new, old, returns, torch.ones(1, 2), cliprange_value=0.5)
    # token 0: unclipped (2-3)^2 = 1, clipped (1.5-3)^2 = 2.25 -> 2.25; token 1: 1.21 vs 1.21 -> 1.21
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.21) / 2)
    assert stats["clipfrac"].item() == pytest.approx(0.5)


def test_group_baselines_for_rloo_and_grpo():
    rewards = torch.tensor([1.0, 2.0, 6.0, 0.0, 0.0, 3.0])  # two prompts, three samples each
    assert leave_one_out_advantages(rewards, 3).tolist() == pytest.approx([1 - 4, 2 - 3.5, 6 - 1.5, -1.5, -1.5, 3.0])
    normalized = group_normalized_advantages(rewards, 3)
    first = torch.tensor([1.0, 2.0, 6.0])
    assert normalized[:3].tolist() == pytest.approx(((first - 3) / (first.std() + 1e-4)).tolist())
    assert normalized[3:].sum().item() == pytest.approx(0.0, abs=1e-5)
    # Dr. GRPO: centred on the group's mean, not divided by its std
    assert group_normalized_advantages(rewards, 3, scale=False).tolist() == pytest.approx([-2.0, -1.0, 3.0, -1.0, -1.0, 2.0])


def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.value == 0.1
    adaptive = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    adaptive.update(9.0, 100)  # error +0.5 clipped to +0.2
    assert adaptive.value == pytest.approx(0.1 * (1 + 0.2 * 100 / 1000))
    adaptive.update(5.4, 100)  # error -0.1
    assert adaptive.value == pytest.approx(0.1 * 1.02 * (1 - 0.1 * 0.1))
    restored = AdaptiveKLController(0.5, 6.0, 1000)
    restored.load_state_dict(adaptive.state_dict())
    assert restored.value == adaptive.value
