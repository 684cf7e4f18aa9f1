"""Score conversations (or token ids) with a reward model: one number per conversation."""

from __future__ import annotations

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from reward_model.model import per_token_scores


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token: (batch,), for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def at_last_token(per_token: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq_len) values -> (batch,) values at each row's last real token."""
    return per_token.gather(-1, last_token_index(attention_mask).unsqueeze(-1)).squeeze(-1)


def sequence_scores(model: PreTrainedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """One reward per sequence, read at its last real token: (batch,)."""
    return at_last_token(per_token_scores(model, input_ids, attention_mask), attention_mask)


class RewardScorer:
    """Batched scoring API for the PPO stage and evaluation.

        scorer = RewardScorer(model, tokenizer)
        scorer.score_messages([[{"role": "user", ...}, {"role": "assistant", ...}], ...])  # (batch,)
    """

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int = 16, max_length: int | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def score_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        return sequence_scores(self.model, input_ids.to(self.model.device), attention_mask.to(self.model.device))

    def encode(self, conversations: list[list[dict]]) -> list[list[int]]:
        return [conversation_ids(self.tokenizer, messages, self.max_length) for messages in conversations]

    def score_messages(self, conversations: list[list[dict]]) -> torch.Tensor:
        """One score per conversation (each ending in the assistant reply to judge): (batch,) on CPU."""
        scores = []
        encoded = self.encode(conversations)
        for start in range(0, len(encoded), self.batch_size):
            input_ids, attention_mask = pad_batch(encoded[start : start + self.batch_size], self.tokenizer.pad_token_id)
            scores.append(self.score_ids(input_ids, attention_mask).cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def conversation_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int | None = None) -> list[int]:
    """Token ids of a conversation ending exactly at the final reply's EOS.

    The chat template follows each turn's EOS with a newline; cutting it off makes a scored
    conversation end like a PPO response does (query + reply + EOS), so the reward is read at
    the same token in training and in RL. Over `max_length`, the oldest context goes first.
    """
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    eos = tokenizer.eos_token_id
    if eos in ids:
        ids = ids[: len(ids) - ids[::-1].index(eos)]
    if max_length is not None:
        ids = ids[-max_length:]
    return ids


def pad_batch(sequences: list[list[int]], pad_token_id: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id lists -> (input_ids, attention_mask), padded on `side`."""
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
