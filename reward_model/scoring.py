"""Where a reward is read: a conversation's token ids end at its final EOS, and the score is the
reward model's output at the last real token.

The reward stage, PPO's rewards and eval all read scores this way, so the reward sits on the same
token in training, in RL and in evaluation.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token: (batch,), for left or right padding alike."""
    positions = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def at_last_token(per_token: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(batch, seq_len) values -> (batch,) values at each row's last real token."""
    return per_token.gather(-1, last_token_index(attention_mask).unsqueeze(-1)).squeeze(-1)


def conversation_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int | None = None) -> list[int]:
    """Token ids of a conversation ending exactly at the final reply's EOS.

    The chat template follows each turn's EOS with a newline; cutting it off makes a scored
    conversation end like a PPO response does (query + reply + EOS), so the reward is read at
    the same token in training and in RL. Over `max_length`, the oldest context goes first.
    """
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    return scored_ids(ids, tokenizer.eos_token_id, max_length)


def scored_ids(ids: list[int], eos: int, max_length: int | None = None) -> list[int]:
    """A rendered conversation's ids cut after the final EOS and to its last `max_length` tokens."""
    if eos in ids:
        ids = ids[: len(ids) - ids[::-1].index(eos)]
    if max_length is not None:
        ids = ids[-max_length:]
    return ids
