"""The one policy evaluator on tiny in-memory models: what each figure is, reply by reply."""

import pytest
import torch

from data.padding import pad_batch
from pipeline.models.generation import seeded_generator
from reward_model.judges import Judge, JudgePanel
from reward_model.policy_evaluation import evaluate_policy, reply_sampler
from reward_model.scoring import at_last_token
from reward_model.statistics import ScoreStatistics
from tests.conftest import tiny_causal_lm, tiny_token_scorer


def evaluate(tokenizer, policy, reference, panel, seed=0):
    prompts = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                                           return_dict=True)["input_ids"])
        for text in ("Hi", "What is the capital of France, my friend?", "Tell me more", "Why?", "Speak")
    ]
    batches = [pad_batch(prompts[start : start + 2], tokenizer.pad_token_id, side="left") for start in range(0, len(prompts), 2)]
    sample = reply_sampler(policy, reference, panel.reward_function("reward"), tokenizer,
                           temperature=0.7, response_length=6, micro_batch_size=2)
    return prompts, evaluate_policy(sample, batches, seeded_generator(seed, "cpu"), panel, tokenizer, micro_batch_size=2)


def tiny_panel(tokenizer) -> JudgePanel:
    return JudgePanel([
        Judge("reward", tiny_token_scorer(tokenizer, seed=1).eval(), ScoreStatistics(mean=0.0, std=1.0)),
        Judge("judge-0", tiny_token_scorer(tokenizer, seed=2).eval(), ScoreStatistics(mean=0.1, std=2.0)),
        Judge("judge-1", tiny_token_scorer(tokenizer, seed=3).eval(), ScoreStatistics(mean=-0.2, std=0.5)),
    ])


def last_token_score(scorer, ids: list[int]) -> float:
    ids = torch.tensor([ids])
    return at_last_token(scorer(ids, torch.ones_like(ids)), torch.ones_like(ids)).item()


def test_the_figures_are_means_over_replies_and_the_reference_against_itself_has_no_kl(bpe_tokenizer):
    policy = tiny_causal_lm(bpe_tokenizer).eval()
    panel = tiny_panel(bpe_tokenizer)
    _, evaluation = evaluate(bpe_tokenizer, policy, policy, panel)
    assert len(evaluation.scores) == len(evaluation.lengths) == len(evaluation.tokens) == 5
    assert evaluation.kl.tolist() == [0.0] * 5
    metrics = evaluation.metrics
    assert metrics["kl"] == 0.0
    assert metrics["score"] == pytest.approx(evaluation.scores.double().mean().item(), abs=1e-12)
    assert metrics["response_length"] == evaluation.lengths.double().mean().item()
    assert metrics["eos_fraction"] == evaluation.has_eos.double().mean().item()
    # The judges' score: each held-out judge in its own units, then their mean (the training model left out).
    standard = [(evaluation.judged["judge-0"] - 0.1) / 2.0, (evaluation.judged["judge-1"] + 0.2) / 0.5]
    torch.testing.assert_close(evaluation.judges, torch.stack(standard).mean(0))
    assert metrics["judges_score"] == pytest.approx(evaluation.judges.double().mean().item(), abs=1e-12)
    # Seeded: the same stream gives the same replies, another stream others.
    assert evaluate(bpe_tokenizer, policy, policy, panel)[1].tokens == evaluation.tokens
    assert evaluate(bpe_tokenizer, policy, policy, panel, seed=1)[1].tokens != evaluation.tokens


def test_replies_are_scored_on_the_ids_sampled_and_judged_completed_with_eos(bpe_tokenizer):
    policy, reference = tiny_causal_lm(bpe_tokenizer, seed=0).eval(), tiny_causal_lm(bpe_tokenizer, seed=5).eval()
    panel = tiny_panel(bpe_tokenizer)
    prompts, evaluation = evaluate(bpe_tokenizer, policy, reference, panel)
    assert (evaluation.kl != 0).all()
    eos = bpe_tokenizer.eos_token_id
    scorers = {judge.name: judge.scorer for judge in panel.judges}
    for index, (prompt, tokens) in enumerate(zip(prompts, evaluation.tokens)):
        sampled = tokens + [eos] if evaluation.has_eos[index] else tokens
        assert len(sampled) == evaluation.lengths[index]
        # As sampled (what PPO optimises): the reward model at the reply's last sampled token.
        assert evaluation.scores[index].item() == pytest.approx(last_token_score(scorers["reward"], prompt + sampled), abs=1e-5)
        # By every model of the panel: the same ids with EOS, whether the policy said it or the limit cut the reply.
        for name, scorer in scorers.items():
            assert evaluation.judged[name][index].item() == pytest.approx(last_token_score(scorer, prompt + tokens + [eos]), abs=1e-5)
