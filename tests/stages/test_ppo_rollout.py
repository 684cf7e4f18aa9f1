"""Experience making and the PPO update on tiny in-memory models: the implementation details."""

import copy

import pytest
import torch
from accelerate import Accelerator

from data.padding import pad_batch
from pipeline.config import PPOConfig, nest_ppo_keys
from pipeline.models.logprobs import logprobs_from_logits, response_logits
from pipeline.models.responses import length_sorted_micro_batches, real_columns, truncate_after_eos
from stages.ppo import rollout as rollout_module
from stages.ppo.rollout import Experience
from stages.ppo.trainer import RLTrainer, disable_dropout
from tests.conftest import tiny_causal_lm, tiny_token_scorer

EOS, PAD = 7, 0


def test_truncate_after_the_first_eos():
    responses = torch.tensor([[5, EOS, 9, EOS], [5, 6, 8, 9], [EOS, 3, 3, 3]])
    truncated, mask, has_eos, last = truncate_after_eos(responses, EOS, PAD)
    assert truncated.tolist() == [[5, EOS, PAD, PAD], [5, 6, 8, 9], [EOS, PAD, PAD, PAD]]
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert has_eos.tolist() == [True, False, True] and last.tolist() == [1, 3, 0]


def ppo_settings(**overrides) -> PPOConfig:
    values = {
        "prompts": {"path": "data/samples/hh_harmless_1000.jsonl"},
        "rollout_batch_size": 4, "num_mini_batches": 2, "micro_batch_size": 2, "ppo_epochs": 1,
        "response_length": 6, "temperature": 0.7, "policy_learning_rate": 1e-3, "value_learning_rate": 5e-3,
    }
    values.update(overrides)
    return PPOConfig.model_validate(nest_ppo_keys(values)[0])


class RecordingReward:
    """A reward function that scores by content and remembers, per scored row, what it was given."""

    def __init__(self):
        self.rows = []  # (real query tokens, real response tokens) of every row scored

    @staticmethod
    def score_of(query: list[int], response: list[int]) -> float:
        return float(len(query) + 10 * len(response) + sum(response) % 7)

    def __call__(self, query_ids, query_mask, response_ids, response_mask):
        scores = []
        for ids, mask, tokens, token_mask in zip(query_ids, query_mask, response_ids, response_mask):
            row = (ids[mask.bool()].tolist(), tokens[token_mask.bool()].tolist())
            self.rows.append(row)
            scores.append(self.score_of(*row))
        return torch.tensor(scores)


@pytest.fixture
def trainer_parts(bpe_tokenizer):
    policy = tiny_causal_lm(bpe_tokenizer)
    reference = copy.deepcopy(policy)
    value = tiny_token_scorer(bpe_tokenizer)
    reward = RecordingReward()
    prompts = [
        bpe_tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        for text in ("Hi", "What is the capital of France, my friend?", "Tell me more", "Why?")
    ]
    query_ids, query_mask = pad_batch([list(p) for p in prompts], bpe_tokenizer.pad_token_id, side="left")
    return policy, reference, value, reward, query_ids, query_mask


def make_trainer(bpe_tokenizer, policy, reference, value, reward, **overrides):
    return RLTrainer(policy, reference, value, reward, bpe_tokenizer, ppo_settings(**overrides), Accelerator(cpu=True), total_updates=10)


def test_left_padding_with_position_ids_changes_nothing(bpe_tokenizer):
    model = tiny_causal_lm(bpe_tokenizer).eval()
    sequences = [[11, 12, 13, 14, 15, 16], [21, 22, 23]]
    ids, mask = pad_batch(sequences, bpe_tokenizer.pad_token_id, side="left")
    batched = response_logits(model, ids, mask, response_length=2)
    for row, sequence in enumerate(sequences):
        alone = response_logits(model, torch.tensor([sequence]), torch.ones(1, len(sequence), dtype=torch.long), 2)
        torch.testing.assert_close(batched[row], alone[0], atol=1e-5, rtol=1e-4)


