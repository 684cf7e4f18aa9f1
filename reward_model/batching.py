"""Preference groups as token ids, and batches of whole groups for the ranking loss (and DPO's)."""

from __future__ import annotations

from dataclasses import dataclass, field
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
    reply_lengths: list[int] = field(default_factory=list)  # tokens after the prompt the completions share, before any cut
    weights: list[float] | None = None  # per pair; None: every pair weighs 1
    reference_logps: list[float] | None = None  # per completion, its reply's log-probability under DPO's reference


def shared_prefix_length(sequences: list[list[int]]) -> int:
    """How many leading tokens every sequence has in common."""
    shortest = min(len(sequence) for sequence in sequences)
    for position in range(shortest):
        token = sequences[0][position]
        if any(sequence[position] != token for sequence in sequences[1:]):
            return position
    return shortest


def encode_groups(
    groups: list[PreferenceGroup], tokenizer: PreTrainedTokenizerBase, max_length: int, cache_dir: Path | None = None
) -> list[EncodedGroup]:
    """Every completion as `conversation_ids` gives it, rendered on all cores (and kept in `cache_dir`)."""
    completions = [completion for group in groups for completion in group.completions]
    rendered = iter(chat_ids(tokenizer, completions, cache_dir=cache_dir))
    encoded = []
    for group in groups:
        whole = [scored_ids(next(rendered)[0], tokenizer.eos_token_id) for _ in group.completions]
        prefix = shared_prefix_length(whole)
        encoded.append(EncodedGroup(
            completion_ids=[ids[-max_length:] for ids in whole],
            pairs=list(group.pairs),
            margins=list(group.margins),
            reply_lengths=[len(ids) - prefix for ids in whole],
        ))
    return encoded


def length_balancing_weights(groups: list[EncodedGroup]) -> list[EncodedGroup]:
    """The groups with pair weights that make reply length carry no preference signal on its own.

    Pairs whose better reply is the shorter one and pairs whose better reply is the longer one each
    get half the total weight (pairs of equal length keep weight 1), so a model that scores by
    length alone does no better than chance on the weighted loss: what it learns, it learns from
    content. (The usual imbalance in harmless-style data: the shorter reply wins about 56-60% of pairs.)
    """
    def kind(group: EncodedGroup, better: int, worse: int) -> int:
        difference = group.reply_lengths[better] - group.reply_lengths[worse]
        return (difference > 0) - (difference < 0)  # 1: the longer won, -1: the shorter won, 0: a tie

    counts = {-1: 0, 0: 0, 1: 0}
    for group in groups:
        for better, worse in group.pairs:
            counts[kind(group, better, worse)] += 1
    decided = counts[-1] + counts[1]
    weight = {
        0: 1.0,
        -1: decided / (2 * counts[-1]) if counts[-1] else 1.0,
        1: decided / (2 * counts[1]) if counts[1] else 1.0,
    }
    return [
        EncodedGroup(group.completion_ids, group.pairs, group.margins, group.reply_lengths,
                     [weight[kind(group, better, worse)] for better, worse in group.pairs])
        for group in groups
    ]


def collate_groups(groups: list[EncodedGroup], pad_token_id: int, extra_margin: float = 0.0) -> dict[str, torch.Tensor]:
    """Every completion of every group in one right-padded batch, with pair indices into it.

    Returns input_ids / attention_mask (n_completions, width); better / worse / pair_group / margins / length_gap (the better reply's length minus the worse
    one's), each (n_pairs,); n_groups; `weights` (n_pairs,) when the groups carry pair weights;
    `reply_lengths` (n_completions,) when they carry reply lengths (encode_groups' do); and
    `reference_logps` (n_completions,) when they carry reference log-probs (DPO).
    """
    sequences, better, worse, pair_group, margins, weights, length_gap = [], [], [], [], [], [], []
    for index, group in enumerate(groups):
        offset = len(sequences)
        sequences.extend(group.completion_ids)
        for pair, ((first, second), margin) in enumerate(zip(group.pairs, group.margins)):
            better.append(offset + first)
            worse.append(offset + second)
            pair_group.append(index)
            margins.append(margin + extra_margin)
            weights.append(group.weights[pair] if group.weights is not None else 1.0)
            lengths = group.reply_lengths
            length_gap.append(lengths[first] - lengths[second] if lengths else 0)
    input_ids, attention_mask = pad_batch(sequences, pad_token_id, side="right")
    batch = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "better": torch.tensor(better, dtype=torch.long),
        "worse": torch.tensor(worse, dtype=torch.long),
        "pair_group": torch.tensor(pair_group, dtype=torch.long),
        "margins": torch.tensor(margins, dtype=torch.float32),
        "length_gap": torch.tensor(length_gap, dtype=torch.long),  # better's reply length minus worse's
        "n_groups": len(groups),
    }
    if any(group.weights is not None for group in groups):
        batch["weights"] = torch.tensor(weights, dtype=torch.float32)
    if all(len(group.reply_lengths) == len(group.completion_ids) for group in groups):
        batch["reply_lengths"] = torch.tensor([length for group in groups for length in group.reply_lengths], dtype=torch.long)
    if any(group.reference_logps is not None for group in groups):
        batch["reference_logps"] = torch.tensor([value for group in groups for value in group.reference_logps], dtype=torch.float32)
    return batch
