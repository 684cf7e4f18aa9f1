"""Small metric helpers shared by the training loops and evaluation."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def perplexity(loss: float) -> float:
    """exp(mean negative log-likelihood), capped at e^50 so an untrained model's loss cannot overflow."""
    return math.exp(min(loss, 50.0))


@torch.no_grad()
def held_out_loss(accelerator, model, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """The mean of each batch's loss, weighted by its rows, over every process's batches; and its perplexity.

    batches: this process's share of the held-out set, each a dict of keyword inputs to `model`
    (moved to the accelerator's device here) whose output has a `.loss`. Every process must call
    this, even with no batches: the sums are reduced across processes.
    """
    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    for batch in batches:
        inputs = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
        with accelerator.autocast():
            batch_loss = model(**inputs).loss
        rows = inputs["input_ids"].shape[0]
        loss_sum += batch_loss.float() * rows
        count += rows
    loss_sum, count = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(count, "sum")
    model.train()
    mean = (loss_sum / count.clamp(min=1)).item()
    return {"loss": mean, "perplexity": perplexity(mean)}
