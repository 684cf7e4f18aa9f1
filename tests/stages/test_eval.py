"""The eval stage measures a policy as PPO's eval curve does: one evaluator, the same figures."""

import copy

import torch
from accelerate import Accelerator

from pipeline.config import EvalConfig, PPOConfig, nest_ppo_keys
from reward_model.functions import reward_model_function
from reward_model.judges import TRAINING_MODEL, Judge, JudgePanel
from reward_model.statistics import ScoreStatistics
from stages.eval.__main__ import SCORED_AS_SAMPLED, answer
from stages.ppo.prompts import left_padded
from stages.ppo.trainer import RLTrainer, evaluate_policy
from tests.conftest import tiny_causal_lm, tiny_token_scorer

SEED = 3


def test_ppo_and_the_eval_stage_measure_a_trained_policy_alike(bpe_tokenizer):
    tokenizer = bpe_tokenizer
    settings = PPOConfig.model_validate(nest_ppo_keys({
        "prompts": {"path": "data/samples/hh_harmless_1000.jsonl"},
        "rollout_batch_size": 4, "num_mini_batches": 2, "micro_batch_size": 2, "ppo_epochs": 1,
        "response_length": 6, "temperature": 0.8, "policy_learning_rate": 1e-2, "value_learning_rate": 1e-2,
    })[0])
    policy = tiny_causal_lm(tokenizer)
    reference = copy.deepcopy(policy)
    reward_model = tiny_token_scorer(tokenizer, seed=1)
    judges = [Judge(f"judge-{i}", tiny_token_scorer(tokenizer, seed=2 + i).eval(), ScoreStatistics(mean=0.1 * i, std=1.0 + i))
              for i in range(2)]
    trainer = RLTrainer(policy, reference, tiny_token_scorer(tokenizer, seed=4), reward_model_function(reward_model), tokenizer,
                        settings, Accelerator(cpu=True), total_updates=4, seed=SEED)
    prompts = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])
        for text in ("Hi", "What is the capital of France, my friend?", "Tell me more", "Why?", "Speak", "Go on")
    ]
    for _ in range(2):  # the policy moves away from the reference
        trainer.step(*left_padded(prompts[:4], tokenizer.pad_token_id))

    # PPO's evaluation as its stage runs it: the judges only (it trains against the reward model).
    batches = [left_padded(prompts[start : start + 2], tokenizer.pad_token_id) for start in range(0, len(prompts), 2)]
    during_ppo = evaluate_policy(trainer, batches, SEED, JudgePanel(judges))

    # The eval stage on the saved policy: the same prompts, one reply each, at PPO's temperature.
    section = EvalConfig(samples_per_prompt=1, batch_size=2, response_length=6, temperature=settings.sampling.temperature)
    panel = JudgePanel([Judge(TRAINING_MODEL, reward_model.eval(), ScoreStatistics(mean=0.0, std=1.0)), *judges])
    trained = trainer.accelerator.unwrap_model(trainer.model).policy
    out = answer(trained, reference, panel, tokenizer, prompts, section, trainer.accelerator, SEED)

    ppo_figures, eval_figures = during_ppo.metrics, out["evaluation"].metrics
    assert set(ppo_figures) == {"score", "kl", "response_length", "eos_fraction", "judges_score"}
    assert eval_figures == ppo_figures and ppo_figures["kl"] > 0
    torch.testing.assert_close(out["scores"][SCORED_AS_SAMPLED], during_ppo.scores, rtol=0, atol=0)
    torch.testing.assert_close(out["scores"]["judges"], during_ppo.judges, rtol=0, atol=0)
    torch.testing.assert_close(out["lengths"], during_ppo.lengths, rtol=0, atol=0)
