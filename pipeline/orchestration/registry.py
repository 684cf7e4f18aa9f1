"""The stages of a run, in order, and what each one depends on.

A stage's *config* is the slice of the run config its result depends on; its hash decides whether
a completed stage is skipped (unchanged) or rerun (changed) by `chatpipe run`. Its *inputs* are the
earlier stages whose checkpoints it consumes through the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pipeline.config import RunConfig


@dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[str, ...]
    config_slice: Callable[[RunConfig], dict[str, Any]]
    enabled: Callable[[RunConfig], bool] = lambda config: True
    choose_inputs: Callable[[RunConfig], tuple[str, ...]] | None = None

    def inputs_for(self, config: RunConfig) -> tuple[str, ...]:
        """The earlier stages whose outputs this stage reads, for this config."""
        return self.choose_inputs(config) if self.choose_inputs else self.inputs

    @property
    def module(self) -> str:
        """The module `python -m` / `accelerate launch -m` runs."""
        return f"stages.{self.name}"

    def launch(self, config: RunConfig):
        section = getattr(config, self.name, None)
        return getattr(section, "launch", None)


def _tokenizer_slice(config: RunConfig) -> dict[str, Any]:
    corpus = config.tokenizer_corpus
    return {
        "tokenizer": config.tokenizer.model_dump(exclude={"corpus"}),
        "corpus": corpus.model_dump() if corpus else None,
        "base_model": config.model.base_model,
        "revision": config.model.revision,
    }


def _pretrain_slice(config: RunConfig) -> dict[str, Any]:
    return {"seed": config.seed, "model": config.model.model_dump(), "pretrain": config.pretrain.model_dump()}


def _sft_slice(config: RunConfig) -> dict[str, Any]:
    return {"seed": config.seed, "sft": config.sft.model_dump()}


def _reward_slice(config: RunConfig) -> dict[str, Any]:
    return {"seed": config.seed, "reward": config.reward.model_dump()}


def _ppo_slice(config: RunConfig) -> dict[str, Any]:
    return {"seed": config.seed, "ppo": config.ppo.model_dump()}


def _eval_slice(config: RunConfig) -> dict[str, Any]:
    # The PPO held-out prompts eval uses arrive with PPO's output (held_out.jsonl), covered by its digest.
    return {"seed": config.seed, "eval": config.eval.model_dump()}


def _eval_inputs(config: RunConfig) -> tuple[str, ...]:
    policies = [config.policy_stage] + (["ppo"] if config.ppo is not None else [])
    return (*policies, "reward")


STAGES: tuple[StageSpec, ...] = (
    StageSpec("tokenizer", (), _tokenizer_slice),
    StageSpec("pretrain", ("tokenizer",), _pretrain_slice),
    StageSpec("sft", ("pretrain",), _sft_slice, enabled=lambda config: config.sft is not None),
    StageSpec(
        "reward",
        ("sft",),
        _reward_slice,
        enabled=lambda config: config.reward is not None,
        choose_inputs=lambda config: (config.reward.init_from,),
    ),
    StageSpec(
        "ppo",
        ("sft", "reward"),
        _ppo_slice,
        enabled=lambda config: config.ppo is not None,
        choose_inputs=lambda config: (config.policy_stage, "reward"),
    ),
    StageSpec("eval", ("sft", "ppo", "reward"), _eval_slice, enabled=lambda config: config.eval is not None,
              choose_inputs=_eval_inputs),
)
STAGE_NAMES = tuple(spec.name for spec in STAGES)


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    from pipeline.errors import ConfigError

    raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")
