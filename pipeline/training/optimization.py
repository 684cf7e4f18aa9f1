"""The optimiser and schedule every hand-written training loop here uses, and the step that applies them."""

from __future__ import annotations

from typing import Callable

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from pipeline.training.distributed import engine_of
from pipeline.training.loop import OptimizerStep


def adamw(
    model: torch.nn.Module, learning_rate: float, weight_decay: float, betas: tuple[float, float] = (0.9, 0.999)
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, decaying matrices only: decaying norms and biases hurts and buys nothing."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=learning_rate, betas=betas, fused=fused_adamw_supported(trainable)
    )


def fused_adamw_supported(parameters) -> bool:
    """Whether torch's fused AdamW kernel takes every parameter: floating point, on CPU or CUDA.

    One kernel over all tensors instead of a Python loop over them: measured 3.5x (213k parameters)
    to 4.8x (3.9M) faster optimiser steps than the default on a 2-core CPU. accelerate may move the
    model to a GPU after the optimiser is built; both devices are supported, so that is fine.
    """
    parameters = list(parameters)
    return bool(parameters) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in parameters)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak.

    Not for `accelerator.prepare`: a prepared scheduler steps once per process per optimiser step.
    """
    return get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup_steps, total_steps, min_lr_rate=min_lr_ratio
    )


def prepare_training(
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    *,
    micro_batch_size: int,
    max_grad_norm: float,
    clip_groups: Callable[[], dict[str, torch.nn.Module | None]] | None = None,
) -> OptimizerStep:
    """`model` and `optimizer` prepared by the engine, as the optimiser step that trains them.

    A stage's micro-batch size and clipping norm come in here once: the engine takes what it needs
    of them before it prepares (DeepSpeed clips inside its engine; see Engine.prepare), and the
    step clips to the same norm under every other engine. `clip_groups`: see `OptimizerStep`.
    """
    model, optimizer = engine_of(accelerator).prepare(model, optimizer, micro_batch_size=micro_batch_size, max_grad_norm=max_grad_norm)
    return OptimizerStep(accelerator, model, optimizer, scheduler, max_grad_norm, clip_groups)
