"""The optimiser and schedule every hand-written training loop here uses."""

from __future__ import annotations

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup


def adamw(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, decaying matrices only: decaying norms and biases hurts and buys nothing."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=learning_rate, betas=betas)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak.

    Not for `accelerator.prepare`: a prepared scheduler steps once per process per optimiser step.
    """
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio
    )
