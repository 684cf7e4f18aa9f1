"""The engine that spreads a stage over its processes: DDP, FSDP2 or DeepSpeed ZeRO-2/3, in one object.

    accelerator = make_accelerator(mixed_precision)      # built as the launch asked
    engine = engine_of(accelerator)                      # detected once: Engine("zero", stage 3), ...
    model, optimizer = engine.prepare(model, optimizer, micro_batch_size=8, max_grad_norm=1.0)
    engine.backward(loss, last=True)                     # inside OptimizerStep
    with engine.whole_for_rollout(model) as whole: ...   # generation on whole weights
    engine.place_frozen(reference)                       # PPO's reference, reward model, judges

The launch picks the engine (an accelerate config file: pipeline/orchestration/launcher.py) and
`make_accelerator` builds the Accelerator for it, on GPUs and on CPU processes alike. `engine_of`
then reads the engine from the Accelerator once (`detect_engine`, the only place that asks), and
everything that differs between engines is a method of `Engine`: preparation, backward, the
whole-weights gather for rollouts, checks and saving, the placement of frozen models, and the
optimiser state saved and loaded whole, by parameter name (pipeline/training/state.py writes it).
Stages and the training loop ask the engine; none of them names DeepSpeed or FSDP.

| engine | weights per process       | optimiser state per process | frozen models        |
|--------|---------------------------|-----------------------------|----------------------|
| ddp    | whole                     | whole                       | whole                |
| fsdp2  | DTensor shards            | shards (like the weights)   | `fully_shard`ed      |
| zero 2 | whole                     | flat fp32 partitions        | whole                |
| zero 3 | partitions (`ds_tensor`)  | flat fp32 partitions        | ZeRO-3 inference engine |

The private APIs of torch, accelerate, transformers and DeepSpeed that this needs are each behind a
small function at the end of this module, with the version it was written against; pyproject.toml
bounds those packages below their next breaking release.
"""

from __future__ import annotations

import contextlib
import copy
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather

from pipeline.errors import ConfigError


def requested_engine() -> str:
    """The engine the launch asked for (`accelerate launch` or chatpipe's CPU rehearsal set the
    environment): ddp, fsdp or deepspeed. Only `make_accelerator` reads it, to build the
    Accelerator; the engine a stage runs is read from that Accelerator (`detect_engine`)."""
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
    from accelerate.utils import FullyShardedDataParallelPlugin, InitProcessGroupKwargs

    engine = requested_engine()
    on_cpu_processes = not torch.cuda.is_available() and "LOCAL_RANK" in os.environ
    if not on_cpu_processes or engine == "ddp":
        return Accelerator(mixed_precision=mixed_precision)
    if engine == "deepspeed":
        accelerator = Accelerator(mixed_precision=mixed_precision, kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
        rehearse_every_partition(accelerator)
        return accelerator
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=True)
    _switch_accelerate_to_fsdp(FullyShardedDataParallelPlugin())
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