def test_rollout_samples_as_configured_and_logprobs_match_the_training_pass(bpe_tokenizer, trainer_parts, monkeypatch):
    policy, reference, value, reward, query_ids, query_mask = trainer_parts
    trainer = make_trainer(bpe_tokenizer, policy, reference, value, reward)
    assert bpe_tokenizer.pad_token_id != bpe_tokenizer.eos_token_id
    recorded = {}
    sample = rollout_module.sample_responses

    def recording_sample(model, ids, mask, **kwargs):
        recorded.update(kwargs, query_ids=ids, temperature=kwargs["sampling"].temperature)
        return sample(model, ids, mask, **kwargs)

    monkeypatch.setattr(rollout_module, "sample_responses", recording_sample)
    torch.manual_seed(0)
    experience = trainer.rollout(query_ids, query_mask)
    assert recorded["temperature"] == 0.7 and recorded["max_new_tokens"] == 6
    assert recorded["sampling"].top_k == 0 and recorded["sampling"].top_p == 1.0  # no processor: logprobs match
    assert recorded["query_ids"][:, 0].eq(bpe_tokenizer.pad_token_id).any()  # queries are left-padded
    # The training forward (through the prepared model, temperature-scaled logits, the whole
    # padded batch at once) reproduces the rollout's logprobs, which were computed in
    # length-sorted micro-batches cut to their own width: the first PPO ratio is exactly 1, and
    # the reference agrees before any update.
    logits, values = trainer.model(experience.sequence_ids, experience.attention_mask, 6)
    recomputed = logprobs_from_logits(logits, experience.response_ids, 0.7)
    mask = experience.response_mask.bool()
    torch.testing.assert_close(recomputed[mask], experience.logprobs[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(experience.ref_logprobs[mask], experience.logprobs[mask], atol=1e-5, rtol=1e-5)
    assert experience.kl[mask].abs().max() < 1e-5
    torch.testing.assert_close(values[mask], experience.values[mask], atol=1e-5, rtol=1e-5)


def test_the_reward_scores_the_truncated_response_and_lands_on_eos(bpe_tokenizer, trainer_parts):
    policy, reference, value, reward, query_ids, query_mask = trainer_parts
    # Make EOS likely so some responses stop early.
    with torch.no_grad():
        policy.lm_head.weight[bpe_tokenizer.eos_token_id] += 0.5 * policy.model.embed_tokens.weight.mean(0)
        policy.lm_head.bias = None
    trainer = make_trainer(bpe_tokenizer, policy, reference, value, reward, kl_coef=0.0, normalize_scores=False,
                           missing_eos_penalty="none", whiten_advantages=False)
    for seed in range(20):  # the first seeded rollout with responses both with and without an EOS
        torch.manual_seed(seed)
        reward.rows.clear()
        experience = trainer.rollout(query_ids, query_mask)
        if experience.has_eos.any() and not experience.has_eos.all():
            break
    assert experience.has_eos.any() and not experience.has_eos.all()
    assert len(reward.rows) == len(experience)
    for row in range(len(experience)):
        query = experience.query_ids[row][experience.query_mask[row].bool()].tolist()
        response = experience.response_ids[row][experience.response_mask[row].bool()].tolist()
        # Scored in a length-sorted micro-batch, but the score came back to its own row.
        assert (query, response) in reward.rows
        if experience.has_eos[row]:
            assert response[-1] == bpe_tokenizer.eos_token_id  # scored up to and including the EOS
            eos_position = experience.last_index[row].item()
            assert experience.response_ids[row, eos_position] == bpe_tokenizer.eos_token_id
            assert (experience.response_ids[row, eos_position + 1 :] == bpe_tokenizer.pad_token_id).all()
        # The score sits on the last real response token, nowhere else.
        expected = torch.zeros(6)
        expected[experience.last_index[row]] = RecordingReward.score_of(query, response)
        torch.testing.assert_close(experience.rewards[row], expected)


def test_micro_batches_drop_only_columns_that_are_padding_in_every_row(bpe_tokenizer, trainer_parts):
    *_, query_ids, query_mask = trainer_parts
    response_mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]])
    rows = torch.tensor([0, 2])
    query_columns, response_columns = real_columns(query_mask[rows], response_mask[rows])
    kept = query_mask[rows, query_columns]
    assert kept.any(0).all() and kept.sum() == query_mask[rows].sum()  # every real token kept, no all-pad column
    assert response_columns == slice(0, 2)
    # Longest sequences first, every row exactly once.
    batches = length_sorted_micro_batches(query_mask, response_mask, 3)
    lengths = (query_mask.sum(1) + response_mask.sum(1)).tolist()
    order = torch.cat(batches).tolist()
    assert sorted(order) == [0, 1, 2, 3] and [len(b) for b in batches] == [3, 1]
    assert [lengths[i] for i in order] == sorted(lengths, reverse=True)


