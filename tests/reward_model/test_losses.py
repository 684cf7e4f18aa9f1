import math

import pytest
import torch

from reward_model.batching import EncodedGroup, collate_groups, length_balancing_weights, shared_prefix_length
from reward_model.losses import centering_penalty, grouped_pairwise_loss


def nll(gap: float) -> float:
    return -math.log(1 / (1 + math.exp(-gap)))


def test_each_prompt_weighs_the_same_however_many_pairs_it_has():
    # Prompt 0: two completions, one pair. Prompt 1: three completions, three pairs.
    scores = torch.tensor([1.0, 0.0, 2.0, 1.0, -1.0])
    better = torch.tensor([0, 2, 2, 3])
    worse = torch.tensor([1, 3, 4, 4])
    group = torch.tensor([0, 1, 1, 1])
    loss = grouped_pairwise_loss(scores, better, worse, group, torch.zeros(4), n_groups=2)
    prompt_0 = nll(1.0)
    prompt_1 = (nll(1.0) + nll(3.0) + nll(2.0)) / 3
    assert loss.item() == pytest.approx((prompt_0 + prompt_1) / 2, rel=1e-6)
    # A pair-level mean would weigh prompt 1 three times as much: a different number.
    assert abs(loss.item() - (prompt_0 + 3 * prompt_1) / 4) > 1e-3


def test_margin_demands_a_wider_gap():
    scores = torch.tensor([1.0, 0.0])
    plain = grouped_pairwise_loss(scores, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([0.0]), 1)
    with_margin = grouped_pairwise_loss(scores, torch.tensor([0]), torch.tensor([1]), torch.tensor([0]), torch.tensor([0.5]), 1)
    assert plain.item() == pytest.approx(nll(1.0), rel=1e-6)
    assert with_margin.item() == pytest.approx(nll(0.5), rel=1e-6)


def test_centering_penalty_is_the_mean_square():
    assert centering_penalty(torch.tensor([1.0, -3.0])).item() == 5.0


def test_collate_puts_all_of_a_prompts_completions_in_one_batch():
    groups = [
        EncodedGroup(completion_ids=[[5, 6], [7]], pairs=[(0, 1)], margins=[0.0]),
        EncodedGroup(completion_ids=[[8], [9, 10, 11], [12]], pairs=[(1, 0), (1, 2), (0, 2)], margins=[0.0, 0.0, 1.0]),
    ]
    batch = collate_groups(groups, pad_token_id=0, extra_margin=0.25)
    assert batch["input_ids"].tolist() == [[5, 6, 0], [7, 0, 0], [8, 0, 0], [9, 10, 11], [12, 0, 0]]
    assert batch["attention_mask"].sum(-1).tolist() == [2, 1, 1, 3, 1]
    assert batch["better"].tolist() == [0, 3, 3, 2] and batch["worse"].tolist() == [1, 2, 4, 4]
    assert batch["pair_group"].tolist() == [0, 1, 1, 1] and batch["n_groups"] == 2
    assert batch["margins"].tolist() == [0.25, 0.25, 0.25, 1.25]


def test_pair_weights_scale_each_pair_within_its_prompts_mean():
    scores = torch.tensor([1.0, 0.0, 2.0, 1.0, -1.0])
    better, worse, group = torch.tensor([0, 2, 2, 3]), torch.tensor([1, 3, 4, 4]), torch.tensor([0, 1, 1, 1])
    weights = torch.tensor([2.0, 1.0, 0.5, 1.0])
    loss = grouped_pairwise_loss(scores, better, worse, group, torch.zeros(4), n_groups=2, weights=weights)
    prompt_0 = 2.0 * nll(1.0)
    prompt_1 = (nll(1.0) + 0.5 * nll(3.0) + nll(2.0)) / 3
    assert loss.item() == pytest.approx((prompt_0 + prompt_1) / 2, rel=1e-6)


def test_length_balancing_makes_length_alone_worth_nothing():
    # Three pairs won by the shorter reply, one by the longer, one tie in length.
    groups = [
        EncodedGroup([[1], [1, 2, 3]], [(0, 1)], [0.0], reply_lengths=[1, 3]),
        EncodedGroup([[1], [1, 2]], [(0, 1)], [0.0], reply_lengths=[1, 2]),
        EncodedGroup([[1, 2], [1, 2, 3]], [(0, 1)], [0.0], reply_lengths=[2, 3]),
        EncodedGroup([[1, 2, 3, 4], [1]], [(0, 1)], [0.0], reply_lengths=[4, 1]),
        EncodedGroup([[1, 2], [3, 4]], [(0, 1)], [0.0], reply_lengths=[2, 2]),
    ]
    weighted = length_balancing_weights(groups)
    weights = [group.weights[0] for group in weighted]
    assert weights == pytest.approx([4 / 6, 4 / 6, 4 / 6, 2.0, 1.0])
    # "The shorter reply wins" and "the longer reply wins" now carry the same total weight.
    assert sum(weights[:3]) == pytest.approx(weights[3])
    batch = collate_groups(weighted, pad_token_id=0)
    assert batch["weights"].tolist() == pytest.approx(weights)
    assert batch["length_gap"].tolist() == [-2, -1, -1, 3, 0]
    assert "weights" not in collate_groups(groups, pad_token_id=0)


def test_shared_prefix_length():
    assert shared_prefix_length([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    assert shared_prefix_length([[1, 2], [1, 2]]) == 2
    assert shared_prefix_length([[1], [2]]) == 0
