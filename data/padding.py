"""Padding token-id lists into a batch: the one place every stage turns ragged rows into tensors.

    input_ids, attention_mask = pad_batch([[4, 5, 6], [7]], pad_token_id=0, side="left")
    # input_ids [[4, 5, 6], [0, 0, 7]], attention_mask [[1, 1, 1], [0, 0, 1]]

Generation pads on the left, so every prompt ends where its continuation starts; scoring and
training pad on the right. Positions are derived from the attention mask elsewhere, so either side
gives the same result.
"""

from __future__ import annotations

import torch


def pad_batch(sequences: list[list[int]], pad_token_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids, attention_mask), both (batch, longest), padded on `side`."""
    width = max(len(ids) for ids in sequences)
    input_ids = torch.full((len(sequences), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        if side == "right":
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        else:
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention_mask[row, width - len(ids) :] = 1
    return input_ids, attention_mask
