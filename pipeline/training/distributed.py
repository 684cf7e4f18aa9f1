"""Checks that only make sense with several processes."""

from __future__ import annotations

import torch
from accelerate.utils import gather


def replicas_in_sync(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every process holds exactly the same weights (collective: every process calls it).

    Data-parallel training averages gradients before each step, so replicas that diverge mean a
    step was taken without synchronising. Compares one float64 sum per parameter tensor.
    """
    sums = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(device)
    everyone = gather(sums.unsqueeze(0))
    return bool((everyone == everyone[0]).all())


def fit_deepspeed_batch(accelerator, micro_batch_size: int) -> None:
    """Tell DeepSpeed the per-GPU micro batch when no dataloader goes through `prepare` to infer it.

    accelerate leaves `train_micro_batch_size_per_gpu: auto` unresolved otherwise and refuses to
    prepare the model. Nothing happens without DeepSpeed.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch_size
