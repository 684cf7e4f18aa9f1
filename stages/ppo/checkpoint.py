"""Resumable PPO state: policy, value model, optimiser, scheduler, KL controller, RNG, episode count.

    RUN_DIR/ppo/checkpoints/step-000010/
        policy/      the policy (save_pretrained; a peft adapter when training LoRA)
        value/       the value model (a sequence-classification model)
        optimizer.safetensors, optimizer.json, rng-rank*.safetensors/json, state.json

Same pickle-free format and write-then-rename as pipeline/training_state.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from pipeline.training_state import (
    checkpoint_dir,
    latest_checkpoint,
    load_model_weights,
    load_optimizer_state,
    load_rng_state,
    prune_checkpoints,
    save_optimizer_state,
    save_rng_state,
)

__all__ = ["latest_checkpoint", "load_ppo_checkpoint", "save_ppo_checkpoint"]


def split_state_dict(state_dict: dict, prefix: str) -> dict:
    return {key[len(prefix) :]: value for key, value in state_dict.items() if key.startswith(prefix)}


def save_ppo_checkpoint(root: Path, rollout: int, trainer, keep: int, extra: dict | None = None) -> Path:
    accelerator = trainer.accelerator
    final = checkpoint_dir(root, rollout)
    partial = final.with_name(final.name + ".tmp")
    if accelerator.is_main_process:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(trainer.model)
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(trainer.model)
        unwrapped.policy.save_pretrained(partial / "policy", state_dict=split_state_dict(state_dict, "policy."))
        if unwrapped.value is not None:
            unwrapped.value.save_pretrained(partial / "value", state_dict=split_state_dict(state_dict, "value."))
        save_optimizer_state(partial, trainer.optimizer, trainer.scheduler)
    save_rng_state(partial, accelerator.process_index)
    generator_file = partial / f"generator-rank{accelerator.process_index}.json"
    generator_file.write_text(json.dumps(trainer.generator.get_state().tolist()))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": rollout,
            "episode": trainer.episode,
            "kl_controller": trainer.kl_controller.state_dict(),
            "extra": extra or {},
        }
        (partial / "state.json").write_text(json.dumps(state))
        partial.rename(final)
        prune_checkpoints(root, keep)
    accelerator.wait_for_everyone()
    return final


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
