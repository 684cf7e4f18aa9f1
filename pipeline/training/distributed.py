"""The engines that run a stage on several processes, and the checks that only make sense there.

Every stage builds its Accelerator with `make_accelerator`, so the engine a launch chose (DDP,
FSDP2, DeepSpeed ZeRO-2/3, from the accelerate config file; see
pipeline/orchestration/launcher.py) is set up in one place, on GPUs and on CPU processes alike.
"""

from __future__ import annotations

import contextlib
import os

import torch
from accelerate.utils import gather


def engine_from_environment() -> str:
    """The engine `accelerate launch` (or chatpipe's CPU rehearsal) asked for: ddp, fsdp or deepspeed."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        return "deepspeed"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "fsdp"
    return "ddp"


def make_accelerator(mixed_precision: str | None = None):
    """The stage's Accelerator, with the engine of its launch, on GPUs or on CPU processes.

    On GPUs this is `Accelerator(mixed_precision=...)`: accelerate reads the engine from the
    environment `accelerate launch` set. On CPU processes (torchrun, gloo) accelerate knows only
    DDP: with DeepSpeed asked for it starts no process group (no backend on CPU, so one process
    of one), and it never turns FSDP on for CPU. Here DeepSpeed gets the gloo backend, and FSDP
    starts as CPU DDP and is switched to FSDP with the plugin accelerate builds from the same
    FSDP_* environment, which is what it does on GPUs.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    engine = engine_from_environment()
    on_cpu_processes = not torch.cuda.is_available() and "LOCAL_RANK" in os.environ
    if not on_cpu_processes or engine == "ddp":
        return Accelerator(mixed_precision=mixed_precision)
    if engine == "deepspeed":
        return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    plugin = FullyShardedDataParallelPlugin()
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    return accelerator


@contextlib.contextmanager
def whole_model_init():
    """Context: models built inside are created whole, not partitioned by ZeRO-3's `zero.Init`.

    Under ZeRO-3 with `zero3_init_flag`, transformers builds models already sharded, which draws
    a freshly initialised model's weights differently from every other engine. Loading trained
    weights (`from_pretrained`) keeps the flag's memory saving; a model initialised from scratch
    is built here instead. (accelerate's `zero3_init_context_manager(enable=False)` leaves
    transformers' switch on, so this turns transformers' own switch off and back.) A no-op
    without DeepSpeed.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = reference() if reference is not None else None
    if config is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)


def full_parameters(model: torch.nn.Module):
    """Context: the model's parameters as whole tensors on every process, whatever the engine.

    DDP and ZeRO-2 keep whole parameters already; ZeRO-3 partitions them (gathered here with
    `deepspeed.zero.GatheredParameters`); FSDP2 holds DTensor shards (each gathered with
    `full_tensor()`). Yields a list of (name, tensor). Collective: every process enters it.
    """
    named = list(model.named_parameters())

    @contextlib.contextmanager
    def gathered():
        if any(hasattr(p, "ds_id") for _, p in named):
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in named]):
                yield [(name, p.detach()) for name, p in named]
            return
        yield [(name, p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()) for name, p in named]

    return gathered()


def shards_parameters(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, ZeRO-3), so that a forward
    pass is a collective every process must take part in."""
    kind = str(accelerator.distributed_type)
    if kind.endswith("FSDP"):
        return True
    return kind.endswith("DEEPSPEED") and accelerator.state.deepspeed_plugin.zero_stage == 3


def replicas_in_sync(model: torch.nn.Module, device: torch.device) -> bool:
    """Whether every process ends with the same whole weights (collective: every process calls it).

    Data-parallel training averages gradients before each step, so replicas that diverge mean a
    step was taken without synchronising; under sharding (FSDP2, ZeRO-3) each process gathers the
    whole weights first, so shards that disagree about the model show too. Compares one float64
    sum per parameter tensor across processes.
    """
    with full_parameters(model) as parameters:
        sums = torch.stack([tensor.double().sum() for _, tensor in parameters]).to(device)
    everyone = gather(sums.unsqueeze(0))
    return bool((everyone == everyone[0]).all())


def fit_deepspeed_batch(accelerator, micro_batch_size: int, max_grad_norm: float | None = None) -> None:
    """Fill in the DeepSpeed config where chatpipe decides, before `prepare`. Nothing happens without DeepSpeed.

    - `train_micro_batch_size_per_gpu`: accelerate leaves `auto` unresolved when no dataloader
      goes through `prepare` and refuses to prepare the model.
    - `gradient_accumulation_steps` 1: the training core accumulates micro-batches itself and
      tells the engine which backward ends an optimiser step (OptimizerStep.backward).
    - `gradient_clipping`: DeepSpeed clips inside its engine, so the stage's max_grad_norm goes there.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch_size
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = micro_batch_size * accelerator.num_processes
    if max_grad_norm is not None:
        config["gradient_clipping"] = max_grad_norm
