"""The stages of a run, in order, and what each one depends on.

A stage's *config* is the slice of the run config its result depends on; its hash decides whether
a completed stage is skipped (unchanged) or rerun (changed) by `chatpipe run`. Its *inputs* are the
earlier stages whose checkpoints it consumes through the manifest.

What is hashed identifies local data by its content, not by where it lies (`config_digest`): the
same run dir used from another checkout or machine, or copied elsewhere with its data, is still up
to date. An accelerate config file is identified by its content the same way. (Runs recorded before this
rule hashed absolute paths, so they rerun once.)
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel

from pipeline.config import DataSource, RunConfig, config_hash
from pipeline.orchestration.manifest import hash_file


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

    def config_digest(self, config: RunConfig) -> str:
        """The hash that decides whether this stage's recorded result still fits `config`.

        It is `config_hash` of the config slice with each local data path replaced by the sha256
        of the data it names, so moving the data (or the run dir) changes nothing and editing it does.
        """
        return self._digest(config, self.config_slice(config))

    def _digest(self, config: RunConfig, sliced: dict[str, Any]) -> str:
        digests = {source.path: data_digest(source) for source in data_sources(config) if source.path}
        section = sliced.get(self.name)
        launch = section.get("launch") if isinstance(section, dict) else None
        file = launch.get("accelerate_config") if isinstance(launch, dict) else None
        if file is not None and Path(file).is_file():
            # The launch layout is the file's content: a moved checkout with the same file is unchanged.
            digests[file] = "sha256:" + _file_digest(str(Path(file).resolve()), *_stamp(Path(file)))
        return config_hash(_replace_paths(sliced, digests))

    def launch_changes(self, config: RunConfig, entry) -> dict[str, tuple[Any, Any]] | None:
        """{field: (recorded, now)} when `config` differs from the stage's recorded one in its `launch`
        alone; None when something else differs too, or when nothing was recorded to compare with.

        Put the recorded launch into today's slice: if that hashes to the recorded `config_hash`,
        the launch is all that changed (data edited in place still changes the hash).
        """
        recorded = (entry.config or {}).get(self.name) if entry is not None else None
        sliced = self.config_slice(config)
        section = sliced.get(self.name)
        if not isinstance(recorded, dict) or not isinstance(section, dict) or "launch" not in section:
            return None
        before = recorded.get("launch")
        if not isinstance(before, dict):
            return None
        with_recorded = {**sliced, self.name: {**section, "launch": before}}
        if self._digest(config, with_recorded) != entry.config_hash:
            return None
        now = section["launch"]
        return {key: (before.get(key), now.get(key)) for key in sorted({*before, *now}) if before.get(key) != now.get(key)}

    def launch(self, config: RunConfig):
        section = getattr(config, self.name, None)
        return getattr(section, "launch", None)


def data_sources(value: Any) -> list[DataSource]:
    """Every DataSource in a config (or a section of one)."""
    if isinstance(value, DataSource):
        return [value]
    if isinstance(value, BaseModel):
        return [found for name in type(value).model_fields for found in data_sources(getattr(value, name))]
    if isinstance(value, (list, tuple)):
        return [found for item in value for found in data_sources(item)]
    if isinstance(value, dict):
        return [found for item in value.values() for found in data_sources(item)]
    return []


def data_digest(source: DataSource) -> str:
    """`sha256:<hex>` over the names and contents of a local source's files (a file, folder or glob)."""
    files = [Path(name) for name in source.files()]
    listing = {path.name: _file_digest(str(path.resolve()), *_stamp(path)) for path in files}
    return "sha256:" + hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()


