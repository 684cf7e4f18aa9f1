"""The training core every stage shares: one optimiser step, one cadence, one loop, one final save.

    optimizer_step = prepare_training(accelerator, model, optimizer, scheduler, micro_batch_size=8, max_grad_norm=1.0)
    step = SupervisedStep(
        optimizer_step,
        micro_batches=lambda step: [...],      # this process's micro-batches of optimiser step `step`
        loss=lambda batch: (loss, {"accuracy": ...}),
    )
    result = fit("reward", accelerator, step, checkpointer, tracker, cadence,
                 evaluate=lambda: {"loss": ..., ...})   # logged as eval/<key>
    save_final_model(accelerator, model, output_dir, tokenizer)

Every stage that trains runs `fit`: pretraining, SFT and the reward model with a `SupervisedStep`,
PPO (RLOO, GRPO) with a step that is one rollout and its updates (stages/ppo). What a stage must
carry across a resume beyond model, optimiser and RNG (PPO's episode count, KL controller,
generators, selection) it registers with the `Checkpointer` as components. The benchmark in
bench/pretrain_throughput.py times this same `OptimizerStep`.

Where the distributed engines differ (backward, sharded weights, clipping), the engine object
decides (pipeline/training/distributed.py), not this loop and not the stages.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from data.packing import batch_indices
from pipeline.faults import fault_point
from pipeline.training.distributed import engine_of, whole_model_init
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
        """Backward for one micro-batch; `last` ends the optimiser step (the engine's concern: see Engine.backward)."""
        engine_of(self.accelerator).backward(loss, last)

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
    """When to log, evaluate, log samples and save, in optimiser steps (or rollouts) done, out of `total`."""

    total: int
    log_every: int
    eval_every: int
    save_every: int
    samples_every: int | None = None  # tables of sample outputs (PPO's replies), where a stage logs them

    def log(self, done: int) -> bool:
        return done % self.log_every == 0 or done == self.total

    def evaluate(self, done: int) -> bool:
        return done % self.eval_every == 0 or done == self.total

    def samples(self, done: int) -> bool:
        return self.samples_every is not None and (done % self.samples_every == 0 or done == self.total)

    def save(self, done: int) -> bool:
        """A resumable checkpoint; none at the end, where the final model is written instead."""
        return done % self.save_every == 0 and done < self.total


def require_checkpointable(accelerator, cadence: Cadence, name: str, model: torch.nn.Module | None = None) -> None:
    """Refuse, before training, a run that would write resumable checkpoints chatpipe cannot write yet.

    Under FSDP2 and DeepSpeed ZeRO a checkpoint holds the whole weights and optimiser state
    (gathered by parameter name, sharded again on resume; pipeline/training/state.py). A LoRA
    model's adapter checkpoint under those engines cannot be restored into shards yet.
    """
    engine = engine_of(accelerator)
    lora = model is not None and any(".lora_" in parameter for parameter, _ in model.named_parameters())
    if not engine.shards_optimizer or not lora or cadence.save_every >= cadence.total:
        return
    what = f"{engine.name} with LoRA"
    raise CheckpointError(
        f"{name}: resumable checkpoints are not written under {what} yet (each process holds a shard of the "
        f"optimiser state); set {name}.save_every to at least the run's {cadence.total} steps to train without "
        f"them (the final model is still saved), or launch this stage with DDP"
    )


class TrainStep(Protocol):
    """What `fit` drives: one unit of training (an optimiser step, or PPO's rollout and its updates).

    `model`, `optimizer` and `scheduler` are what checkpoints hold; `start()` runs once before the
    first evaluation; `step(index, log)` trains unit `index` and, when `log`, returns the metrics
    to log at it (a collective under several processes: every process logs at the same steps);
    `postfix(metrics)` is what the progress bar shows of them.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any

    def start(self) -> None: ...

    def step(self, index: int, log: bool) -> dict[str, float] | None: ...

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]: ...


class SupervisedStep:
    """fit's step for the supervised stages: one OptimizerStep over this process's micro-batches.

    `micro_batches(step)` gives the micro-batches of optimiser step `step`; `loss(batch)` is
    (loss, statistics); `weights(batches)` each micro-batch's loss weight (default: their mean;
    SFT weighs by loss tokens). Logs train/loss, each statistic as train/<key>, train/grad_norm, lr.
    """

    def __init__(
        self,
        optimizer_step: OptimizerStep,
        micro_batches: Callable[[int], Sequence[Any]],
        loss: Callable[[Any], tuple[torch.Tensor, dict[str, torch.Tensor]]],
        weights: Callable[[Sequence[Any]], Sequence[float]] | None = None,
    ):
        self.optimizer_step, self.micro_batches, self.loss, self.weights = optimizer_step, micro_batches, loss, weights
        self.model, self.optimizer, self.scheduler = optimizer_step.model, optimizer_step.optimizer, optimizer_step.scheduler

    def start(self) -> None:
        self.model.train()

    def step(self, index: int, log: bool) -> dict[str, float] | None:
        batches = self.micro_batches(index)
        output = self.optimizer_step(batches, self.loss, self.weights(batches) if self.weights is not None else None)
        if not log:
            return None
        reduce = self.optimizer_step.accelerator.reduce
        metrics = {"train/loss": reduce(output.loss, "mean").item()}
        metrics.update({f"train/{key}": reduce(value, "mean").item() for key, value in output.stats.items()})
        if output.grad_norms.get("") is not None:
            metrics["train/grad_norm"] = float(output.grad_norms[""])
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        return metrics

    def postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics['train/loss']:.3f}"}


@dataclass
class FitResult:
    steps: int  # the steps done: cadence.total, or fewer when on_evaluated stopped the run early
    first_eval: dict[str, float] | None
    last_eval: dict[str, float] | None
    last_logged: dict[str, float]  # the metrics of the last step logged
    resumed_from: int | None
    stopped_early_at: int | None = None

    @property
    def train_loss(self) -> float:
        return self.last_logged.get("train/loss", float("nan"))


def fit(
    name: str,
    accelerator,
    step: TrainStep,
    checkpointer: Checkpointer,
    tracker,
    cadence: Cadence,
    *,
    evaluate: Callable[[], dict[str, float]],
    units_per_step: int | None = None,
    unit: str | None = None,
    tokenizer=None,
    on_evaluated: Callable[[int, dict[str, float]], bool] | None = None,
) -> FitResult:
    """The one training loop: resume, evaluate at step 0, train `cadence.total` steps.

    `evaluate()` gives the metrics logged as eval/<key>; `on_evaluated(done, metrics)` runs
    after each evaluation (step 0 included) and returning True stops the run there (PPO's early
    stop). With `unit`, logs `<unit>s` done and `throughput/<unit>s_per_second`, which leaves
    evaluation and checkpoint time out. A crashed run resumes from the newest complete checkpoint
    at the same step with the same data ahead; the stage's own state travels in the checkpoint
    as the Checkpointer's components.
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

    def log_eval(done: int) -> tuple[dict[str, float], bool]:
        metrics = evaluate()
        tracker.log({f"eval/{key}": value for key, value in metrics.items()}, step=done)
        return metrics, on_evaluated is not None and on_evaluated(done, metrics)

    step.start()
    if start == 0:
        first_eval, _ = log_eval(0)
    last_eval, last_logged, stopped_early_at = first_eval, {}, None
    progress = tqdm(total=cadence.total, initial=start, desc=name, disable=not accelerator.is_main_process)
    window_started, window_steps = time.perf_counter(), 0
    for index in range(start, cadence.total):
        done = index + 1
        metrics = step.step(index, cadence.log(done))
        progress.update(1)
        window_steps += 1
        if metrics is not None:
            if unit is not None:
                metrics[f"{unit}s"] = done * units_per_step
                metrics[f"throughput/{unit}s_per_second"] = window_steps * units_per_step / max(time.perf_counter() - window_started, 1e-9)
            tracker.log(metrics, step=done)
            progress.set_postfix(step.postfix(metrics))
            last_logged, window_started, window_steps = metrics, time.perf_counter(), 0
        # Evaluation and checkpoints are not training: their time is left out of the throughput window.
        paused = time.perf_counter()
        if cadence.evaluate(done):
            last_eval, stop = log_eval(done)
            if stop and done < cadence.total:
                stopped_early_at = done
                break
        if cadence.save(done):
            checkpointer.save(done, model=model, optimizer=optimizer, scheduler=scheduler, tokenizer=tokenizer,
                              state={"extra": {"first_eval": first_eval}})
        window_started += time.perf_counter() - paused
    progress.close()
    return FitResult(stopped_early_at or cadence.total, first_eval, last_eval, last_logged, resumed_from, stopped_early_at)


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
    sharded = engine_of(accelerator).shards_weights
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
