"""Held-out splits."""

from __future__ import annotations

import random
from typing import TypeVar

from pipeline.errors import DataError

Item = TypeVar("Item")


def held_out_split(items: list[Item], fraction: float, seed: int, what: str = "rows") -> tuple[list[Item], list[Item]]:
    """(train, validation): a seeded shuffle, then the first `fraction` held out; at least one of each."""
    if len(items) < 2:
        raise DataError(f"only {len(items)} usable {what}; need at least 2 to hold one out")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_validation = min(len(order) - 1, max(1, round(fraction * len(order))))
    return [items[i] for i in order[n_validation:]], [items[i] for i in order[:n_validation]]
