"""Packing and data order for pretraining: concatenate-and-cut blocks, read in one seeded order.

Documents are joined end to end, each followed by EOS, and cut into blocks of `block_size`
tokens: no padding, so every token in a batch trains. The trailing partial block is dropped.
The pretrain stage reads its blocks from a token store (data/token_store.py), which packs the same
way on disk; `pack_documents` does it in memory, for benchmarks and tests. Every stage draws its
examples from the endless stream of shuffled epochs in `batch_indices`.
"""

from __future__ import annotations

import functools
from typing import Iterable

import numpy as np


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


@functools.lru_cache(maxsize=2)
def block_order(n_blocks: int, seed: int, epoch: int) -> np.ndarray:
    """The shuffled order of training blocks in one epoch: the same for every process and every resume.

    Kept for the epoch (read-only), not redrawn for every micro-batch: at a million blocks a
    permutation takes tens of milliseconds.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n_blocks)
    order.flags.writeable = False
    return order


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
