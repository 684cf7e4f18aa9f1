import pytest
import torch

from stages.eval.metrics import length_stats, win_rate


def test_win_rate_counts_ties_as_half():
    assert win_rate(torch.tensor([2.0, 1.0, 0.5, 3.0]), torch.tensor([1.0, 1.0, 0.7, 3.0])) == pytest.approx((1 + 0.5 + 0 + 0.5) / 4)
    assert win_rate(torch.tensor([1.0]), torch.tensor([0.0])) == 1.0


def test_length_stats():
    stats = length_stats(torch.tensor([1, 2, 3, 4, 10]))
    assert stats["length_mean"] == 4.0 and stats["length_median"] == 3.0
    assert stats["length_p90"] == pytest.approx(7.6)