def _stamp(path: Path) -> tuple[int, int]:
    try:
        stat = path.stat()
    except OSError:
        return (-1, -1)
    return (stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    """A data file's sha256, computed once per process while its size and mtime stay the same."""
    return hash_file(Path(path)) if size >= 0 else "missing"


def _replace_paths(value: Any, digests: dict[str, str]) -> Any:
    if isinstance(value, str):
        return digests.get(value, value)
    if isinstance(value, dict):
        return {key: _replace_paths(item, digests) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_replace_paths(item, digests) for item in value]
    return value


def _tokenizer_slice(config: RunConfig) -> dict[str, Any]:
    corpus = config.tokenizer_corpus
    return {
        "tokenizer": config.tokenizer.model_dump(exclude={"corpus"}),
        # One source hashes as it always did: a run recorded before corpora could be lists stays up to date.
        "corpus": None if not corpus else corpus[0].model_dump() if len(corpus) == 1 else [c.model_dump() for c in corpus],
        "base_model": config.model.base_model,
        "revision": config.model.revision,
    }


def _pretrain_slice(config: RunConfig) -> dict[str, Any]:
    # `compile` off hashes as before the field existed, so a run recorded then stays up to date;
    # on, it is a new result (compiled kernels round differently).
    section = config.pretrain.model_dump(exclude=set() if config.pretrain.compile else {"compile"})
    return {"seed": config.seed, "model": config.model.model_dump(), "pretrain": section}


def _sft_slice(config: RunConfig) -> dict[str, Any]:
    return {"seed": config.seed, "sft": config.sft.model_dump()}


def _dpo_slice(config: RunConfig) -> dict[str, Any]:
    values = {"seed": config.seed, "dpo": config.dpo.model_dump()}
    share = config.judges_share_of(config.dpo.data)
    if share is not None:  # DPO on the reward data leaves the judges' prompts out, as the reward model does
        values["judges_share"] = share
    return values


def _reward_slice(config: RunConfig) -> dict[str, Any]:
    values = {"seed": config.seed, "reward": config.reward.model_dump()}
    if _judges_share_reward_data(config):  # that share of the prompts is left out of the reward model's
        values["judges_share"] = config.judges.reward_share
    return values


def _judges_share_reward_data(config: RunConfig) -> bool:
    return config.reward is not None and config.judges_share_of(config.reward.data) is not None


def _judges_slice(config: RunConfig) -> dict[str, Any]:
    values = {"seed": config.seed, "judges": config.judges.model_dump()}
    if _judges_share_reward_data(config):
        values["reward_data"] = config.reward.data.model_dump()
    return values


def _ppo_slice(config: RunConfig) -> dict[str, Any]:
    ppo = config.ppo.model_dump()
    reward = config.ppo.reward
    if reward.model and reward.model_weight == 1.0 and not reward.functions:
        # No programmable reward hashes as it always did: a run recorded before them stays up to date.
        ppo["reward"] = {k: v for k, v in ppo["reward"].items() if k not in ("model", "model_weight", "functions")}
    return {"seed": config.seed, "ppo": ppo}


def _eval_slice(config: RunConfig) -> dict[str, Any]:
    # The PPO held-out prompts eval uses arrive with PPO's output (held_out.jsonl), covered by its digest.
    return {"seed": config.seed, "eval": config.eval.model_dump()}


def _judged(config: RunConfig) -> tuple[str, ...]:
    return ("judges",) if config.judges is not None else ()


def _ppo_reward(config: RunConfig) -> tuple[str, ...]:
    # With `ppo.reward.model: false` the reward functions score alone: no reward stage to wait for.
    return ("reward",) if config.ppo.reward.model else ()


def _eval_inputs(config: RunConfig) -> tuple[str, ...]:
    """The policies eval compares (SFT, then DPO's and PPO's where the config trains them), the reward model and the judges."""
    trained = [name for name, section in (("dpo", config.dpo), ("ppo", config.ppo)) if section is not None]
    return (config.policy_stage, *trained, "reward", *_judged(config))


STAGES: tuple[StageSpec, ...] = (
    StageSpec("tokenizer", (), _tokenizer_slice),
    StageSpec("pretrain", ("tokenizer",), _pretrain_slice),
    StageSpec("sft", ("pretrain",), _sft_slice, enabled=lambda config: config.sft is not None),
    StageSpec(
        "dpo",
        ("sft",),
        _dpo_slice,
        enabled=lambda config: config.dpo is not None,
        choose_inputs=lambda config: (config.policy_stage,),
    ),
    StageSpec(
        "reward",
        ("sft",),
        _reward_slice,
        enabled=lambda config: config.reward is not None,
        choose_inputs=lambda config: (config.reward.init_from,),
    ),
    StageSpec(
        "judges",
        ("pretrain",),
        _judges_slice,
        enabled=lambda config: config.judges is not None,
        choose_inputs=lambda config: (config.judges.init_from,),
    ),
    StageSpec(
        "ppo",
        ("sft", "reward", "judges"),
        _ppo_slice,
        enabled=lambda config: config.ppo is not None,
        choose_inputs=lambda config: (config.policy_stage, *_ppo_reward(config), *_judged(config)),
    ),
    StageSpec("eval", ("sft", "dpo", "ppo", "reward", "judges"), _eval_slice, enabled=lambda config: config.eval is not None,
              choose_inputs=_eval_inputs),
)
STAGE_NAMES = tuple(spec.name for spec in STAGES)


def get_stage(name: str) -> StageSpec:
    for spec in STAGES:
        if spec.name == name:
            return spec
    from pipeline.errors import ConfigError

    raise ConfigError(f"unknown stage {name!r}; stages are: {', '.join(STAGE_NAMES)}")
