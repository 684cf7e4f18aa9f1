import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from data.padding import pad_batch
from reward_model.model import build_reward_model, per_token_scores
from reward_model.scoring import at_last_token, conversation_ids, last_token_index

PAD = 0


def test_last_token_index_for_left_and_right_padding():
    right = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 0, 1], [1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 0, 3]
    assert last_token_index(left).tolist() == [3, 3, 3]


def sequence_scores(model, input_ids, attention_mask):
    """One reward per sequence, as the stages read it: the head's output at the last real token."""
    return at_last_token(per_token_scores(model, input_ids, attention_mask), attention_mask)


def tiny_reward_model(tmp_path, vocab_size=50):
    config = AutoConfig.for_model(
        "llama", vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    return build_reward_model(tmp_path, pad_token_id=PAD).eval()


def test_scores_are_the_same_under_left_and_right_padding(tmp_path):
    model = tiny_reward_model(tmp_path)
    sequences = [[3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    alone = torch.stack([
        sequence_scores(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in sequences
    ])
    for side in ("left", "right"):
        ids, mask = pad_batch(sequences, PAD, side=side)
        torch.testing.assert_close(sequence_scores(model, ids, mask), alone, atol=1e-5, rtol=1e-4)
    # And the reward is the head's output at the last real token, not at padding.
    ids, mask = pad_batch(sequences, PAD, side="right")
    per_token = per_token_scores(model, ids, mask)
    assert per_token.shape == ids.shape
    torch.testing.assert_close(per_token[1, 1], alone[1], atol=1e-5, rtol=1e-4)


def test_reward_model_starts_from_the_causal_lm_backbone(tmp_path):
    model = tiny_reward_model(tmp_path)
    language_model = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name, tensor in language_model.model.state_dict().items():
        assert torch.equal(model.model.state_dict()[name], tensor)
    assert model.score.weight.shape == (1, 32)


def test_scorer_reads_conversations_ending_at_eos(bpe_tokenizer, tmp_path):
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    ids = conversation_ids(bpe_tokenizer, conversation)
    assert ids[-1] == bpe_tokenizer.eos_token_id
    assert bpe_tokenizer.decode(ids).endswith("Hello there.<|im_end|>")
    model = tiny_reward_model(tmp_path, vocab_size=len(bpe_tokenizer))
    model.config.pad_token_id = bpe_tokenizer.pad_token_id
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "No."}]
    ids, mask = pad_batch([conversation_ids(bpe_tokenizer, c) for c in (conversation, other, conversation)], bpe_tokenizer.pad_token_id)
    batch = sequence_scores(model, ids, mask)
    assert batch.shape == (3,) and batch[0] == batch[2]
    ids, mask = pad_batch([conversation_ids(bpe_tokenizer, other)], bpe_tokenizer.pad_token_id)
    single = sequence_scores(model, ids, mask)
    torch.testing.assert_close(single[0], batch[1], atol=1e-5, rtol=1e-4)


class ConstantScorer(torch.nn.Module):
    """A stand-in reward model: the same score at every position of a row, one score per row."""

    def __init__(self, scores):
        super().__init__()
        self.scores = torch.tensor(scores)

    def forward(self, input_ids, attention_mask):
        return self.scores[:, None].expand(input_ids.shape).float()


def test_the_conservative_reward_is_the_members_mean_less_their_disagreement():
    from reward_model.functions import conservative_reward_function
    from reward_model.statistics import ScoreStatistics

    # Member a: raw [1, 3] with mean 1, std 2 -> standardised [0, 1]; member b: raw [3, 3], mean 1, std 1 -> [2, 2].
    members = [ConstantScorer([1.0, 3.0]), ConstantScorer([3.0, 3.0])]
    statistics = [ScoreStatistics(mean=1.0, std=2.0), ScoreStatistics(mean=1.0, std=1.0)]
    ids, mask = torch.ones(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)
    plain = conservative_reward_function(members, statistics, penalty=0.0)(ids[:, :1], mask[:, :1], ids[:, 1:], mask[:, 1:])
    # Mean [1, 1.5] in member a's units: 1 + 2 * [1, 1.5].
    assert plain.tolist() == pytest.approx([3.0, 4.0])
    conservative = conservative_reward_function(members, statistics, penalty=1.0)(ids[:, :1], mask[:, :1], ids[:, 1:], mask[:, 1:])
    # Less one (population) standard deviation, [1, 0.5]: [0, 1] -> 1 + 2 * [0, 1].
    assert conservative.tolist() == pytest.approx([1.0, 3.0])
