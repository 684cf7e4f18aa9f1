"""The training core every stage shares: one optimiser step, one cadence, one loop, one final save.

    step = OptimizerStep(accelerator, model, optimizer, scheduler, max_grad_norm)
    result = fit(
        "reward", accelerator, step, checkpointer, tracker, cadence,
        micro_batches=lambda step: [...],      # this process's micro-batches of optimiser step `step`
        loss=lambda batch: (loss, {"accuracy": ...}),
        evaluate=lambda: {"loss": ..., ...},   # logged as eval/<key>
    )
    save_final_model(accelerator, model, output_dir, tokenizer)

Pretraining and the reward model run `fit`; SFT runs it with masked labels; PPO, whose unit of
work is a rollout, drives `OptimizerStep`, `Cadence` and the `Checkpointer` itself. The
benchmark in bench/pretrain_throughput.py times this same `OptimizerStep`.

Where the distributed engines differ (DDP's no_sync, FSDP's and ZeRO-3's sharded weights, what
clipping returns under DeepSpeed), the difference is handled here and in pipeline/training/state.py,
not in the stages.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from data.packing import batch_indices
from pipeline.faults import fault_point
from pipeline.training.distributed import shards_parameters, whole_model_init
from pipeline.training.state import Checkpointer, CheckpointError, removed_when_disk_full, tensor_bytes


def micro_batch_position(step: int, micro: int, *, accumulation: int, world: int, rank: int, size: int) -> int:
    """Where this process's micro-batch `micro` of optimiser step `step` starts in the data order.

    Every process reads its own slice of each global batch from one shared order of examples
    (data.packing.batch_indices), so the data a run sees does not depend on where it resumed.
    """
    micro_index = step * accumulation + micro
    return (micro_index * world + rank) * size


def step_indices(step: int, accelerator, *, accumulation: int, size: int, examples: int, seed: int) -> list[np.ndarray]:
    """This process's example indices for each of the `accumulation` micro-batches of optimiser step `step`.

    `size` examples per micro-batch, drawn from the seeded order of `examples` items that every
    process shares (one process's slice of each global batch; see micro_batch_position).
    """
    return [
        batch_indices(
            micro_batch_position(
                step, micro, accumulation=accumulation,
                world=accelerator.num_processes, rank=accelerator.process_index, size=size,
            ),
            size, examples, seed,
        )
        for micro in range(accumulation)
    ]


@dataclass
class StepOutput:
    """What one optimiser step did on this process."""

    loss: torch.Tensor  # the weighted sum of the micro-batches' losses: their mean with uniform weights
    stats: dict[str, torch.Tensor]  # each statistic weighted like the loss
    micro_stats: list[dict[str, torch.Tensor]]  # the statistics of each micro-batch, as returned
    grad_norms: dict[str, torch.Tensor | None]  # per clipping group; None where the engine clips itself


class OptimizerStep:
    """One optimiser step over micro-batches: accumulate, synchronise once, clip, step, schedule.

    Every micro-batch's backward runs under autocast (a no-op in full precision); all but the last
    skip the gradient all-reduce (`no_sync`), so data-parallel engines communicate once per
    optimiser step. Losses are divided by the number of micro-batches, or multiplied by explicit
    weights (PPO weighs micro-batches by their share of the minibatch). Gradients are clipped to
    `max_grad_norm` per group: the whole model, or named parts (PPO clips policy and value apart).
    """

    def __init__(
        self,
        accelerator,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler,
        max_grad_norm: float,
        clip_groups: Callable[[], dict[str, torch.nn.Module | None]] | None = None,
    ):
        self.accelerator, self.model, self.optimizer, self.scheduler = accelerator, model, optimizer, scheduler
        self.max_grad_norm = max_grad_norm
        self.clip_groups = clip_groups

    def __call__(
        self,
        micro_batches: Sequence[Any],
        loss_fn: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        weights: Sequence[float] | None = None,
    ) -> StepOutput:
        accelerator = self.accelerator
        count = len(micro_batches)
        loss_total = torch.zeros((), device=accelerator.device)
        stats_total: dict[str, torch.Tensor] = {}
        micro_stats = []
        for index, batch in enumerate(micro_batches):
            last = index == count - 1
            # Gradients are all-reduced once per optimiser step, on its last micro-batch.
            with contextlib.nullcontext() if last else accelerator.no_sync(self.model), accelerator.autocast():
                loss, stats = loss_fn(batch)
                weigh = (lambda value: value / count) if weights is None else (lambda value, w=weights[index]: value * w)
                self.backward(weigh(loss), last)
            loss_total += weigh(loss.detach())
            for key, value in stats.items():
                stats_total[key] = stats_total.get(key, torch.zeros((), device=accelerator.device)) + weigh(value.detach())
            micro_stats.append(stats)
        grad_norms = self.clip()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss_total, stats_total, micro_stats, grad_norms)

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward for one micro-batch; under DeepSpeed the engine steps on the last one only.

        accelerate's DeepSpeed backward steps the engine whenever accelerate thinks gradients
        sync, which with hand-made accumulation is every micro-batch; here the boundary is the
        optimiser step's last micro-batch. DeepSpeed's own gradient_accumulation_steps is held
        at 1 (fit_deepspeed_batch), so it does not divide the already weighted loss again.
        """
        engine = getattr(self.accelerator, "deepspeed_engine_wrapped", None)
        if engine is None:
            self.accelerator.backward(loss)
        else:
            engine.backward(loss, sync_gradients=last)

    def clip(self) -> dict[str, torch.Tensor | None]:
        if self.clip_groups is None:
            return {"": self.accelerator.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)}
        norms = {}
        for name, module in self.clip_groups().items():
            parameters = [p for p in module.parameters() if p.grad is not None] if module is not None else []
            if parameters:
                norms[name] = self.accelerator.clip_grad_norm_(parameters, self.max_grad_norm)
        return norms


