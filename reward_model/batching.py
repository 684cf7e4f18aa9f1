"""Preference groups as token ids, and batches of whole groups for the ranking loss."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from data.chat_tokens import chat_ids
from data.padding import pad_batch
from data.preferences import PreferenceGroup
from reward_model.scoring import scored_ids


@dataclass
class EncodedGroup:
    """One prompt's completions as token ids (each ending at its reply's EOS), and its pairs."""

    completion_ids: list[list[int]]
    pairs: list[tuple[int, int]]
    margins: list[float]


def encode_groups(
    groups: list[PreferenceGroup], tokenizer: PreTrainedTokenizerBase, max_length: int, cache_dir: Path | None = None
) -> list[EncodedGroup]:
    """Every completion as `conversation_ids` gives it, rendered on all cores (and kept in `cache_dir`)."""
    completions = [completion for group in groups for completion in group.completions]
    rendered = iter(chat_ids(tokenizer, completions, cache_dir=cache_dir))
    return [
        EncodedGroup(
            completion_ids=[scored_ids(next(rendered)[0], tokenizer.eos_token_id, max_length) for _ in group.completions],
            pairs=list(group.pairs),
            margins=list(group.margins),
        )
        for group in groups
    ]


def collate_groups(groups: list[EncodedGroup], pad_token_id: int, extra_margin: float = 0.0) -> dict[str, torch.Tensor]:
    """Every completion of every group in one right-padded batch, with pair indices into it.

    Returns input_ids / attention_mask (n_completions, width), better / worse / pair_group /
    margins (n_pairs,), and n_groups.
    """
    sequences, better, worse, pair_group, margins = [], [], [], [], []
    for index, group in enumerate(groups):
        offset = len(sequences)
        sequences.extend(group.completion_ids)
        for (first, second), margin in zip(group.pairs, group.margins):
            better.append(offset + first)
            worse.append(offset + second)
            pair_group.append(index)
            margins.append(margin + extra_margin)
    input_ids, attention_mask = pad_batch(sequences, pad_token_id, side="right")
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "better": torch.tensor(better, dtype=torch.long),
        "worse": torch.tensor(worse, dtype=torch.long),
        "pair_group": torch.tensor(pair_group, dtype=torch.long),
        "margins": torch.tensor(margins, dtype=torch.float32),
        "n_groups": len(groups),
    }
