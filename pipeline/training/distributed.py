"""The engines that run a stage on several processes, and the checks that only make sense there.

Every stage builds its Accelerator with `make_accelerator`, so the engine a launch chose (DDP,
FSDP2, DeepSpeed ZeRO-2/3, from the accelerate config file; see
pipeline/orchestration/launcher.py) is set up in one place, on GPUs and on CPU processes alike.
"""

from __future__ import annotations

import contextlib
import copy
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
        accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
        rehearse_every_partition(accelerator)
        return accelerator
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    plugin = FullyShardedDataParallelPlugin()
    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    return accelerator


def rehearse_every_partition(accelerator) -> None:
    """On a CPU rehearsal of ZeRO-3, partition every parameter, however small.

    DeepSpeed keeps parameters under `stage3_param_persistence_threshold` elements (default
    100,000) whole on every process. On a real model that is the norms and biases; on a
    rehearsal-size model it is every parameter, and the rehearsal would never gather, partition
    or save a sharded weight. A threshold the config sets itself is left alone.
    """
    plugin = accelerator.state.deepspeed_plugin
    zero = plugin.deepspeed_config.setdefault("zero_optimization", {})
    if plugin.zero_stage == 3 and "stage3_param_persistence_threshold" not in zero:
        zero["stage3_param_persistence_threshold"] = 0
        accelerator.print(
            "chatpipe: ZeRO-3 rehearsal: every parameter is partitioned (stage3_param_persistence_threshold 0; "
            "DeepSpeed's default keeps parameters under 100,000 elements whole, here all of them)"
        )


@contextlib.contextmanager
def whole_model_init():
    """Context: models built or loaded inside are whole on every process, whatever the engine.

    - Under ZeRO-3 with `zero3_init_flag`, transformers builds models already partitioned by
      `zero.Init`, which draws a freshly initialised model's weights differently from every other
      engine. Loading trained weights to train them keeps the flag's memory saving; a model
      initialised from scratch, or one used whole (eval), is built here instead. (accelerate's
      `zero3_init_context_manager(enable=False)` leaves transformers' switch on, so this turns
      transformers' own switch off and back.)
    - Under FSDP with `cpu_ram_efficient_loading`, transformers loads real weights on rank 0 only
      (the others get empty tensors that FSDP's preparation fills from rank 0); here every process
      loads them.

    A no-op under DDP.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = reference() if reference is not None else None
    efficient_loading = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    if config is not None:
        hf_deepspeed.unset_hf_deepspeed_config()
    if efficient_loading is not None:
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)
        if efficient_loading is not None:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = efficient_loading


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


@contextlib.contextmanager
def whole_for_rollout(accelerator, model: torch.nn.Module):
    """Context: the prepared model, unwrapped, with whole weights on every process and local forwards.

    Generation runs a forward pass per token, and each process stops when its own replies end, so
    no forward pass inside may be a collective. Collective on entry and exit: every process enters.

    - DeepSpeed ZeRO-3: the parameters are gathered once (`GatheredParameters`), and the engine's
      per-module fetch/release hooks are taken off for the context (they would re-partition after
      each module), then put back.
    - FSDP2: every FSDP unit is unsharded once and told not to reshard after forward; on exit each is
      resharded and gets back the plugin's `reshard_after_forward`.
    - DDP, ZeRO-2: the weights are whole already; nothing happens.

    The whole model is held for the length of the context, as DDP holds it all the time.
    """
    unwrapped = accelerator.unwrap_model(model)
    if zero_stage(accelerator) == 3:
        import deepspeed

        offload = model.optimizer.parameter_offload
        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters())):
            offload._remove_module_hooks()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield unwrapped
            finally:
                offload.setup_zero_stage3_hooks()
        return
    if str(accelerator.distributed_type).endswith("FSDP"):
        from torch.distributed.fsdp import FSDPModule

        units = [module for module in model.modules() if isinstance(module, FSDPModule)]
        model._get_fsdp_state()._lazy_init()  # the root is the root, even if a unit runs forward first
        for unit in units:
            unit.set_reshard_after_forward(False, recurse=False)
            unit.unshard()
        try:
            yield unwrapped
        finally:
            for unit in units:
                unit.reshard()
                unit.set_reshard_after_forward(accelerator.state.fsdp_plugin.reshard_after_forward, recurse=False)
        return
    yield unwrapped


def prepare_frozen(accelerator, model: torch.nn.Module):
    """A model that is never trained (PPO's reference and reward model), placed in place the way the engine places weights.

    - DeepSpeed ZeRO-3: sharded like the trained model, as a ZeRO-3 inference engine built from
      the run's DeepSpeed config (no optimizer), so no process holds a whole copy.
    - FSDP2: sharded with `fully_shard` by accelerate's FSDP2 preparation.
    - Otherwise: whole on this process's device.

    The module itself is changed (ZeRO-3's hooks and partitioned parameters, FSDP2's sharded
    parameters), so code that holds it calls the placed model; the return value is that module.
    Under sharding its forward passes are collectives: every process makes the same calls. Call it
    after the trained model is prepared (DeepSpeed's `auto` settings are resolved then).
    """
    model.requires_grad_(False).eval()
    if zero_stage(accelerator) == 3:
        import deepspeed

        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        inner = getattr(model, "pretrained_model", model)  # a TokenScorer holds its Hugging Face model
        hidden = getattr(getattr(inner, "config", None), "hidden_size", None)
        for key, value in (
            ("reduce_bucket_size", hidden * hidden if hidden else 5e8),
            ("stage3_prefetch_bucket_size", int(0.9 * hidden * hidden) if hidden else 5e8),
            ("stage3_param_persistence_threshold", 10 * hidden if hidden else 1e5),
        ):
            if config["zero_optimization"].get(key) == "auto":
                config["zero_optimization"][key] = value
        deepspeed.initialize(model=model, config=config)  # hooks the module in place; the engine's eval() returns None
        return model
    if str(accelerator.distributed_type).endswith("FSDP"):
        from accelerate.utils.fsdp_utils import fsdp2_prepare_model

        return fsdp2_prepare_model(accelerator, model.to(accelerator.device)).eval()
    return model.to(accelerator.device)


def zero_stage(accelerator) -> int | None:
    """DeepSpeed's ZeRO stage for this run, or None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return plugin.zero_stage if plugin is not None and str(accelerator.distributed_type).endswith("DEEPSPEED") else None


def held_fraction(model: torch.nn.Module) -> float:
    """The share of the model's parameter elements this process holds: 1.0 whole, about 1/N sharded N ways.

    ZeRO-3 keeps a partition of each parameter (`ds_tensor`; small ones it keeps whole, `ds_persist`),
    FSDP2 a DTensor shard; other engines hold every element.
    """
    held = total = 0
    for parameter in model.parameters():
        if hasattr(parameter, "ds_id"):
            whole = parameter.ds_numel
            local = whole if getattr(parameter, "ds_persist", False) else parameter.ds_tensor.numel()
        elif hasattr(parameter, "to_local"):
            whole, local = parameter.numel(), parameter.to_local().numel()
        else:
            whole = local = parameter.numel()
        held, total = held + local, total + whole
    return held / max(total, 1)


def shards_parameters(accelerator) -> bool:
    """Whether each process holds only a shard of the weights (FSDP, ZeRO-3), so that a forward
    pass is a collective every process must take part in."""
    return str(accelerator.distributed_type).endswith("FSDP") or zero_stage(accelerator) == 3


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