@dataclass(frozen=True)
class Cadence:
    """When to log, evaluate and save, in optimiser steps (or rollouts) done, out of `total`."""

    total: int
    log_every: int
    eval_every: int
    save_every: int

    def log(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.total

    def evaluate(self, done: int) -> bool:
        return done % self.eval_every == 0 or done == self.total

    def save(self, done: int) -> bool:
        """A resumable checkpoint; none at the end, where the final model is written instead."""
        return done % self.save_every == 0 and done < self.total


def sharded_engine(accelerator) -> str | None:
    """The name of the engine when it shards optimiser state across processes (FSDP, DeepSpeed ZeRO), else None."""
    kind = str(getattr(accelerator, "distributed_type", ""))
    if kind.endswith("DEEPSPEED"):
        plugin = accelerator.state.deepspeed_plugin
        return f"DeepSpeed ZeRO-{plugin.zero_stage}"
    if kind.endswith("FSDP"):
        return f"FSDP{accelerator.state.fsdp_plugin.fsdp_version}"
    return None


def require_checkpointable(accelerator, cadence: Cadence, name: str, model: torch.nn.Module | None = None) -> None:
    """Refuse, before training, a run that would write resumable checkpoints chatpipe cannot write yet.

    Under FSDP2 and DeepSpeed ZeRO a checkpoint holds the whole weights and optimiser state
    (gathered by parameter name, sharded again on resume; pipeline/training/state.py). A LoRA
    model's adapter checkpoint under those engines cannot be restored into shards yet.
    """
    engine = sharded_engine(accelerator)
    lora = model is not None and any(".lora_" in parameter for parameter, _ in model.named_parameters())
    if engine is None or not lora or cadence.save_every >= cadence.total:
        return
    what = f"{engine} with LoRA"
    raise CheckpointError(
        f"{name}: resumable checkpoints are not written under {what} yet (each process holds a shard of the "
        f"optimiser state); set {name}.save_every to at least the run's {cadence.total} steps to train without "
        f"them (the final model is still saved), or launch this stage with DDP"
    )


@dataclass
class FitResult:
    steps: int
    first_eval: dict[str, float] | None
    last_eval: dict[str, float] | None
    train_loss: float
    resumed_from: int | None
    extra: dict[str, Any] = field(default_factory=dict)


def fit(
    name: str,
    accelerator,
    step: OptimizerStep,
    checkpointer: Checkpointer,
    tracker,
    cadence: Cadence,
    *,
    micro_batches: Callable[[int], Sequence[Any]],
    loss: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]],
    evaluate: Callable[[], dict[str, float]],
    units_per_step: int,
    unit: str,
    tokenizer=None,
    weights: Callable[[Sequence[Any]], Sequence[float]] | None = None,
) -> FitResult:
    """The supervised loop: resume, evaluate at step 0, train `cadence.total` optimiser steps.

    Logs train/loss (and each statistic `loss` returns, as train/<key>), train/grad_norm, lr and
    `throughput/<unit>s_per_second`, which leaves evaluation and checkpoint time out. `weights`
    gives each micro-batch's loss weight (default: their mean; SFT weighs by loss tokens). A crashed
    run resumes from the newest complete checkpoint at the same step with the same data ahead.
    """
    model, optimizer, scheduler = step.model, step.optimizer, step.scheduler
    require_checkpointable(accelerator, cadence, name, model)
    start, resumed_from, first_eval = 0, None, None
    restored = checkpointer.restore(model, optimizer, scheduler)
    if restored is not None:
        start = resumed_from = restored.step
        first_eval = restored.extra.get("first_eval")
        if first_eval is not None:  # checkpoints before this loop kept the eval/ prefix
            first_eval = {key.removeprefix("eval/"): value for key, value in first_eval.items()}
        accelerator.print(f"{name}: resuming from {restored.path} (step {start} of {cadence.total})")

    def log_eval(done: int) -> dict[str, float]:
        metrics = evaluate()
        tracker.log({f"eval/{key}": value for key, value in metrics.items()}, step=done)
        return metrics

    model.train()
    if start == 0:
        first_eval = log_eval(0)
    last_eval, train_loss = first_eval, float("nan")
    progress = tqdm(total=cadence.total, initial=start, desc=name, disable=not accelerator.is_main_process)
    window_started, window_steps = time.perf_counter(), 0
    for index in range(start, cadence.total):
        batches = micro_batches(index)
        output = step(batches, loss, weights(batches) if weights is not None else None)
        done = index + 1
        progress.update(1)
        window_steps += 1
        if cadence.log(done):
            elapsed = time.perf_counter() - window_started
            train_loss = accelerator.reduce(output.loss, "mean").item()
            metrics = {"train/loss": train_loss}
            metrics.update({f"train/{key}": accelerator.reduce(value, "mean").item() for key, value in output.stats.items()})
            if output.grad_norms.get("") is not None:
                metrics["train/grad_norm"] = float(output.grad_norms[""])
            metrics["lr"] = scheduler.get_last_lr()[0]
            metrics[f"{unit}s"] = done * units_per_step
            metrics[f"throughput/{unit}s_per_second"] = window_steps * units_per_step / max(elapsed, 1e-9)
            tracker.log(metrics, step=done)
            progress.set_postfix(loss=f"{train_loss:.3f}")
            window_started, window_steps = time.perf_counter(), 0
        # Evaluation and checkpoints are not training: their time is left out of the throughput window.
        paused = time.perf_counter()
        if cadence.evaluate(done):
            last_eval = log_eval(done)
        if cadence.save(done):
            checkpointer.save(done, model=model, optimizer=optimizer, scheduler=scheduler, tokenizer=tokenizer,
                              state={"extra": {"first_eval": first_eval}})
        window_started += time.perf_counter() - paused
    progress.close()
    return FitResult(cadence.total, first_eval, last_eval, train_loss, resumed_from)


