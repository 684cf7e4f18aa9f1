"""PPO prompts: conversations cut before their final reply, rendered with the generation prompt."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from data.conversations import prompt_of
from data.splits import held_out_split
from pipeline.config import PPOConfig
from pipeline.errors import DataError
from data.padding import pad_batch
from stages.sft.dataset import load_conversations


def load_prompts(
    section: PPOConfig, tokenizer: PreTrainedTokenizerBase, cache_dir: Path | None, seed: int
) -> tuple[list[list[int]], list[list[int]], dict[str, int]]:
    """(train, held-out) prompts as token ids ending in the assistant turn opener, and counts."""
    conversations, rows = load_conversations(section.prompts, section, cache_dir, config_section="ppo")
    prompts, too_long = [], 0
    for conversation in conversations:
        ids = tokenizer.apply_chat_template(prompt_of(conversation), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        if len(ids) > section.max_prompt_length:
            too_long += 1
            continue
        prompts.append(list(ids))
    if len(prompts) < 2:
        raise DataError(
            f"{section.prompts.path or section.prompts.hub}: only {len(prompts)} prompt(s) fit in "
            f"ppo.max_prompt_length={section.max_prompt_length} tokens; raise it"
        )
    train, held_out = held_out_split(prompts, section.validation_fraction, seed, what="prompts")
    counts = {"rows_read": rows.total, "rows_dropped": rows.dropped, "prompts_too_long": too_long,
              "train_prompts": len(train), "validation_prompts": len(held_out)}
    return train, held_out, counts


def left_padded(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries left-padded, so every response starts in the same column."""
    return pad_batch(prompts, pad_token_id, side="left")
