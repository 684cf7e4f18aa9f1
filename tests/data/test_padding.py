"""Padding token-id lists into a batch, on either side."""

import torch

from data.padding import pad_batch

PAD = 0


def test_pad_batch_sides():
    ids, mask = pad_batch([[4, 5, 6], [7]], PAD, side="left")
    assert ids.tolist() == [[4, 5, 6], [0, 0, 7]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    ids, mask = pad_batch([[4, 5, 6], [7]], PAD, side="right")
    assert ids.tolist() == [[4, 5, 6], [7, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]


def test_pad_batch_is_right_padded_long_tensors_by_default():
    ids, mask = pad_batch([[9], [9, 8]], pad_token_id=3)
    assert ids.dtype == mask.dtype == torch.long
    assert ids.tolist() == [[9, 3], [9, 8]] and mask.tolist() == [[1, 0], [1, 1]]