def test_the_update_on_cut_micro_batches_matches_the_update_on_the_whole_padded_batch(bpe_tokenizer, trainer_parts):
    """Cutting padding columns is an optimisation only: the same gradients as the full-width pass."""
    policy, reference, value, reward, query_ids, query_mask = trainer_parts
    trainer = make_trainer(bpe_tokenizer, policy, reference, value, reward)
    torch.manual_seed(0)
    short = trainer.rollout(query_ids, query_mask).select(torch.tensor([0, 2, 3]))  # without the longest prompt
    cut = short.without_padding_columns()
    assert cut.sequence_ids.shape[1] < short.sequence_ids.shape[1]  # the micro-batch had columns to drop
    gradients = []
    for batch in (short, cut):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss, _ = trainer.micro_loss(batch)
        loss.backward()
        gradients.append({name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None})
        assert len(gradients[-1]) > 0
    for name, gradient in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], gradient, atol=1e-6, rtol=1e-4)


def test_missing_eos_is_penalised_as_configured(bpe_tokenizer, trainer_parts):
    policy, reference, value, reward, *_ = trainer_parts
    raw, has_eos = torch.tensor([3.0, 3.0]), torch.tensor([True, False])
    for penalty, expected in (("subtract", [1.0, -1.0]), ("replace", [1.0, -5.0]), ("none", [1.0, 1.0])):
        trainer = make_trainer(bpe_tokenizer, policy, reference, value, reward, missing_eos_penalty=penalty,
                               missing_eos_value=2.0 if penalty == "subtract" else -5.0)
        trainer.maker.score_mean, trainer.maker.score_std = 1.0, 2.0
        assert trainer.maker.normalise(raw, has_eos).tolist() == expected
    clipped = make_trainer(bpe_tokenizer, policy, reference, value, reward, score_clip=0.5, missing_eos_penalty="none")
    assert clipped.maker.normalise(torch.tensor([3.0, -3.0]), torch.tensor([True, True])).tolist() == [0.5, -0.5]


def test_dropout_is_off_in_every_model(bpe_tokenizer):
    model = tiny_causal_lm(bpe_tokenizer, attention_dropout=0.5)
    model.train()
    ids = torch.tensor([[11, 12, 13, 14]])
    assert not torch.equal(model(ids).logits, model(ids).logits)
    disable_dropout(model)
    assert model.config.attention_dropout == 0.0
    assert torch.equal(model(ids).logits, model(ids).logits)


def test_metrics_ignore_padding(bpe_tokenizer, trainer_parts):
    policy, reference, value, reward, *_ = trainer_parts
    trainer = make_trainer(bpe_tokenizer, policy, reference, value, reward, kl_coef=0.5)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    garbage = torch.where(mask.bool(), torch.zeros(2, 4), torch.full((2, 4), 1e6))
    experience = Experience(
        query_ids=torch.zeros(2, 1, dtype=torch.long), query_mask=torch.ones(2, 1, dtype=torch.long),
        response_ids=torch.zeros(2, 4, dtype=torch.long), response_mask=mask,
        logprobs=garbage - torch.tensor([[1.0, 1.0, 0, 0], [0.5, 0.5, 0.5, 0.5]]), ref_logprobs=garbage,
        values=garbage, raw_scores=torch.tensor([1.0, 3.0]), scores=torch.tensor([0.0, 2.0]),
        has_eos=torch.tensor([True, False]), last_index=torch.tensor([1, 3]),
        kl=torch.tensor([[0.2, 0.2, 0, 0], [0.1, 0.1, 0.1, 0.1]]), rewards=garbage, advantages=garbage, returns=garbage,
    )
    metrics = trainer.rollout_metrics(experience)
    assert metrics["objective/kl"] == pytest.approx(0.4)  # (0.4 + 0.4) / 2
    assert metrics["objective/entropy"] == pytest.approx(2.0)  # -logprob sums: 2 and 2
    assert metrics["objective/rlhf_reward"] == pytest.approx(((0 - 0.2) + (2 - 0.2)) / 2)
    assert metrics["val/response_length"] == 3.0 and metrics["val/num_eos"] == 1


