"""SFT micro-batches: conversations padded to the longest row, labels on assistant tokens only."""

from __future__ import annotations

import torch

IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips


def collate_conversations(rows: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """rows of `input_ids` and `assistant_masks` (lists) -> input_ids, attention_mask, labels: (batch, longest).

    Right padding. `labels` are the token ids where the assistant speaks and -100 elsewhere (the
    prompt, the other turns, padding), so the loss covers the assistant's replies only.
    `loss_tokens` counts the labels that predict something (the first token predicts nothing).
    """
    longest = max(len(row["input_ids"]) for row in rows)
    input_ids = torch.full((len(rows), longest), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
    for index, row in enumerate(rows):
        ids = torch.tensor(row["input_ids"], dtype=torch.long)
        mask = torch.tensor(row["assistant_masks"], dtype=torch.bool)
        input_ids[index, : len(ids)] = ids
        attention_mask[index, : len(ids)] = 1
        labels[index, : len(ids)] = torch.where(mask, ids, IGNORE_INDEX)
    loss_tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "loss_tokens": loss_tokens}
