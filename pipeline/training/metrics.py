"""Small metric helpers shared by the training loops and evaluation."""

from __future__ import annotations

import math


def perplexity(loss: float) -> float:
    """exp(mean negative log-likelihood), capped at e^50 so an untrained model's loss cannot overflow."""
    return math.exp(min(loss, 50.0))