def test_update_uses_separate_learning_rates_and_reports_the_expected_metrics(bpe_tokenizer, trainer_parts):
    policy, reference, value, reward, query_ids, query_mask = trainer_parts
    trainer = make_trainer(bpe_tokenizer, policy, reference, value, reward, ppo_epochs=2)
    assert [group["lr"] for group in trainer.optimizer.param_groups] == [1e-3, 5e-3]
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    metrics, _ = trainer.step(query_ids, query_mask)
    expected = {
        "objective/kl", "objective/entropy", "objective/scores", "objective/rlhf_reward", "policy/approxkl",
        "policy/clipfrac", "loss/policy", "loss/value", "val/clipfrac", "policy/ratio", "val/num_eos", "lr", "episode",
        "time/rollout", "time/update", "throughput/episodes_per_second", "throughput/generated_tokens_per_second",
    }
    assert expected <= set(metrics)
    assert metrics["episode"] == 4
    assert any(not torch.equal(before[name], p) for name, p in policy.named_parameters())
    # Linear decay: 2 epochs x 2 minibatches = 4 of the 10 scheduled updates done.
    assert metrics["lr"] == pytest.approx(1e-3 * (1 - 4 / 10))


def test_length_correction_takes_the_reward_models_length_trend_out_of_the_score(bpe_tokenizer, trainer_parts):
    policy, reference, value, reward, *_ = trainer_parts
    raw, has_eos, lengths = torch.tensor([3.0, 3.0, 3.0]), torch.tensor([True, True, True]), torch.tensor([10, 20, 30])
    plain = RLTrainer(policy, reference, value, reward, bpe_tokenizer, ppo_settings(normalize_scores=False),
                      Accelerator(cpu=True), total_updates=10, length_trend=(-0.1, 20.0))  # the trend is known, the correction off
    assert plain.maker.normalise(raw, has_eos, lengths).tolist() == [3.0, 3.0, 3.0]
    corrected = RLTrainer(policy, reference, value, reward, bpe_tokenizer,
                          ppo_settings(normalize_scores=False, length_correction=True), Accelerator(cpu=True),
                          total_updates=10, length_trend=(-0.1, 20.0))
    # A model that pays 0.1 per token for brevity: the shorter reply loses that pay, the longer one gets it back,
    # and a reply of the held-out mean length keeps its score.
    assert corrected.maker.normalise(raw, has_eos, lengths).tolist() == pytest.approx([2.0, 3.0, 4.0])


def test_the_entropy_bonus_enters_the_policy_loss(bpe_tokenizer, trainer_parts):
    policy, reference, value, reward, query_ids, query_mask = trainer_parts
    torch.manual_seed(0)
    plain = make_trainer(bpe_tokenizer, policy, reference, value, reward)
    experience = plain.rollout(query_ids, query_mask)
    loss, stats = plain.micro_loss(experience)
    bonus = make_trainer(bpe_tokenizer, copy.deepcopy(policy), copy.deepcopy(reference), copy.deepcopy(value), reward,
                         entropy_coef=0.5)
    with_bonus, _ = bonus.micro_loss(experience)
    assert with_bonus.item() == pytest.approx(loss.item() - 0.5 * stats["policy/entropy"].item(), rel=1e-5)