def detect_engine(accelerator) -> Engine:
    """The engine `accelerator` runs: the one place that asks accelerate which it is."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.DEEPSPEED:
        return Engine(accelerator, "zero", accelerator.state.deepspeed_plugin.zero_stage)
    if kind == DistributedType.FSDP:
        version = accelerator.state.fsdp_plugin.fsdp_version
        if version != 2:
            raise ConfigError(f"FSDP{version}: chatpipe runs FSDP2; set fsdp_version: 2 in the accelerate config file")
        return Engine(accelerator, "fsdp2")
    return Engine(accelerator, "ddp")


_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def engine_of(accelerator) -> Engine:
    """The engine of `accelerator`, detected on first use and kept with it."""
    if accelerator not in _ENGINES:
        _ENGINES[accelerator] = detect_engine(accelerator)
    return _ENGINES[accelerator]


@dataclass(frozen=True, eq=False)
class Engine:
    """How one launch spreads its models over its processes (see the module's table).

    `kind`: "ddp" (one process is DDP of one), "fsdp2" or "zero"; `zero_stage` 2 or 3 for "zero".
    """

    accelerator: Any
    kind: str
    zero_stage: int | None = None

    @property
    def name(self) -> str:
        return {"ddp": "DDP", "fsdp2": "FSDP2"}.get(self.kind) or f"DeepSpeed ZeRO-{self.zero_stage}"

    @property
    def shards_weights(self) -> bool:
        """Whether each process holds only a shard of the weights, so a forward pass is a
        collective every process takes part in (FSDP2, ZeRO-3)."""
        return self.kind == "fsdp2" or self.zero_stage == 3

    @property
    def shards_optimizer(self) -> bool:
        """Whether each process holds only a share of the optimiser state (FSDP2, ZeRO)."""
        return self.kind != "ddp"

    # ------------------------------------------------------------------ prepare, backward
    @property
    def clips_groups_apart(self) -> bool:
        """Whether gradients can be clipped per group (PPO's policy and value apart); DeepSpeed
        clips inside its engine, over all parameters with one norm."""
        return self.kind != "zero"

    def prepare(self, model: torch.nn.Module, optimizer, *, micro_batch_size: int, max_grad_norm: float):
        """(model, optimizer) prepared for training.

        DeepSpeed takes chatpipe's settings into its config first: the micro-batch size
        (accelerate leaves `auto` unresolved when no dataloader is prepared, and refuses the
        model), gradient accumulation 1 (the training core accumulates micro-batches itself and
        says which backward ends a step), and the clipping norm (it clips inside its engine).
        """
        if self.kind == "zero":
            config = self.accelerator.state.deepspeed_plugin.deepspeed_config
            config["train_micro_batch_size_per_gpu"] = micro_batch_size
            config["gradient_accumulation_steps"] = 1
            config["train_batch_size"] = micro_batch_size * self.accelerator.num_processes
            config["gradient_clipping"] = max_grad_norm
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward for one micro-batch; under DeepSpeed the engine steps on the last one only.

        accelerate's DeepSpeed backward steps the engine whenever accelerate thinks gradients
        sync, which with hand-made accumulation is every micro-batch; here the boundary is the
        optimiser step's last micro-batch. DeepSpeed's own gradient accumulation is held at 1
        (`prepare`), so it does not divide the already weighted loss again.
        """
        if self.kind == "zero":
            self.accelerator.deepspeed_engine_wrapped.backward(loss, sync_gradients=last)
        else:
            self.accelerator.backward(loss)

    # ------------------------------------------------------------------ whole weights
    def full_parameters(self, model: torch.nn.Module):
        """Context: the model's parameters as whole tensors on every process. Yields [(name, tensor)].

        DDP and ZeRO-2 hold whole parameters; ZeRO-3 partitions are gathered
        (`deepspeed.zero.GatheredParameters`), FSDP2's DTensor shards each gathered with
        `full_tensor()`. Collective: every process enters it.
        """
        named = list(model.named_parameters())

        @contextlib.contextmanager
        def gathered():
            if self.zero_stage == 3:
                import deepspeed

                with deepspeed.zero.GatheredParameters([p for _, p in named]):
                    yield [(name, p.detach()) for name, p in named]
                return
            yield [(name, p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()) for name, p in named]

        return gathered()

    @contextlib.contextmanager
    def whole_for_rollout(self, model: torch.nn.Module):
        """Context: the prepared model, unwrapped, with whole weights on every process and local forwards.

        Generation runs a forward pass per token, and each process stops when its own replies
        end, so no forward pass inside may be a collective. Collective on entry and exit.

        - ZeRO-3: the parameters are gathered once, and the engine's per-module fetch/release
          hooks are taken off for the context (they would re-partition after each module).
        - FSDP2: every unit is unsharded once and told not to reshard after forward; on exit each
          is resharded and gets back the plugin's `reshard_after_forward`.
        - DDP, ZeRO-2: the weights are whole already.

        The whole model is held for the length of the context, as DDP holds it all the time.
        """
        unwrapped = self.accelerator.unwrap_model(model)
        if self.zero_stage == 3:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(unwrapped.parameters())), _zero3_hooks_removed(model):
                yield unwrapped
        elif self.kind == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            units = [module for module in model.modules() if isinstance(module, FSDPModule)]
            _fsdp2_lazy_init(model)  # the root is the root, even if a unit runs forward first
            for unit in units:
                unit.set_reshard_after_forward(False, recurse=False)
                unit.unshard()
            try:
                yield unwrapped
            finally:
                for unit in units:
                    unit.reshard()
                    unit.set_reshard_after_forward(self.accelerator.state.fsdp_plugin.reshard_after_forward, recurse=False)
        else:
            yield unwrapped

    def replicas_in_sync(self, model: torch.nn.Module) -> bool:
        """Whether every process ends with the same whole weights (collective).

        Data-parallel training averages gradients before each step, so replicas that diverge mean
        a step was taken without synchronising; under sharding each process gathers the whole
        weights first, so shards that disagree about the model show too. Compares one float64
        sum per parameter tensor across processes.
        """
        with self.full_parameters(model) as parameters:
            sums = torch.stack([tensor.double().sum() for _, tensor in parameters]).to(self.accelerator.device)
        everyone = gather(sums.unsqueeze(0))
        return bool((everyone == everyone[0]).all())

    # ------------------------------------------------------------------ frozen models
    def place_frozen(self, model: torch.nn.Module) -> torch.nn.Module:
        """A model that is never trained (PPO's reference and reward model, judges), placed in place
        the way the engine places weights.

        - ZeRO-3: sharded like the trained model, as a ZeRO-3 inference engine built from the
          run's DeepSpeed config (no optimizer), so no process holds a whole copy.
        - FSDP2: sharded with `fully_shard` by accelerate's FSDP2 preparation.
        - Otherwise: whole on this process's device.

        The module itself is changed (ZeRO-3's hooks and partitioned parameters, FSDP2's sharded
        parameters), so code that holds it calls the placed model; the return value is that
        module. Under sharding its forward passes are collectives. Call it after the trained model
        is prepared (DeepSpeed's `auto` settings are resolved then).
        """
        model.requires_grad_(False).eval()
        if self.zero_stage == 3:
            import deepspeed

            deepspeed.initialize(model=model, config=self.inference_config(model))  # hooks the module in place
            return model
        if self.kind == "fsdp2":
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            return fsdp2_prepare_model(self.accelerator, model.to(self.accelerator.device)).eval()
        return model.to(self.accelerator.device)

    def inference_config(self, model: torch.nn.Module) -> dict:
        """The run's DeepSpeed config without optimiser or scheduler, its `auto` sizes resolved for `model`."""
        config = copy.deepcopy(self.accelerator.state.deepspeed_plugin.deepspeed_config)
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
        return config

    def held_fraction(self, model: torch.nn.Module) -> float:
        """The share of the model's parameter elements this process holds: 1.0 whole, about 1/N sharded N ways."""
        held = total = 0
        for parameter in model.parameters():
            local, whole = _held_and_whole_numel(parameter)
            held, total = held + local, total + whole
        return held / max(total, 1)

    # ------------------------------------------------------------------ whole optimiser state
    def whole_optimizer_state(self, model, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        """Collective: the optimiser state gathered whole and named by parameter, as (tensors, JSON);
        None under DDP, whose optimiser state is whole already (saved as the optimiser's own)."""
        if self.kind == "fsdp2":
            return _whole_fsdp2_optimizer_state(model, optimizer)
        if self.kind == "zero":
            return _whole_zero_optimizer_state(model)
        return None

    def load_whole_state(self, model, optimizer, weights: dict[str, torch.Tensor], state: dict[str, torch.Tensor],
                         meta: dict[str, Any], where: Path) -> list[dict]:
        """Whole weights and whole optimiser state (as `whole_optimizer_state` gives them) into this
        process's shards. Returns the optimiser's param groups to give back their settings."""
        if self.kind == "fsdp2":
            _load_fsdp2_state(model, optimizer, weights, state, meta, where)
            return optimizer.param_groups
        _load_zero_state(model, weights, state, meta, where, self.accelerator.device)
        return model.optimizer.optimizer.param_groups  # the torch optimiser inside ZeRO's


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

    A no-op under DDP. (Used before the Accelerator exists too, so it reads the settings, not the engine.)
    """
    efficient_loading = os.environ.get("FSDP_CPU_RAM_EFFICIENT_LOADING")
    if efficient_loading is not None:
        os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "false"
    try:
        with _transformers_zero3_init_off():
            yield
    finally:
        if efficient_loading is not None:
            os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = efficient_loading


def whole_parameter_count(model: torch.nn.Module) -> int:
    """Every parameter element, also of a ZeRO-3 partitioned model (whose own tensors are empty placeholders)."""
    return sum(_held_and_whole_numel(parameter)[1] for parameter in model.parameters())


# ---------------------------------------------------------------------- FSDP2 and ZeRO state
def _whole_fsdp2_optimizer_state(model: torch.nn.Module, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Collective: each sharded moment gathered whole (`full_tensor`), keyed `<parameter>::<key>`, so a
    checkpoint does not depend on how the state was sharded."""
    tensors, state_keys = {}, {}
    for name, parameter in model.named_parameters():
        for key, value in optimizer.state.get(parameter, {}).items():
            if isinstance(value, torch.Tensor):
                whole = value.full_tensor() if hasattr(value, "full_tensor") else value
                tensors[f"{name}::{key}"] = whole.detach().cpu().contiguous()
                state_keys.setdefault(name, []).append(key)
    return tensors, {"layout": "whole tensors by parameter name", "state_keys": state_keys,
                     "param_groups": _group_settings(optimizer.param_groups)}


def _load_fsdp2_state(model, optimizer, weights, moments, meta, where: Path) -> None:
    """Every process reads the whole weights and optimiser state and keeps its shards."""
    from torch.distributed.tensor import distribute_tensor

    with torch.no_grad():
        for name, parameter in model.named_parameters():  # tied weights once, under their first name
            if name not in weights:
                raise RuntimeError(f"{where}: checkpoint has no weights for {name}")
            parameter.copy_(distribute_tensor(weights[name].to(parameter.dtype), parameter.device_mesh, parameter.placements))
            state = {}
            for key in meta["state_keys"].get(name, []):
                value = moments[f"{name}::{key}"]  # moments shard like their parameter; a step count stays whole
                sharded = value.shape == parameter.shape
                state[key] = distribute_tensor(value, parameter.device_mesh, parameter.placements) if sharded else value
            if state:
                optimizer.state[parameter] = state


def _whole_zero_optimizer_state(engine) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Collective: fp32 master weights and Adam moments gathered whole, by parameter name."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    _link_zero_optimizer_state(engine)
    base = engine.optimizer.optimizer
    keys = sorted({key for values in base.state.values() for key, value in values.items()
                   if isinstance(value, torch.Tensor) and value.dim() > 0})
    tensors = {}
    for name, parameter in engine.module.named_parameters():
        if not parameter.requires_grad:
            continue
        tensors[f"{name}::fp32"] = safe_get_full_fp32_param(parameter).detach().cpu().contiguous()
        for key in keys:
            tensors[f"{name}::{key}"] = safe_get_full_optimizer_state(parameter, key).detach().cpu().contiguous()
    steps = [values["step"] for values in base.state.values() if "step" in values]
    step = float(steps[0]) if steps else 0
    return tensors, {"layout": "whole tensors by parameter name", "state_keys": keys,
                     "param_groups": _group_settings(base.param_groups), "step": step}


def _load_zero_state(engine, weights, state, meta, where: Path, device) -> None:
    """The whole weights into each process's parameters (ZeRO-3: its partitions), and the whole
    fp32 master weights and Adam moments into its partitions of the optimiser."""
    import deepspeed
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    _link_zero_optimizer_state(engine, meta["state_keys"])
    for name, parameter in engine.module.named_parameters():
        if name not in weights:
            raise RuntimeError(f"{where}: checkpoint has no weights for {name}")
        with deepspeed.zero.GatheredParameters([parameter], modifier_rank=0), torch.no_grad():
            parameter.data.copy_(weights[name].to(parameter.dtype))  # every process holds the same values
        if f"{name}::fp32" in state:
            safe_set_full_fp32_param(parameter, state[f"{name}::fp32"].to(device))
            for key in meta["state_keys"]:
                safe_set_full_optimizer_state(parameter, state[f"{name}::{key}"].to(device), key)
    for values in engine.optimizer.optimizer.state.values():
        if "step" in values:
            values["step"] = torch.as_tensor(meta["step"], dtype=torch.float32) if isinstance(values["step"], torch.Tensor) else meta["step"]


def _link_zero_optimizer_state(engine, keys: list[str] | tuple[str, ...] = ()) -> None:
    """Make sure the optimiser state holds `keys`, and (ZeRO-1/2) point every parameter at its fragment of it.

    The torch optimiser inside ZeRO keeps its state per flat fp32 partition and makes it on its
    first step, so a fresh process resuming has none: the entries the checkpoint fills are made
    here, as zeros. DeepSpeed links each parameter to its fragments once, after the first step; a
    parameter whose state did not exist then (seen: a layer norm in the second parameter group)
    keeps an empty link, so the links are made again. ZeRO-3 looks fragments up on each call.
    """
    optimizer = engine.optimizer
    base = optimizer.optimizer
    flats = getattr(optimizer, "fp32_partitioned_groups_flat", None) or [
        flat for group in base.param_groups for flat in group["params"]
    ]
    for flat in flats:
        state = base.state[flat]
        for key in keys:
            if key not in state:
                state[key] = torch.zeros_like(flat)
        if keys and "step" not in state:
            state["step"] = torch.tensor(0.0)
    _relink_zero_fragments(optimizer)


def _group_settings(param_groups: list[dict]) -> list[dict]:
    """Each param group's settings (learning rate, decay, ...) without its parameters."""
    return [{key: value for key, value in group.items() if key != "params"} for group in param_groups]


def _held_and_whole_numel(parameter: torch.Tensor) -> tuple[int, int]:
    """(elements this process holds, elements of the whole parameter).

    ZeRO-3 keeps a partition of each parameter (`ds_tensor`; one under its persistence threshold
    whole, `ds_persist`) and leaves the tensor itself an empty placeholder; FSDP2 a DTensor shard.
    A model built whole (`whole_model_init`) has neither, under any engine.
    """
    if hasattr(parameter, "ds_id"):
        whole = parameter.ds_numel
        return (whole if getattr(parameter, "ds_persist", False) else parameter.ds_tensor.numel()), whole
    if hasattr(parameter, "to_local"):
        return parameter.to_local().numel(), parameter.numel()
    return parameter.numel(), parameter.numel()


# ---------------------------------------------------------------------- private APIs, one each
def _switch_accelerate_to_fsdp(plugin) -> None:
    """Turn a CPU DDP Accelerator into an FSDP one, as accelerate does on GPUs.

    Written against accelerate 1.16: the engine lives in the shared state of AcceleratorState and
    PartialState (`_shared_state`), which accelerate never sets to FSDP for CPU processes.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    for shared in (AcceleratorState._shared_state, PartialState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin


@contextlib.contextmanager
def _transformers_zero3_init_off():
    """Context: transformers builds models whole though a ZeRO-3 config with `zero3_init_flag` is set.

    Written against transformers 5.25: the switch is the weak reference
    `integrations.deepspeed._hf_deepspeed_config_weak_ref`, with public unset/set functions.
    """
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = reference() if reference is not None else None
    if config is not None:
        hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


@contextlib.contextmanager
def _zero3_hooks_removed(engine):
    """Context: a ZeRO-3 engine's per-module parameter fetch/release hooks taken off, then put back.

    Written against DeepSpeed 0.19.8: `parameter_offload._remove_module_hooks()` removes them and
    `setup_zero_stage3_hooks()` installs them again (the hook lists must be emptied between).
    """
    offload = engine.optimizer.parameter_offload
    offload._remove_module_hooks()
    offload.forward_hooks, offload.backward_hooks = [], []
    try:
        yield
    finally:
        offload.setup_zero_stage3_hooks()


def _fsdp2_lazy_init(model: torch.nn.Module) -> None:
    """Run FSDP2's lazy root initialisation now, so the root stays the root if a unit runs forward first.

    Written against torch 2.13: `FSDPModule._get_fsdp_state()._lazy_init()`.
    """
    model._get_fsdp_state()._lazy_init()


def _relink_zero_fragments(optimizer) -> None:
    """Have ZeRO-1/2 link every parameter to its optimiser-state fragments again.

    Written against DeepSpeed 0.19.8: `_hp_optimizer_states_linked` and
    `_lazy_init_hp_params_optimizer_state()` (ZeRO-3 optimisers have neither; they look up each call).
    """
    if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()

