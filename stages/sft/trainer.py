"""TRL's SFTTrainer, with pickle-free resumable state and chatpipe's tracker.

Trainer checkpoints normally keep optimiser, scheduler and RNG state as `torch.save` pickles.
Here they are safetensors + JSON (pipeline/training/state.py), the same format pretraining
writes, so resuming never unpickles. FSDP and DeepSpeed keep their engines' own formats.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback
from trl import SFTTrainer

from pipeline.tracking import Tracker
from pipeline.training.state import load_optimizer_state, load_rng_state, save_optimizer_state, save_rng_state


class SafetensorsStateMixin:
    """Overrides the Trainer hooks that would pickle optimiser, scheduler and RNG state."""

    def _sharded_engine(self) -> bool:
        return bool(self.is_deepspeed_enabled or self.is_fsdp_enabled)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self._sharded_engine():
            return super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            save_optimizer_state(Path(output_dir), self.optimizer, self.lr_scheduler)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None:
            return
        if self._sharded_engine():
            return super()._load_optimizer_and_scheduler(checkpoint)
        load_optimizer_state(Path(checkpoint), self.optimizer, self.lr_scheduler)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        # The Trainer also pickles its arguments "for reference"; keep them as JSON instead.
        pickled = Path(output_dir or self.args.output_dir) / "training_args.bin"
        if pickled.exists():
            pickled.unlink()
            pickled.with_suffix(".json").write_text(self.args.to_json_string())

    def _save_rng_state(self, output_dir: str) -> None:
        save_rng_state(Path(output_dir), self.args.process_index)

    def _load_rng_state(self, checkpoint: str | None) -> None:
        if checkpoint is not None:
            load_rng_state(Path(checkpoint), self.args.process_index)


class ChatpipeSFTTrainer(SafetensorsStateMixin, SFTTrainer):
    pass


class TrackerCallback(TrainerCallback):
    """Forwards the Trainer's logs to the stage's tracker under chatpipe's metric names."""

    RENAMES = {"loss": "train/loss", "grad_norm": "train/grad_norm", "learning_rate": "lr"}

    def __init__(self, tracker: Tracker):
        self.tracker = tracker

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or not state.is_world_process_zero:
            return
        metrics = {}
        for key, value in logs.items():
            if not isinstance(value, (int, float)):
                continue
            if key.startswith("eval_"):
                metrics[f"eval/{key.removeprefix('eval_')}"] = value
            else:
                metrics[self.RENAMES.get(key, f"train/{key}")] = value
        if "eval/loss" in metrics:
            import math

            metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 50.0))
        self.tracker.log(metrics, step=state.global_step)
