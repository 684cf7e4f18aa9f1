"""Does RL learn? PPO, RLOO and GRPO on a known synthetic reward, tiny policy, CPU."""

import copy

import pytest
import torch
from accelerate import Accelerator

from data.padding import pad_batch
from stages.ppo.trainer import RLTrainer
from tests.conftest import tiny_causal_lm, tiny_token_scorer
from tests.stages.test_ppo_rollout import ppo_settings


def target_fraction_reward(target_ids: torch.Tensor):
    """Reward = fraction of response tokens that are in `target_ids`, behind the RewardFunction interface."""

    def score(query_ids, query_mask, response_ids, response_mask):
        mask = response_mask.float()
        hits = torch.isin(response_ids, target_ids).float() * mask
        return hits.sum(1) / mask.sum(1).clamp(min=1)

    return score


@pytest.mark.parametrize(
    "estimator, overrides",
    [
        ("ppo", {"samples_per_prompt": 1, "kl_coef": 0.02}),
        ("rloo", {"samples_per_prompt": 4, "kl_coef": 0.02}),
        # GRPO's KL is a per-token mean in the loss rather than a summed reward penalty: a weaker
        # pull for the same beta, so it gets a larger one.
        ("grpo", {"samples_per_prompt": 4, "kl_coef": 0.1}),
    ],
)
def test_rl_raises_a_known_reward_with_bounded_kl(bpe_tokenizer, estimator, overrides):
    torch.manual_seed(0)
    policy = tiny_causal_lm(bpe_tokenizer, seed=0)
    reference = copy.deepcopy(policy)
    value = tiny_token_scorer(bpe_tokenizer) if estimator == "ppo" else None
    prompts = [
        list(bpe_tokenizer(text, add_special_tokens=False)["input_ids"])
        for text in ("First Citizen:", "Before we proceed", "any further, hear", "me speak. All:")
    ]
    # 16 episodes a rollout: the 4 prompts, each sampled k times in a row (k = samples_per_prompt),
    # the whole block repeated to fill the batch.
    k = overrides["samples_per_prompt"]
    batch = [prompt for prompt in prompts for _ in range(k)] * (16 // (4 * k))
    query_ids, query_mask = pad_batch(batch, bpe_tokenizer.pad_token_id, side="left")
    target_ids = torch.arange(50, 90)  # 40 of 400 tokens: a 10% base rate for an untrained policy
    reward = target_fraction_reward(target_ids)
    settings = ppo_settings(
        estimator=estimator, rollout_batch_size=16, num_mini_batches=2, micro_batch_size=8, ppo_epochs=4,
        response_length=12, temperature=1.0, missing_eos_penalty="none", normalize_scores=False,
        policy_learning_rate=3e-3, value_learning_rate=3e-3, lr_schedule="constant", **overrides,
    )
    trainer = RLTrainer(policy, reference, value, reward, bpe_tokenizer, settings, Accelerator(cpu=True), total_updates=320, seed=0)
    history = [trainer.step(query_ids, query_mask)[0] for _ in range(40)]
    start = sum(h["objective/raw_scores"] for h in history[:3]) / 3
    end = sum(h["objective/raw_scores"] for h in history[-3:]) / 3
    assert start < 0.2
    # About three times the base rate. The float details differ between CPUs: on one machine GRPO
    # went 0.099 -> 0.314 here, on another past 0.35.
    assert end > start + 0.2, f"{estimator}: mean reward {start:.3f} -> {end:.3f}"
    # Moved, not collapsed: a policy that only emits target tokens would be ~12 ln 10 = 28 nats away,
    # one stuck on a single token ~12 ln 400 = 72.
    assert history[-1]["objective/kl"] < 36.0
