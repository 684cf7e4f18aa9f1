"""Chat data as tokens: conversations -> token ids with an assistant mask, split into train and validation.

The mask is exactly the chat template's `{% generation %}` span (`return_assistant_tokens_mask`),
and overlong conversations follow the configured policy with counts. SFT trains on it (labels
are -100 everywhere but the assistant's tokens, stages/sft/batching.py); eval measures
perplexity on it; PPO reads its prompts through `load_conversations`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import datasets
from transformers import PreTrainedTokenizerBase

from data.conversations import RowReport, normalize_rows
from data.sources import load_source
from pipeline.config import BadRowPolicy, ConversationData
from pipeline.errors import DataError


@dataclass
class LengthReport:
    """What the `max_length` policy did."""

    total: int = 0
    truncated: int = 0
    dropped_overlong: int = 0
    dropped_no_reply_left: int = 0  # truncation cut away every assistant token
    lengths: list[int] = field(default_factory=list)

    def as_metrics(self, prefix: str) -> dict[str, int]:
        return {
            f"{prefix}_conversations": self.total - self.dropped_overlong - self.dropped_no_reply_left,
            f"{prefix}_truncated": self.truncated,
            f"{prefix}_dropped_overlong": self.dropped_overlong + self.dropped_no_reply_left,
        }


def load_conversations(
    source: ConversationData, section: BadRowPolicy, cache_dir: Path | None = None, config_section: str = "sft"
) -> tuple[list[list[dict]], RowReport]:
    """Normalised conversations from a source, with the bad-row policy applied."""
    rows = load_source(source, cache_dir=cache_dir)
    return normalize_rows(
        rows,
        fmt=source.conversation_format,
        columns=source.columns or None,
        on_bad_row=section.on_bad_row,
        max_bad_fraction=section.max_bad_fraction,
        source=source.hub or source.path,
        config_section=config_section,
    )


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input_ids, assistant_mask): mask is 1 on assistant reply tokens (end-of-turn included), else 0."""
    encoded = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(encoded["input_ids"]), list(encoded["assistant_masks"])


def tokenize_conversations(
    conversations: list[list[dict]], tokenizer: PreTrainedTokenizerBase, max_length: int, overlong: str
) -> tuple[datasets.Dataset, LengthReport]:
    """A dataset of `input_ids` and `assistant_masks`, with `max_length` enforced per `overlong`."""
    report = LengthReport(total=len(conversations))
    rows = {"input_ids": [], "assistant_masks": []}
    for messages in conversations:
        input_ids, mask = tokenize_conversation(tokenizer, messages)
        if not any(mask):
            raise DataError(
                "the tokenizer's chat template marks no assistant tokens (it has no {% generation %} markers), "
                "so SFT would train on nothing; rerun the tokenizer stage, which installs chatpipe's template"
            )
        if len(input_ids) > max_length:
            if overlong == "drop":
                report.dropped_overlong += 1
                continue
            input_ids, mask = input_ids[:max_length], mask[:max_length]
            if not any(mask):
                report.dropped_no_reply_left += 1
                continue
            report.truncated += 1
        rows["input_ids"].append(input_ids)
        rows["assistant_masks"].append(mask)
        report.lengths.append(len(input_ids))
    if not rows["input_ids"]:
        raise DataError(
            f"no conversation fits in sft.max_length={max_length} tokens with an assistant reply left; raise max_length"
        )
    return datasets.Dataset.from_dict(rows), report
