"""The pretraining corpus as packed (train, validation) token blocks, tokenized once per run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from data.packing import cached_blocks, pack_documents, split_blocks
from data.sources import load_texts
from pipeline.config import PretrainConfig
from pipeline.errors import DataError
from pipeline.orchestration.manifest import hash_file


def prepare_blocks(
    section: PretrainConfig, tokenizer: PreTrainedTokenizerBase, tokenizer_dir: Path, cache_root: Path
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) int32 blocks of `section.block_size` tokens, from the cache when present."""
    source = section.data
    key = {
        "data": source.model_dump(),
        "files": {name: hash_file(Path(name)) for name in source.files()} if source.path else None,
        "tokenizer": hash_file(tokenizer_dir / "tokenizer.json") if (tokenizer_dir / "tokenizer.json").exists() else str(tokenizer_dir),
        "block_size": section.block_size,
        "validation_fraction": section.validation_fraction,
    }

    def build() -> tuple[np.ndarray, np.ndarray]:
        texts = load_texts(source, cache_dir=cache_root.parent / "datasets")
        tokenized = texts.map(
            lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
            batched=True,
            remove_columns=["text"],
            desc="tokenizing",
        )
        blocks = pack_documents(tokenized["input_ids"], tokenizer.eos_token_id, section.block_size)
        origin = source.hub or source.path
        try:
            return split_blocks(blocks, section.validation_fraction)
        except ValueError as error:
            raise DataError(f"{origin}: {error}; add text or lower pretrain.block_size") from None

    return cached_blocks(cache_root, key, build)
