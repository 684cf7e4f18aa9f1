"""Resumable PPO state: policy, value model, optimiser, scheduler, KL controller, RNG, episode count.

    RUN_DIR/ppo/checkpoints/step-000010/
        policy/      the policy (save_pretrained; a peft adapter when training LoRA)
        value/       the value model (a sequence-classification model)
        optimizer.safetensors, optimizer.json, rng-rank*.safetensors/json, state.json

Same pickle-free format and write-then-rename as pipeline/training_state.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.training_state import (
    checkpoint_dir,
    latest_checkpoint,
    load_model_weights,
    load_optimizer_state,
    load_rng_state,
    save_optimizer_state,
    writing_checkpoint,
)

__all__ = ["latest_checkpoint", "load_ppo_checkpoint", "save_ppo_checkpoint"]


def split_state_dict(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def save_ppo_checkpoint(root: Path, rollout: int, trainer, keep: int, extra: dict | None = None) -> Path:
    """Collective: every process calls it."""
    accelerator = trainer.accelerator
    state = {"episode": trainer.episode, "kl_controller": trainer.kl_controller.state_dict(), "extra": extra or {}}
    with writing_checkpoint(root, rollout, accelerator, state, keep) as folder:
        state_dict = accelerator.get_state_dict(trainer.model)
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(trainer.model)
            unwrapped.policy.save_pretrained(folder / "policy", state_dict=split_state_dict(state_dict, "policy."))
            if unwrapped.value is not None:
                unwrapped.value.save_pretrained(folder / "value", state_dict=split_state_dict(state_dict, "value."))
            save_optimizer_state(folder, trainer.optimizer, trainer.scheduler)
        generator_file = folder / f"generator-rank{accelerator.process_index}.json"
        generator_file.write_text(json.dumps(trainer.generator.get_state().tolist()))
    return checkpoint_dir(root, rollout)


def load_ppo_checkpoint(path: Path, trainer) -> dict:
    accelerator = trainer.accelerator
    path = Path(path)
    unwrapped = accelerator.unwrap_model(trainer.model)
    load_model_weights(path / "policy", unwrapped.policy)
    if unwrapped.value is not None:
        load_model_weights(path / "value", unwrapped.value.pretrained_model)
    load_optimizer_state(path, trainer.optimizer, trainer.scheduler)
    load_rng_state(path, accelerator.process_index)
    generator_file = path / f"generator-rank{accelerator.process_index}.json"
    if generator_file.exists():
        trainer.generator.set_state(torch.tensor(json.loads(generator_file.read_text()), dtype=torch.uint8))
    state = json.loads((path / "state.json").read_text())
    trainer.episode = state["episode"]
    trainer.kl_controller.load_state_dict(state["kl_controller"])
    return state