def save_final_model(
    accelerator,
    model: torch.nn.Module,
    output_dir: Path,
    tokenizer,
    *,
    part: str = "",
    lora_save: str | None = None,
    generation_tokens: bool = False,
):
    """Collective: write the trained model as a plain Hugging Face folder with its tokenizer.

    `part` names the Hugging Face model inside the prepared module ("pretrained_model" for a
    TokenScorer, "policy" for PPO's policy-and-value). Full weights are gathered from every
    process first (`get_state_dict`: whole tensors also under FSDP and ZeRO-3). With LoRA,
    `lora_save="merged"` folds the adapter into the weights and "adapter" keeps the adapter alone.
    `generation_tokens` records the pad and EOS ids in the generation config, so `generate` stops
    at EOS. Returns the saved (unwrapped) model; under sharding with LoRA, the main process's
    rebuilt copy.
    """
    accelerator.wait_for_everyone()
    sharded = shards_parameters(accelerator)
    state_dict = accelerator.get_state_dict(model) if lora_save is None or sharded else None
    final = accelerator.unwrap_model(model)
    for attribute in filter(None, part.split(".")):
        final = getattr(final, attribute)
    if lora_save == "merged" and not sharded:
        final = final.merge_and_unload()
    if accelerator.is_main_process:
        if state_dict is not None and part:
            prefix = part + "."
            state_dict = {key.removeprefix(prefix): value for key, value in state_dict.items() if key.startswith(prefix)}
        if lora_save is not None and sharded:
            final, state_dict = lora_from_gathered(final, state_dict, lora_save)
        if generation_tokens:
            final.generation_config.pad_token_id = tokenizer.pad_token_id
            final.generation_config.eos_token_id = tokenizer.eos_token_id
        # A full disk removes the half-written folder; the stage stays resumable from its checkpoints.
        needed = tensor_bytes(state_dict.values() if state_dict is not None else final.parameters())
        with removed_when_disk_full(Path(output_dir), needed, "final model"):
            final.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
            fault_point("final:after-weights")
            tokenizer.save_pretrained(output_dir)
    return final


def lora_from_gathered(peft_model, state_dict: dict[str, torch.Tensor], lora_save: str):
    """(model to save, state dict to save it with) for a LoRA model whose weights were sharded.

    The model's own parameters are shards (FSDP2) or empty placeholders (ZeRO-3), so saving them
    would write nothing useful. "adapter": PEFT saves the adapter's entries of the gathered whole
    state dict. "merged": a whole copy is built on this process, loaded with it, and merged.
    """
    if lora_save == "adapter":
        return peft_model, state_dict
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    with whole_model_init():
        base = AutoModelForCausalLM.from_config(peft_model.get_base_model().config)
    whole = get_peft_model(base, peft_model.peft_config[peft_model.active_adapter])
    whole.load_state_dict(state_dict)
    return whole.merge_and_unload(), None
