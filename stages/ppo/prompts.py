"""PPO prompts: conversations cut before their final reply, rendered with the generation prompt."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from data.chat_tokens import load_conversations, query_ids
from data.padding import pad_batch
from data.splits import held_out_split
from pipeline.config import PPOData
from pipeline.errors import DataError


@dataclass
class PromptSplit:
    """PPO's prompts as token ids ending in the assistant turn opener, split once, with counts."""

    train: list[list[int]]
    held_out: list[list[int]]
    held_out_conversations: list[list[dict]]  # what held_out was rendered from, for eval
    counts: dict[str, int]


def load_prompts(
    data: PPOData, tokenizer: PreTrainedTokenizerBase, cache_dir: Path | None, seed: int, token_cache: Path | None = None
) -> PromptSplit:
    """The configured conversations that fit ppo.data.max_prompt_length, split into train and held-out prompts.

    Rendered on all cores, and kept in `token_cache` when given (see data.chat_tokens.chat_ids).
    """
    conversations, rows = load_conversations(data.prompts, data, cache_dir, config_section="ppo.data")
    fitting, too_long = [], 0
    for conversation, ids in zip(conversations, query_ids(tokenizer, conversations, token_cache)):
        if len(ids) > data.max_prompt_length:
            too_long += 1
            continue
        fitting.append((conversation, ids))
    if len(fitting) < 2:
        raise DataError(
            f"{data.prompts.path or data.prompts.hub}: only {len(fitting)} prompt(s) fit in "
            f"ppo.data.max_prompt_length={data.max_prompt_length} tokens; raise it"
        )
    train, held_out = held_out_split(fitting, data.validation_fraction, seed, what="prompts")
    counts = {"rows_read": rows.total, "rows_dropped": rows.dropped, "prompts_too_long": too_long,
              "train_prompts": len(train), "validation_prompts": len(held_out)}
    return PromptSplit([ids for _, ids in train], [ids for _, ids in held_out], [c for c, _ in held_out], counts)


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries left-padded, so every response starts in the same column."""
    return pad_batch(prompts, pad_token_id, side="left")
