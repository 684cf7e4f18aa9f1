"""Small metric helpers shared by the training loops and evaluation.

The one held-out loss, `held_out_loss`: the mean over every token a model predicts, whatever
batches the set is cut into. Pretraining, SFT and the eval stage report it. (Until issue 27 the
training stages weighted batch means by rows, so a batch of short replies weighed as much per row
as one of long replies; for pretraining's equal blocks the change is float rounding, for SFT's
held-out loss on the demo 3.7710 became 3.7911.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def perplexity(loss: float) -> float:
    """exp(mean negative log-likelihood), capped at e^50 so an untrained model's loss cannot overflow."""
    return math.exp(min(loss, 50.0))


IGNORE_INDEX = -100  # the label transformers' causal-LM loss skips


@torch.no_grad()
def held_out_loss(
    accelerator, model, batches: Iterable[dict[str, torch.Tensor]], *, across_processes: bool = True
) -> dict[str, float]:
    """The mean negative log-likelihood over every predicted token of every process's batches; and its perplexity.

    batches: this process's share of the held-out set, each a dict of keyword inputs to `model`
    (moved to the accelerator's device here) with `labels` (IGNORE_INDEX where nothing is
    predicted), whose output's `.loss` is the mean over the batch's predicted tokens. Each batch
    weighs by the tokens it predicts, so the figure is the same however the set is batched. Every
    process must call this, even with no batches: the sums are reduced across processes. Without
    `across_processes` each process's figure is over its own batches alone (eval, where every
    process scores the whole set, so its figure is exactly one process's). The model is left in
    the mode it was in.
    """
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    tokens = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for batch in batches:
        inputs = {name: tensor.to(accelerator.device) for name, tensor in batch.items()}
        with accelerator.autocast():
            batch_loss = model(**inputs).loss
        predicted = (inputs["labels"][:, 1:] != IGNORE_INDEX).sum().double()  # token t is predicted from those before it
        loss_sum += torch.where(predicted > 0, batch_loss.double() * predicted, 0.0)  # a batch predicting nothing has loss NaN
        tokens += predicted
    if across_processes:
        loss_sum, tokens = accelerator.reduce(loss_sum, "sum"), accelerator.reduce(tokens, "sum")
    model.train(was_training)
    mean = (loss_sum / tokens.clamp(min=1)).item()
    return {"loss": mean, "perplexity": perplexity(mean)}
