"""Tokenize a text corpus once and pack it into fixed-length blocks for pretraining.

Documents are joined end to end, each followed by EOS, and cut into blocks of `block_size`
tokens: no padding, so every token in a batch trains. The trailing partial block is dropped. The
last `validation_fraction` of blocks is held out (a contiguous tail, so no validation text also
appears in training). The packed arrays are cached in the run dir under a key made of the corpus,
the tokenizer and the packing settings, so a resumed or repeated stage skips tokenization.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from pipeline.config import config_hash


def pack_documents(documents: Iterable[list[int]], eos_id: int, block_size: int) -> np.ndarray:
    """Token-id lists -> (n_blocks, block_size) int32 array; each document ends with `eos_id`."""
    pieces = []
    for ids in documents:
        if len(ids) == 0:
            continue
        pieces.append(np.asarray(ids, dtype=np.int32))
        pieces.append(np.asarray([eos_id], dtype=np.int32))
    if not pieces:
        return np.zeros((0, block_size), dtype=np.int32)
    stream = np.concatenate(pieces)
    n_blocks = len(stream) // block_size
    return stream[: n_blocks * block_size].reshape(n_blocks, block_size)


def split_blocks(blocks: np.ndarray, validation_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation): validation is the last ceil(fraction * n) blocks, at least one."""
    if len(blocks) < 2:
        raise ValueError(f"only {len(blocks)} block(s) of text: need at least 2 (one to train, one to validate)")
    n_validation = min(len(blocks) - 1, max(1, int(np.ceil(validation_fraction * len(blocks)))))
    return blocks[:-n_validation], blocks[-n_validation:]


def block_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of training blocks in one epoch: the same for every process and every resume."""
    return np.random.default_rng([seed, epoch]).permutation(n_blocks)


def batch_indices(position: int, count: int, n_blocks: int, seed: int) -> np.ndarray:
    """Indices of the `count` blocks starting at `position` in the endless stream of shuffled epochs."""
    indices = np.empty(count, dtype=np.int64)
    orders: dict[int, np.ndarray] = {}
    for i in range(count):
        epoch, offset = divmod(position + i, n_blocks)
        if epoch not in orders:
            orders[epoch] = block_order(n_blocks, seed, epoch)
        indices[i] = orders[epoch][offset]
    return indices


def cached_blocks(
    cache_root: Path,
    key_parts: dict,
    build: "callable",
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) blocks from `cache_root/<key>/`, or from `build()` then written there."""
    folder = Path(cache_root) / config_hash(key_parts)
    train_path, validation_path = folder / "train.npy", folder / "validation.npy"
    if train_path.exists() and validation_path.exists():
        return np.load(train_path, allow_pickle=False), np.load(validation_path, allow_pickle=False)
    train, validation = build()
    partial = folder.with_name(folder.name + ".tmp")
    partial.mkdir(parents=True, exist_ok=True)
    np.save(partial / "train.npy", train, allow_pickle=False)
    np.save(partial / "validation.npy", validation, allow_pickle=False)
    (partial / "key.json").write_text(json.dumps(key_parts, indent=2, default=str))
    partial.rename(folder)
    return train, validation
