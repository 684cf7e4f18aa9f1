"""The run config: one YAML file that describes a whole run, validated before anything trains.

    config = load_config("configs/tiny.yaml", overrides=["pretrain.max_steps=50"])

Every section is a typed model with documented defaults; an unknown key, a wrong type or a data
file that does not exist is a `ConfigError` naming the key (and the keys allowed there) or the file.
Relative data paths resolve against the working directory, then against the config file's folder,
and are stored absolute, so a stage can later run from the recorded config alone.
"""

from __future__ import annotations

import glob
import hashlib
import importlib
import json
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.errors import ConfigError

# Below this a sampling temperature is greedy (pipeline/models/generation.py): dividing logits by it
# can overflow, and its draw is the argmax anyway. PPO and eval compute log-probs at their
# temperature, so theirs must be at least this.
GREEDY_BELOW = 1e-5


class Section(BaseModel):
    """A config section: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


class DataSource(Section):
    """Where a dataset comes from: local files (`path`) or the Hugging Face hub (`hub`)."""

    path: str | None = Field(None, description="Local file, glob or folder (.txt, .jsonl, .json, .parquet).")
    hub: str | None = Field(None, description="A `datasets` hub name, e.g. HuggingFaceFW/fineweb-edu.")
    hub_config: str | None = Field(None, description="The hub dataset's config name (subset).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    split: str = Field("train", description="Split to read.")
    format: Literal["auto", "text", "json", "parquet"] = Field("auto", description="Local file format; auto = by extension.")
    text_field: str = Field("text", description="Column holding the text (json/parquet/hub).")
    sample_by: Literal["document", "paragraph", "line"] = Field(
        "document", description="How a .txt file splits into documents."
    )
    max_rows: int | None = Field(None, ge=1, description="Read at most this many rows (for quick runs).")

    @model_validator(mode="after")
    def _one_origin(self) -> "DataSource":
        if (self.path is None) == (self.hub is None):
            raise ValueError("give exactly one of `path` (local files) or `hub` (a datasets hub name)")
        return self

    @field_validator("path")
    @classmethod
    def _resolve_path(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None:
            return None
        base_dir = (info.context or {}).get("base_dir")
        return str(resolve_data_path(path, base_dir))

    def files(self) -> list[str]:
        """The local files this source reads, sorted (a folder means every file in it)."""
        assert self.path is not None
        target = Path(self.path)
        if target.is_dir():
            return sorted(str(p) for p in target.iterdir() if p.is_file() and not p.name.startswith("."))
        return sorted(glob.glob(self.path)) or [self.path]


def resolve_data_path(path: str, base_dir: str | Path | None) -> Path:
    """Absolute path of a data file, glob or folder, or ConfigError naming where it was looked for."""
    candidates = [Path(path).expanduser()]
    if base_dir is not None and not Path(path).is_absolute():
        candidates.append(Path(base_dir) / path)
    for candidate in candidates:
        if candidate.exists() or (glob.has_magic(str(candidate)) and glob.glob(str(candidate))):
            return candidate.resolve() if candidate.exists() else Path(str(candidate.absolute()))
    tried = ", ".join(str(c.absolute()) for c in candidates)
    raise ValueError(f"data file not found: {path!r} (looked in {tried}); fix the path or create the file")


class LaunchConfig(Section):
    """How a stage's processes start. One process runs in-line; more go through accelerate or torchrun."""

    num_processes: int = Field(1, ge=1, description="Processes on this machine (one per GPU).")
    accelerate_config: str | None = Field(None, description="An accelerate config file (DDP, FSDP, DeepSpeed...).")
    launcher: Literal["auto", "python", "accelerate", "torchrun"] = Field(
        "auto", description="auto: python for one process, accelerate with GPUs, torchrun (gloo) on CPU."
    )
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = Field(
        "auto", description="auto: bf16 where the GPU supports it, otherwise fp32."
    )

    @field_validator("accelerate_config")
    @classmethod
    def _config_exists(cls, path: str | None, info: ValidationInfo) -> str | None:
        if path is None:
            return None
        return str(resolve_data_path(path, (info.context or {}).get("base_dir")))


def every(default: int, between: str, unit: str = "Steps") -> Any:
    """A cadence field (`eval_every`, `save_every`, `log_every`): optimiser steps (or PPO's rollouts) between two events."""
    return Field(default, ge=1, description=f"{unit} between {between}.")


class LaunchedStage(Section):
    """A stage section whose stage starts its own processes (every stage but the tokenizer's)."""

    launch: LaunchConfig = Field(default_factory=LaunchConfig)


class CheckpointedStage(LaunchedStage):
    """A training stage: evaluated and checkpointed (to resume from) on a cadence of optimiser steps.

    The defaults suit SFT and the reward model; a stage whose default differs overrides that field
    alone, with `every` (pretrain counts in more, shorter steps; PPO counts rollouts).
    """

    eval_every: int = every(50, "evaluations")
    save_every: int = every(100, "resumable checkpoints")
    keep_checkpoints: int = Field(2, ge=1, description="Resumable checkpoints kept on disk.")


class LoggedStage(CheckpointedStage):
    """A training stage that logs its training metrics every `log_every` steps (PPO logs every rollout)."""

    log_every: int = every(10, "logged training metrics")


class ModelConfig(Section):
    """The model architecture (trained from scratch) or an existing base model to start from."""

    architecture: str = Field("llama", description="A transformers model_type: llama, gpt2, qwen2, mistral...")
    config: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for that architecture's config.")
    base_model: str | None = Field(None, description="Hub id or local path of a base model; skips pretraining.")
    revision: str | None = Field(None, description="Hub revision of base_model.")
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Off unless you trust it.")

    @field_validator("base_model")
    @classmethod
    def _base_model_can_exist(cls, base_model: str | None) -> str | None:
        """A base model that is plainly a local path must be a model folder now; a hub id is checked when it loads."""
        if base_model is None:
            return None
        folder = Path(base_model).expanduser()
        if folder.is_dir() and not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")):
            raise ValueError(
                f"{base_model!r} is a folder without config.json, so not a model: point it at the folder "
                "save_pretrained wrote (it holds config.json), or at a hub id"
            )
        if not folder.exists() and not _could_be_hub_id(base_model):
            raise ValueError(
                f"{base_model!r} is neither a local folder (no such folder {folder.absolute()}) nor a hub id "
                "(org/name): fix the path, or name a hub model"
            )
        return base_model

    def transformers_config(self, **fields: Any):
        """The transformers config of `architecture` built from `config` (`fields` win): what pretraining builds."""
        from transformers import AutoConfig

        return AutoConfig.for_model(self.architecture, **{**self.config, **fields})

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, architecture: str) -> str:
        from transformers import CONFIG_MAPPING

        if architecture not in CONFIG_MAPPING:
            close = [name for name in CONFIG_MAPPING.keys() if architecture.lower() in name][:8]
            hint = f" (did you mean one of {close}?)" if close else " (e.g. llama, gpt2, qwen2, mistral)"
            raise ValueError(f"unknown architecture {architecture!r}: use a transformers model_type{hint}")
        return architecture

    @model_validator(mode="after")
    def _known_config_keys(self) -> "ModelConfig":
        import inspect

        from transformers import CONFIG_MAPPING

        config_class = CONFIG_MAPPING[self.architecture]
        known = set(inspect.signature(config_class.__init__).parameters) - {"self", "kwargs"}
        known |= set(getattr(config_class, "attribute_map", {}))
        unknown = sorted(set(self.config) - known)
        if unknown:
            raise ValueError(
                f"config keys {unknown} are not {self.architecture} config fields; "
                f"allowed: {', '.join(sorted(known))}"
            )
        problem = _architecture_config_problem(config_class, self.architecture, self.config)
        if problem:
            raise ValueError(problem)
        return self


def _architecture_config_problem(config_class, architecture: str, values: dict[str, Any]) -> str | None:
    """Why `values` cannot build `architecture`'s transformers config, or None: checked here so a
    bad value fails at config time, naming its key, instead of as a traceback inside pretraining.

    Each value must have the type of the field's default (an int where the default is an int...);
    then the config object is built, which runs transformers' own checks (hidden size divisible
    by the number of heads, and on recent versions the field types again).
    """
    defaults = config_class()
    expected = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    for key, value in values.items():
        default = getattr(defaults, key, None)
        kinds = expected.get(type(default))
        if kinds is None or value is None:
            continue  # no default to compare with (None, a dict, a list): transformers decides below
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            hint = ""
            if float in kinds and isinstance(value, str) and _is_number(value):
                hint = f" (YAML reads {value} as text: write it with a dot, e.g. {float(value):.1e})"
            return (
                f"model.config.{key} = {value!r} is not a valid {architecture} {key}: expected "
                f"{type(default).__name__} (like the default, {default!r}){hint}; fix it in the config or the --set"
            )
    problem = _heads_problem(config_class, defaults, values)
    if problem:
        return problem
    try:
        config_class(**values)
    except Exception as error:  # transformers raises ValueError, TypeError or its strict-dataclass errors
        reason = [line.strip().rstrip(".") for line in str(error).splitlines() if line.strip()][-1:] or [type(error).__name__]
        field = re.search(r"field '(\w+)'", str(error))
        where = f"model.config.{field.group(1)} = {values.get(field.group(1))!r}" if field else "model.config"
        return f"{where} does not build a {architecture} config: {reason[0]}; fix it in the config or the --set"
    return None


def _user_value(config_class, defaults, values: dict[str, Any], name: str) -> tuple[str, Any, bool]:
    """(the key the user wrote or would write, its value, whether model.config sets it) for a
    standard config attribute (`hidden_size`), which some architectures spell their own way
    (gpt2: n_embd) through their `attribute_map`."""
    own_name = getattr(config_class, "attribute_map", {}).get(name, name)
    for key in (name, own_name):
        if key in values:
            return key, values[key], True
    return own_name, getattr(defaults, name, None), False


def _heads_problem(config_class, defaults, values: dict[str, Any]) -> str | None:
    """Why the attention heads cannot split the hidden size, or None.

    Every head gets hidden_size / heads dimensions unless the architecture has its own head_dim
    (set in model.config, or a fixed default like qwen3's): some build the config and fail only
    when the model is built, others fail with a message about RoPE's rotary dimension.
    """
    import inspect

    head_dim = inspect.signature(config_class.__init__).parameters.get("head_dim")
    if "head_dim" in values or (head_dim is not None and head_dim.default not in (None, inspect.Parameter.empty)):
        return None
    hidden_key, hidden, _ = _user_value(config_class, defaults, values, "hidden_size")
    heads_key, heads, _ = _user_value(config_class, defaults, values, "num_attention_heads")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (hidden, heads)) or hidden % heads == 0:
        return None
    nearest = max(heads, round(hidden / heads) * heads)
    return (
        f"model.config.{hidden_key} = {hidden} is not a multiple of model.config.{heads_key} = {heads} "
        f"(each attention head gets {hidden_key} / {heads_key} dimensions): make {hidden_key} a multiple of "
        f"{heads_key} (e.g. {nearest}), or pick a {heads_key} that divides {hidden}"
    )


# Where architectures keep the most positions they embed, in the order they are looked for
# (`max_position_embeddings` first: gpt2 and others map it to their own name).
POSITION_LIMIT_NAMES = ("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx", "context_length", "max_sequence_length", "seq_length")


def position_limit(model_config) -> tuple[str, int] | None:
    """(its name in POSITION_LIMIT_NAMES, its value) of a transformers config's position limit: the
    longest sequence the model takes. None where it has none (Mamba...)."""
    for name in POSITION_LIMIT_NAMES:
        value = getattr(model_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return name, value
    return None


def _could_be_hub_id(name: str) -> bool:
    """Whether `name` has the form of a hub repo id (name or org/name); a path like ./x or /a/b/c does not."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


@contextmanager
def loading_model(key: str, name: str, holds: str = "config.json") -> Iterator[None]:
    """Load a model or tokenizer named by config key `key` inside this block: a folder that is not
    there or a hub id this machine cannot reach becomes one ConfigError saying what `name` must be,
    instead of a transformers traceback (transformers and huggingface_hub raise OSError subclasses,
    and HFValidationError for a name that is neither)."""
    from huggingface_hub.constants import HF_HUB_OFFLINE
    from huggingface_hub.errors import HFValidationError

    try:
        yield
    except (OSError, HFValidationError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[0].rstrip(".") if lines else type(error).__name__
        if HF_HUB_OFFLINE:
            how = (
                "HF_HUB_OFFLINE is set, so a hub id loads only from this machine's cache: download it there first "
                f"(`hf download {name}` where there is network), or unset HF_HUB_OFFLINE"
            )
        else:
            how = (
                f"check the name and the network; on a machine without network, download it beforehand (`hf download {name}`) "
                "and set HF_HUB_OFFLINE=1 so that it loads from the cache without minutes of retries"
            )
        raise ConfigError(
            f"{key} = {name!r} could not be loaded ({reason}). It must be a local folder with {holds}, "
            f"or a hub id reachable from this machine: {how}"
        ) from None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class WandbConfig(Section):
    """Weights & Biases tracking. The API key is never part of the config: log in or set WANDB_API_KEY."""

    mode: Literal["auto", "online", "offline", "disabled"] = Field(
        "auto", description="auto: online when logged in, offline otherwise; WANDB_MODE overrides."
    )
    project: str = Field("chatpipe", description="W&B project.")
    entity: str | None = Field(None, description="W&B team or user; default: your default entity.")
    log_checkpoints: bool = Field(True, description="Upload each stage's checkpoint as a W&B model artifact.")


class TokenizerConfig(Section):
    """The `tokenizer` stage: train a byte-level BPE tokenizer, or adopt an existing one."""

    pretrained: str | None = Field(None, description="Hub id or path of a tokenizer to use instead of training one.")
    corpus: DataSource | list[DataSource] | None = Field(
        None, description="Text to train on (one source, or several read in order); default: the pretrain data."
    )
    vocab_size: int = Field(8192, ge=300, description="Vocabulary size, special tokens included.")
    min_frequency: int = Field(2, ge=1, description="Merges seen fewer times than this are not learned.")
    max_chars: int | None = Field(None, ge=1, description="Train on at most this many characters of the corpus.")


class PretrainConfig(LoggedStage):
    """The `pretrain` stage: causal-LM pretraining from scratch on packed blocks of text."""

    data: DataSource | list[DataSource] | None = Field(
        None,
        description="The corpus: one source, or several read in order as one stream (training blocks are shuffled "
        "across all of them; the validation blocks are the stream's last, from the last source). "
        "Not needed when model.base_model is set.",
    )
    block_size: int = Field(256, ge=8, description="Tokens per packed training block.")
    validation_fraction: float = Field(0.05, gt=0, lt=1, description="Share of blocks held out for eval.")
    shard_mb: float = Field(
        64.0, gt=0, description="MB of text per token-store shard: the unit of parallel tokenization and of its resume."
    )
    per_device_batch_size: int = Field(16, ge=1, description="Blocks per process per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimiser step.")
    max_steps: int = Field(1000, ge=1, description="Optimiser steps.")
    learning_rate: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Cosine decay floor, as a fraction of the peak.")
    warmup_steps: int = Field(100, ge=0, description="Linear warmup steps.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (matrices only, not norms/biases).")
    adam_beta1: float = Field(0.9, gt=0, lt=1)
    adam_beta2: float = Field(0.95, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    eval_every: int = every(100, "evaluations")
    eval_batches: int = Field(20, ge=1, description="Validation batches per evaluation.")
    save_every: int = every(200, "resumable checkpoints")
    compile: bool = Field(
        False, description="torch.compile the model (inductor): pays on a GPU at GPT-2 size once its ~1 min of "
        "compilation is spent (bench/gpu_check.py measures both); on a CPU the compilation outlasts a short run.",
    )


# The fields a conversation row can have; `columns` maps them to a dataset's own column names.
CONVERSATION_FIELDS = ("messages", "conversations", "prompt", "response", "instruction", "input", "output", "text", "system")


class ConversationData(DataSource):
    """Conversations: a DataSource plus how its rows map to chat messages (see data/conversations.py)."""

    conversation_format: Literal["auto", "messages", "sharegpt", "prompt_response", "instruction", "hh"] = Field(
        "auto", description="Row format; auto = from the column names."
    )
    columns: dict[str, str] = Field(
        default_factory=dict, description="Our field -> your column, e.g. {prompt: question, response: answer}."
    )

    @field_validator("columns")
    @classmethod
    def _known_fields(cls, columns: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(columns) - set(CONVERSATION_FIELDS))
        if unknown:
            raise ValueError(
                f"unknown field(s) {unknown}; the fields are {', '.join(CONVERSATION_FIELDS)} (mapped to your column names)"
            )
        return columns


class LoraSettings(Section):
    """LoRA adapters through peft instead of full fine-tuning."""

    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or all-linear."
    )
    save: Literal["merged", "adapter"] = Field(
        "merged", description="merged: full weights with the adapter folded in; adapter: the adapter and a note of its base."
    )


class BadRowPolicy(Section):
    """What a stage that reads rows does with unusable ones (shared by sft, reward, ppo and eval)."""

    on_bad_row: Literal["drop", "error"] = Field("drop", description="drop: skip and count unusable rows; error: stop at the first.")
    max_bad_fraction: float = Field(0.1, ge=0, le=1, description="Fail when more than this share of rows is unusable.")


class SFTConfig(BadRowPolicy, LoggedStage):
    """The `sft` stage: supervised fine-tuning on conversations, loss on assistant tokens only."""

    data: ConversationData = Field(..., description="Training conversations.")
    validation_data: ConversationData | None = Field(None, description="Held-out conversations; default: a split of data.")
    validation_fraction: float = Field(0.05, gt=0, lt=1, description="Share held out when validation_data is unset.")
    max_length: int = Field(512, ge=8, description="Tokens per conversation.")
    overlong: Literal["truncate", "drop"] = Field("truncate", description="What to do with longer conversations.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training conversations.")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps; overrides epochs when set.")
    per_device_batch_size: int = Field(8, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate (LoRA usually wants ~10x more).")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of steps spent warming up.")
    lr_scheduler: str = Field("cosine", description="A transformers scheduler name: cosine, linear, constant...")
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    activation_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, ~20% slower.")
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters instead of all weights.")
    sample_prompts: int = Field(4, ge=0, description="Held-out prompts answered at the end (samples.jsonl).")
    sample_max_new_tokens: int = Field(64, ge=1)


class PreferenceData(DataSource):
    """Ranked completions: pairwise chosen/rejected rows or K-way rankings (see data/preferences.py)."""

    ranking_is: Literal["order", "scores"] = Field(
        "order", description="How to read a `ranking` column: a best-to-worst order, or one score per completion."
    )


class PreferenceSplit(Section):
    """Preference rows to train on and the prompts held out from them (the `reward` and `dpo` stages)."""

    data: PreferenceData = Field(..., description="Preference rows.")
    validation_data: PreferenceData | None = Field(None, description="Held-out preferences; default: a split of data.")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="Share of prompts held out when validation_data is unset.")


class PreferenceTraining(BadRowPolicy, LoggedStage):
    """How a model trains on preference groups, whole prompts with all their completions per
    micro-step: shared by the reward model, its judges and DPO."""

    max_length: int = Field(512, ge=8, description="Tokens per scored conversation (oldest context cut first).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training prompts.")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps; overrides epochs when set.")
    prompts_per_batch: int = Field(8, ge=1, description="Prompts per process per micro-step, each with all its completions.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="Cosine decay floor, as a fraction of the peak.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)


class RewardTraining(PreferenceTraining):
    """How a reward model trains: shared by the `reward` stage and the `judges` that check its policy."""

    margin: float = Field(0.0, ge=0, description="Added to every pair's margin (and to a `margin` column when present).")
    center_rewards_coefficient: float = Field(
        0.01, ge=0, description="Weight of mean(reward^2) in the loss, keeping rewards near zero."
    )
    length_balanced: bool = Field(
        False,
        description="Weigh pairs so that 'the shorter reply wins' and 'the longer reply wins' pairs count equally: "
        "length alone then predicts nothing, and the model must learn from content.",
    )
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters (merged into the saved reward model).")


class RewardConfig(PreferenceSplit, RewardTraining):
    """The `reward` stage: a scalar-head reward model trained on ranked completions."""

    init_from: Literal["sft", "pretrain"] = Field("sft", description="Which stage's model the backbone starts from.")
    ensemble: int = Field(
        1, ge=1, description="Reward models to train on the same pairs, each from its own seed; PPO can reward their "
        "mean less their disagreement (ppo.reward.ensemble_penalty)."
    )


class DPOConfig(PreferenceSplit, PreferenceTraining):
    """The `dpo` stage: the SFT policy trained directly on ranked completions, no reward model.

    The same preference files as the reward stage (pairs, K-way rankings as every ordered pair);
    each prompt's pairs average into one loss, like the reward model's. The reference's
    log-probabilities are computed once before training and cached with the run.
    """

    loss: Literal["sigmoid", "ipo", "hinge", "simpo"] = Field(
        "sigmoid", description="sigmoid: DPO; ipo: IPO's squared loss; hinge: SLiC; simpo: SimPO, reference-free "
        "(stages/dpo/losses.py)."
    )
    beta: float = Field(
        0.1, gt=0, description="How far the policy may move from the reference (sigmoid, ipo, hinge); SimPO's reward "
        "scale, which wants more (its paper: 2 to 10)."
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="sigmoid only: the share of labels taken to be flipped (conservative DPO)."
    )
    simpo_gamma: float = Field(0.5, ge=0, description="simpo only: the reward margin the chosen reply must clear.")
    learning_rate: float = Field(1e-6, gt=0, description="Peak learning rate (DPO wants ~10x less than SFT; LoRA ~10x more).")
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    lora: LoraSettings | None = Field(
        None, description="Train LoRA adapters (merged into the saved policy); the reference is the same model with the adapter off."
    )

    @model_validator(mode="after")
    def _options_fit_the_loss(self) -> "DPOConfig":
        if self.label_smoothing > 0 and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss sigmoid only, not {self.loss}; set it to 0 or use loss: sigmoid")
        if self.simpo_gamma != type(self).model_fields["simpo_gamma"].default and self.loss != "simpo":
            raise ValueError(f"simpo_gamma applies to loss simpo only, not {self.loss}; remove it or use loss: simpo")
        if self.lora is not None and self.lora.save == "adapter":
            raise ValueError("lora.save: adapter is not offered for DPO yet (its policy is saved merged); remove it or set it to merged")
        return self


class JudgesConfig(RewardTraining):
    """The `judges` stage: reward models the policy never trains against, for a verdict PPO cannot game.

    `count` judges train on preference pairs the reward model never sees (`data`, or a share of
    `reward.data` held out from the reward model), each from its own seed; a share of those pairs
    is held out from every judge too, and eval measures every reward model's accuracy there.
    Judges trained elsewhere can be added by path. PPO reports the judges' score beside the
    reward model's at each evaluation, and eval reports every win rate by each judge and by their
    mean.
    """

    count: int = Field(3, ge=0, description="Judges to train, each from its own seed.")
    data: PreferenceData | None = Field(
        None, description="Preference rows for the judges; default: a share of reward.data the reward model does not train on."
    )
    reward_share: float = Field(
        0.5, gt=0, lt=1, description="Without `data`: the share of reward.data's prompts given to the judges instead of the reward model."
    )
    validation_fraction: float = Field(
        0.25, gt=0, lt=1, description="Share of the judges' prompts held out from every judge: eval's accuracy pairs."
    )
    init_from: Literal["pretrain", "sft"] = Field(
        "pretrain", description="The backbone every judge starts from (pretrain: nothing of the SFT data's preferences in it)."
    )
    paths: list[str] = Field(default_factory=list, description="Reward models trained elsewhere (folders or hub ids) to judge with too.")

    @model_validator(mode="after")
    def _some_judge(self) -> "JudgesConfig":
        if self.count == 0 and not self.paths:
            raise ValueError("judges: set count (judges to train) or paths (judges trained elsewhere), or remove the section")
        return self


class PPOData(BadRowPolicy):
    """`ppo.data`: the prompts RL samples from, and the share held out for evaluation."""

    prompts: ConversationData = Field(..., description="Conversations; each is cut before its final assistant reply.")
    validation_fraction: float = Field(0.1, gt=0, lt=1, description="Share of prompts held out for evaluation.")
    max_prompt_length: int = Field(256, ge=4, description="Longer prompts are dropped (and counted).")


class PPOSampling(Section):
    """`ppo.sampling`: how many responses are drawn, in rollouts of what size, how long and how random."""

    total_episodes: int = Field(1024, ge=1, description="Responses generated over the whole stage.")
    rollout_batch_size: int = Field(64, ge=1, description="Responses per rollout, over all processes.")
    samples_per_prompt: int = Field(1, ge=1, description="Responses per prompt; rloo and grpo need at least 2.")
    response_length: int = Field(64, ge=1, description="Tokens generated per response at most.")
    temperature: float = Field(
        0.7, ge=GREEDY_BELOW,
        description="Sampling temperature (top_k=0, top_p=1); logprobs use the same, so it must be at least 1e-5 "
        "(below it the sampler is greedy and the logprobs overflow).",
    )


def import_reward_function(path: str, key: str = "ppo.reward.functions") -> Callable:
    """The function "package.module:name" names, imported (its module's top level runs here), or ConfigError."""
    module_name, colon, name = path.partition(":")
    if not colon or not module_name or not name:
        raise ConfigError(f"{key}: {path!r} is not \"package.module:name\" (a module path, a colon, a function name)")
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # a missing module, or one whose own code fails on import
        raise ConfigError(f"{key}: {path!r}: cannot import module {module_name!r} ({type(error).__name__}: {error}); "
                          "it must be importable from the run's working directory or an installed package") from None
    function = getattr(module, name, None)
    if not callable(function):
        raise ConfigError(f"{key}: {path!r}: module {module_name!r} has no function {name!r}")
    return function


class RewardFunctionSpec(Section):
    """One entry of `ppo.reward.functions`: a Python function that scores replies, and its weight.

    The function is `fn(prompts, replies, prompt_ids, reply_ids) -> one float per reply` (see
    reward_model/functions.py); it is imported by every process that validates the config or
    runs PPO, so it runs with the pipeline's permissions, as any code you import does.
    """

    function: str = Field(..., description='"package.module:name" of the function, importable from the run\'s working directory.')
    weight: float = Field(1.0, description="Its weight in the reward: score = model_weight * normalised model score + sum of weight * value.")

    @field_validator("function")
    @classmethod
    def _importable(cls, value: str) -> str:
        try:
            import_reward_function(value, key="function")
        except ConfigError as error:  # as a ValueError pydantic names the whole key (ppo.reward.functions.0.function)
            raise ValueError(str(error)) from None
        return value

    @property
    def name(self) -> str:
        """The name in the logs (`reward/<name>`): the function's own name."""
        return self.function.rsplit(":", 1)[-1]


class PPOReward(Section):
    """`ppo.reward`: the reward PPO maximises, the reward model's score shaped by a KL penalty to the SFT policy.

    With `functions` the score is the reward model's normalised score times `model_weight` plus each
    function's value times its weight; with `model: false` it is the functions alone, and PPO needs
    no reward stage (rloo and grpo only: ppo's value model starts from the reward model).
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: bool = Field(True, description="Score replies with the reward stage's model; false: with `functions` alone (no reward stage needed).")
    model_weight: float = Field(1.0, description="The reward model's normalised score's weight when `functions` are given too.")
    functions: list[RewardFunctionSpec] = Field(
        default_factory=list,
        description='Programmable rewards: [{function: "package.module:name", weight: 1.0}, ...], added to the model\'s score.',
    )

    normalize_scores: bool = Field(True, description="Standardise scores with the reward model's held-out mean and std.")
    score_clip: float | None = Field(None, gt=0, description="Clip normalised scores to +-this value.")
    missing_eos_penalty: Literal["none", "subtract", "replace"] = Field(
        "subtract", description="A response without EOS: subtract missing_eos_value from its score, or replace the score with it."
    )
    missing_eos_value: float = Field(1.0, description="The penalty (subtract) or the fixed score (replace), in normalised units.")
    kl_coef: float = Field(0.05, ge=0, description="beta: weight of the per-token KL penalty.")
    kl_penalty: Literal["reward", "loss"] | None = Field(
        None, description="Where the KL to the reference enters: subtracted from the reward (ppo, rloo), or added to the "
        "loss as a per-token term (grpo). None: reward for ppo and rloo, loss for grpo."
    )
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(
        None, description="k1: log p - log q (unbiased); k2: (log p - log q)^2 / 2; k3: unbiased and never negative. "
        "Used wherever the KL is measured, penalised or adapted to. None: k1 in the reward, k3 in the loss "
        "(k1 in the loss has zero expected gradient and is refused)."
    )
    adaptive_kl: bool = Field(False, description="Adapt beta toward target_kl (Ziegler et al.).")
    target_kl: float = Field(6.0, gt=0, description="Target summed KL per response for the adaptive controller.")
    kl_horizon: int = Field(10000, ge=1, description="Episodes over which the adaptive controller acts.")
    ensemble_penalty: float | None = Field(
        None, ge=0, description="With reward.ensemble >= 2: score by the members' mean minus this many standard deviations "
        "of their (standardised) scores, a conservative reward where they disagree (Coste et al., 2023). None: the first member alone."
    )
    length_correction: bool = Field(
        False,
        description="Subtract the reward model's length trend (its score's slope against reply length on held-out "
        "completions, reward_stats.json) from every score: no reward for being short or long as such.",
    )


class PPOAlgorithm(Section):
    """`ppo.algorithm`: how a rollout becomes optimiser steps.

    `estimator` picks the algorithm on the same rollouts: ppo (clipped surrogate, value model,
    GAE), rloo (k samples per prompt, leave-one-out baseline) or grpo (k samples, group-normalised
    advantages, KL as a loss term).
    """

    estimator: Literal["ppo", "rloo", "grpo"] = Field("ppo", description="ppo, rloo or grpo.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each rollout, reshuffled every time.")
    num_mini_batches: int = Field(2, ge=1, description="Optimiser steps per PPO epoch (the rollout split in this many).")
    micro_batch_size: int = Field(8, ge=1, description="Responses per forward/backward pass (gradient accumulation inside a minibatch).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Whiten advantages over the whole rollout (all processes).")
    scale_group_rewards: bool = Field(
        True, description="grpo: divide each reward's distance from its group's mean by the group's std (off: Dr. GRPO)."
    )
    importance_ratio: Literal["token", "sequence", "sequence_sum"] | None = Field(
        None, description="Where the policy ratio is formed and clipped: per token, per response as the geometric mean of "
        "its tokens' ratios (GSPO), or per response as their product (TRL's RLOO). None: token for ppo (an advantage per "
        "token), sequence for rloo and grpo (one per response; see stages/ppo/losses.py for the measurement)."
    )
    loss_aggregation: Literal["token_mean", "sequence_mean", "token_sum", "constant"] = Field(
        "token_mean", description="How per-token losses become a minibatch's loss: token mean on each process, mean of "
        "per-response means (GRPO), token mean over every process (DAPO), or sum over responses x response_length (Dr. GRPO)."
    )
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip range.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip range.")
    vf_coef: float = Field(0.1, ge=0, description="Weight of the value loss.")
    entropy_coef: float = Field(
        0.0, ge=0, description="Weight of an entropy bonus in the policy loss: keeps replies diverse (0: off)."
    )
    policy_learning_rate: float = Field(3e-6, gt=0)
    value_learning_rate: float = Field(1e-5, gt=0)
    lr_schedule: Literal["constant", "linear"] = Field("linear", description="linear: decay to 0 over the stage.")
    max_grad_norm: float = Field(1.0, gt=0)


# Where each key of the old flat `ppo` section lives now.
_PPO_GROUPS = {"data": PPOData, "sampling": PPOSampling, "reward": PPOReward, "algorithm": PPOAlgorithm}
_PPO_NEW_KEYS = {"model", "model_weight", "functions"}  # never in the flat layout: `ppo.model` is not `ppo.reward.model`
_PPO_MOVED = {key: group for group, model in _PPO_GROUPS.items() for key in model.model_fields if key not in _PPO_NEW_KEYS}


def nest_ppo_keys(values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A `ppo` section with each key of the old flat layout moved into its sub-section, and the keys moved.

    A key set both flat and nested is an error (which one was meant is not ours to guess).
    """
    flat = [key for key in values if key in _PPO_MOVED]
    values = dict(values)
    for key in flat:
        group = _PPO_MOVED[key]
        nested = values.get(group)
        nested = dict(nested) if isinstance(nested, dict) else {}
        if key in nested:
            raise ValueError(f"ppo.{key} and ppo.{group}.{key} are both set; keep ppo.{group}.{key}")
        nested[key] = values.pop(key)
        values[group] = nested
    return values, flat


class PPOConfig(CheckpointedStage):
    """The `ppo` stage: RLHF against the reward model with a KL penalty to the SFT policy.

    Four concerns, four sub-sections: `data` (which prompts), `sampling` (what a rollout draws),
    `reward` (the shaped reward) and `algorithm` (the update); the cadence, LoRA and launch stay here.
    A config written in the old flat form (`ppo.temperature`) still loads, with a warning naming
    where each key lives now (`ppo.sampling.temperature`).
    """

    data: PPOData
    sampling: PPOSampling = Field(default_factory=PPOSampling)
    reward: PPOReward = Field(default_factory=PPOReward)
    algorithm: PPOAlgorithm = Field(default_factory=PPOAlgorithm)
    eval_prompts: int = Field(64, ge=1, description="Held-out prompts scored at each evaluation.")
    eval_every: int = every(10, "evaluations", unit="Rollouts")
    save_every: int = every(10, "resumable checkpoints", unit="Rollouts")
    sample_table_every: int = every(10, "logged tables of sample responses", unit="Rollouts")
    select_by: Literal["last", "judges", "judges_length_controlled"] = Field(
        "last",
        description="The policy PPO outputs: the last one, or the one with the best held-out judges' score at an "
        "evaluation (judges: their mean score; judges_length_controlled: their length-controlled win rate against the "
        "SFT policy). Needs a judges section.",
    )
    early_stop_patience: int | None = Field(
        None, ge=1, description="Stop after this many evaluations without a better select_by figure (needs select_by)."
    )
    lora: LoraSettings | None = Field(None, description="LoRA on the policy; the reference is the same model with the adapter off.")

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_keys(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        values, moved = nest_ppo_keys(values)
        if moved:
            moves = ", ".join(f"{key} -> {_PPO_MOVED[key]}.{key}" for key in moved)
            warnings.warn(f"ppo: flat keys are the old layout; move them ({moves})", FutureWarning, stacklevel=2)
        return values

    @model_validator(mode="after")
    def _consistent(self) -> "PPOConfig":
        estimator, sampling = self.algorithm.estimator, self.sampling
        if estimator in ("rloo", "grpo") and sampling.samples_per_prompt < 2:
            raise ValueError(f"estimator {estimator} needs sampling.samples_per_prompt >= 2 (a group baseline)")
        if sampling.rollout_batch_size % sampling.samples_per_prompt:
            raise ValueError("sampling.rollout_batch_size must be a multiple of sampling.samples_per_prompt")
        if sampling.rollout_batch_size % self.algorithm.num_mini_batches:
            raise ValueError("sampling.rollout_batch_size must be a multiple of algorithm.num_mini_batches")
        if self.early_stop_patience is not None and self.select_by == "last":
            raise ValueError("early_stop_patience needs select_by (judges or judges_length_controlled): the figure that must improve")
        if self.algorithm.importance_ratio is None:
            self.algorithm.importance_ratio = "token" if estimator == "ppo" else "sequence"
        reward = self.reward
        if not reward.model and not reward.functions:
            raise ValueError("ppo.reward.model is false and ppo.reward.functions is empty: nothing would score the replies")
        if not reward.model and estimator == "ppo":
            raise ValueError("ppo.reward.model: false needs estimator rloo or grpo: ppo's value model starts from the reward model")
        if not reward.model and (reward.ensemble_penalty is not None or reward.length_correction):
            raise ValueError("ppo.reward.ensemble_penalty and length_correction need the reward model (ppo.reward.model: true)")
        names = [spec.name for spec in reward.functions]
        if len(set(names)) < len(names):
            raise ValueError(f"ppo.reward.functions: two functions share a name ({', '.join(names)}); each logs as reward/<name>")
        if reward.kl_penalty is None:
            reward.kl_penalty = "loss" if estimator == "grpo" else "reward"
        if reward.kl_estimator is None:
            reward.kl_estimator = "k3" if reward.kl_penalty == "loss" else "k1"
        if reward.kl_penalty == "loss" and reward.kl_estimator == "k1":
            raise ValueError(
                "ppo.reward.kl_estimator k1 with kl_penalty loss: as a loss term k1's expected gradient is zero, so nothing "
                "would hold the policy near the reference; use k2 or k3 there (or kl_penalty: reward)"
            )
        return self


class EvalConfig(BadRowPolicy, LaunchedStage):
    """The `eval` stage: does RLHF help? Policies compared on held-out prompts, beside the baselines that would explain a win."""

    prompts: ConversationData | None = Field(
        None, description="Held-out conversations (cut before the final reply); default: the PPO stage's held-out split."
    )
    num_prompts: int = Field(128, ge=1, description="Prompts to answer, at most.")
    samples_per_prompt: int = Field(4, ge=1, description="Replies per prompt and policy; win rates compare every pair of them.")
    max_prompt_length: int = Field(256, ge=4)
    response_length: int = Field(64, ge=1, description="Tokens per reply at most; a reply cut here is also scored completed.")
    temperature: float | None = Field(
        None, ge=GREEDY_BELOW,
        description="Sampling temperature (seeded: reruns agree); at least 1e-5, below which sampling is greedy. None: "
        "ppo.sampling.temperature (0.7 without a ppo section), the temperature PPO's KL was constrained at, so eval's KL "
        "is the one PPO kept small.",
    )
    batch_size: int = Field(16, ge=1)
    null_replies: list[str] = Field(
        default_factory=lambda: ["", "I don't know.", "I'm sorry, I can't help with that."],
        description="Fixed replies scored like a policy's: a reward model they beat rewards evasion, not help.",
    )
    bootstrap_samples: int = Field(1000, ge=100, description="Resamples of the prompts behind every interval.")
    judge_reward_model: str | None = Field(
        None, description="Deprecated: list it in judges.paths. A reward model trained elsewhere, as one more judge."
    )
    preferences: PreferenceData | None = Field(
        None,
        description="Preference pairs for every reward model's accuracy; default: the pairs the judges (else the "
        "reward model) held out. Pairs a reported model trained on are always left out, and counted.",
    )


class RunConfig(Section):
    """A whole run: the model, W&B, and one section per stage."""

    name: str = Field(..., min_length=1, description="Run name; also the W&B group.")
    seed: int = Field(0, description="Seed for data order, initialisation and sampling.")
    model: ModelConfig = Field(default_factory=ModelConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    sft: SFTConfig | None = Field(None, description="Supervised fine-tuning; the stage runs when this section is present.")
    dpo: DPOConfig | None = Field(
        None, description="Direct preference optimisation of the SFT policy; runs when this section is present."
    )
    reward: RewardConfig | None = Field(None, description="Reward model training; runs when this section is present.")
    judges: JudgesConfig | None = Field(
        None, description="Judge reward models the policy never trains against; runs when this section is present."
    )
    ppo: PPOConfig | None = Field(None, description="RLHF against the reward model; runs when this section is present.")
    eval: EvalConfig | None = Field(None, description="Evaluation of the policies; runs last when this section is present.")

    @model_validator(mode="after")
    def _pretrain_has_data(self) -> "RunConfig":
        if self.model.base_model is None and self.pretrain.data is None:
            raise ValueError("pretrain.data is required unless model.base_model names a model to start from")
        if self.model.base_model is None and self.tokenizer.pretrained is None and self.tokenizer_corpus is None:
            raise ValueError("tokenizer.corpus (or pretrain.data) is required to train a tokenizer")
        return self

    @model_validator(mode="after")
    def _reward_source_exists(self) -> "RunConfig":
        if self.reward is not None and self.reward.init_from == "sft" and self.sft is None:
            raise ValueError("reward.init_from is sft but there is no sft section; add one or set reward.init_from: pretrain")
        if self.ppo is not None and self.ppo.reward.model and self.reward is None:
            raise ValueError("ppo needs a reward section: PPO optimises against the reward model it trains "
                             "(or set ppo.reward.model: false and score with ppo.reward.functions alone)")
        if self.eval is not None and self.reward is None:
            raise ValueError("eval needs a reward section: the reward model judges the policies")
        if self.eval is not None and self.eval.prompts is None and self.ppo is None:
            raise ValueError("eval.prompts is required when there is no ppo section to take held-out prompts from")
        if self.judges is not None and self.judges.count > 0 and self.judges.data is None and self.reward is None:
            raise ValueError("judges.data is required when there is no reward section to take a share of preferences from")
        if self.judges is not None and self.judges.init_from == "sft" and self.sft is None:
            raise ValueError("judges.init_from is sft but there is no sft section; add one or set judges.init_from: pretrain")
        if self.ppo is not None and self.ppo.reward.ensemble_penalty is not None and (self.reward is None or self.reward.ensemble < 2):
            raise ValueError("ppo.reward.ensemble_penalty needs reward.ensemble of at least 2: the members whose disagreement it penalises")
        if self.ppo is not None and self.ppo.select_by != "last" and self.judges is None:
            raise ValueError(f"ppo.select_by: {self.ppo.select_by} needs a judges section (the judges pick the policy)")
        return self

    @model_validator(mode="after")
    def _eval_samples_as_ppo_did(self) -> "RunConfig":
        if self.eval is not None and self.eval.temperature is None:
            sampling = self.ppo.sampling if self.ppo is not None else PPOSampling()
            self.eval.temperature = sampling.temperature
        return self

    @model_validator(mode="after")
    def _sequences_fit_the_model(self) -> "RunConfig":
        if self.model.base_model is None:  # a base model's limit is known when it loads: the pretrain stage checks it
            problems = sequence_length_problems(self, self.model.transformers_config(), source=None)
            if problems:
                raise ValueError("\n  ".join(problems))
        return self

    @property
    def sequence_lengths(self) -> list[tuple[list[str], list[int]]]:
        """The longest sequence each stage feeds the model, as (the keys, their values) that add up to it."""
        lengths = []
        if self.model.base_model is None:
            lengths.append((["pretrain.block_size"], [self.pretrain.block_size]))
        trained_judges = self.judges if self.judges is not None and self.judges.count > 0 else None
        for name, section in (("sft", self.sft), ("dpo", self.dpo), ("reward", self.reward), ("judges", trained_judges)):
            if section is not None:
                lengths.append(([f"{name}.max_length"], [section.max_length]))
        if self.ppo is not None:
            lengths.append((["ppo.data.max_prompt_length", "ppo.sampling.response_length"],
                            [self.ppo.data.max_prompt_length, self.ppo.sampling.response_length]))
        if self.eval is not None:
            lengths.append((["eval.max_prompt_length", "eval.response_length"], [self.eval.max_prompt_length, self.eval.response_length]))
        return lengths

    def judges_share_of(self, data: "PreferenceData") -> float | None:
        """The share of `data`'s prompts the judges take (judges.reward_share) when they train on a
        share of the reward data and `data` is that data: the reward stage, and DPO on the same
        file, leave those prompts out, so nothing the judges or eval hold out is trained on. None otherwise."""
        judges = self.judges
        if judges is None or judges.count == 0 or judges.data is not None or self.reward is None or data != self.reward.data:
            return None
        return judges.reward_share

    @property
    def policy_stage(self) -> str:
        """The stage whose model RL starts from: the SFT policy when there is one."""
        return "sft" if self.sft is not None else "pretrain"

    @property
    def tokenizer_corpus(self) -> list[DataSource] | None:
        """The tokenizer's corpus as a list of sources read in order (None: nothing to train on)."""
        return corpus_sources(self.tokenizer.corpus or self.pretrain.data)


def sequence_length_problems(config: RunConfig, model_config, source: str | None) -> list[str]:
    """What in `config` is longer than the model built from `model_config` takes, one line each.

    Past its last position a model with learned position embeddings (gpt2) fails with an IndexError
    at the first forward pass, and a rotary one (llama) runs on positions it never learned.
    `source`: the base model the limit comes from, or None for the one built from model.config.
    """
    limit = position_limit(model_config)
    if limit is None:
        return []
    name, most = limit
    if source is not None:
        own_name = getattr(model_config, "attribute_map", {}).get(name, name)
        where, fix = f"model.base_model {source!r} has {own_name} = {most}", ""
    else:
        key, _, is_set = _user_value(type(model_config), model_config, config.model.config, name)
        default = "" if is_set else f" (the {config.model.architecture} default)"
        where, fix = f"model.config.{key} = {most}{default}", f" or raise model.config.{key}"
    problems = []
    for keys, values in config.sequence_lengths:
        total = sum(values)
        if total <= most:
            continue
        if len(keys) == 1:
            what, lower = f"{keys[0]} = {total}", f"lower {keys[0]} to at most {most}"
        else:
            what = f"{' + '.join(keys)} = {' + '.join(map(str, values))} = {total}"
            lower = f"lower {' or '.join(keys)} so that their sum is at most {most}"
        problems.append(f"{what} is more tokens than the model has positions: {where}; {lower}{fix}")
    return problems


def check_sequence_lengths(config: RunConfig, model_config) -> None:
    """ConfigError unless every sequence the run's stages feed a base model fits its positions (see
    sequence_length_problems): checked by the stage that loads the base model, whose limit a config
    naming a hub id cannot know."""
    problems = sequence_length_problems(config, model_config, source=config.model.base_model)
    if problems:
        raise ConfigError("\n".join(problems))


def corpus_sources(data: DataSource | list[DataSource] | None) -> list[DataSource] | None:
    """A corpus setting (one source or a list) as a list of sources; None stays None."""
    if data is None:
        return None
    return list(data) if isinstance(data, list) else [data]


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """Read, override and validate a run config file (and the config it `extends`, if any)."""
    path = Path(path)
    raw = read_config_file(path)
    for override in overrides:
        apply_override(raw, override)
    return validate_config(raw, source=str(path), base_dir=path.parent)


def read_config_file(path: Path, extended_by: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping, on top of the one it names in `extends:` (a path relative to
    it): `extends: tiny.yaml` and a `dpo:` section is the demo with a DPO stage. Mappings merge
    key by key; a list, a value or null replaces the base's (`ppo: null` drops its ppo section)."""
    try:
        raw = read_yaml(path.read_text())
    except FileNotFoundError:
        by = f" (extended by {extended_by[-1]})" if extended_by else ""
        raise ConfigError(f"{path}: config file not found{by}") from None
    except DuplicateKeyError as error:
        raise ConfigError(
            f"{path}, line {error.line}: key {error.key!r} is given twice in one mapping (first at line {error.first_line}); "
            "YAML would keep only the later value without a word: delete one of them"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections (name, model, tokenizer, pretrain...)")
    base = raw.pop("extends", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{path}: extends: expected the path of another config, relative to {path.parent}; got {base!r}")
    base_path = path.parent / base
    chain = (*extended_by, path)
    if base_path.resolve() in {link.resolve() for link in chain}:
        raise ConfigError(f"{path}: extends {base}, which extends it in turn ({' -> '.join(map(str, (*chain, base_path)))}); "
                          "a config may extend another only once along a chain")
    return merged_config(read_config_file(base_path, chain), raw)


def merged_config(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """`override` on top of `base`: mappings merge key by key; anything else replaces."""
    result = dict(base)
    for key, value in override.items():
        both_mappings = isinstance(value, dict) and isinstance(result.get(key), dict)
        result[key] = merged_config(result[key], value) if both_mappings else value
    return result


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that gives the same key twice (lines are 1-based)."""

    def __init__(self, key: Any, line: int, first_line: int):
        super().__init__(f"line {line}: key {key!r} is given twice in one mapping (first at line {first_line})")
        self.key, self.line, self.first_line = key, line, first_line


class UniqueKeyLoader(yaml.SafeLoader):
    """yaml's safe loader, except that a key given twice in one mapping is an error: plain YAML
    keeps the later value, so `max_steps: 40` followed by `max_steps: 400` would silently train 400."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<:` keys may be overridden on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise DuplicateKeyError(key, key_node.start_mark.line + 1, seen[key] + 1)
                seen[key] = key_node.start_mark.line
            except TypeError:  # an unhashable key: the base loader says what is wrong with it
                continue
        return super().construct_mapping(node, deep=deep)


def read_yaml(text: str) -> Any:
    """Parse YAML as yaml.safe_load does, refusing duplicate keys (DuplicateKeyError)."""
    return yaml.load(text, Loader=UniqueKeyLoader)


def validate_config(raw: dict[str, Any], source: str = "<config>", base_dir: str | Path | None = None) -> RunConfig:
    try:
        return RunConfig.model_validate(raw, context={"base_dir": base_dir})
    except ValidationError as error:
        raise ConfigError(f"{source}: invalid config\n" + _describe(error)) from None


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply `section.key=value` (value parsed as YAML) to a raw config mapping, in place."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {override!r}: expected section.key=value, e.g. pretrain.max_steps=100")
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {override!r}: {part!r} is a value, not a section")
        node = child
    try:
        node[leaf] = read_yaml(value)
    except yaml.YAMLError as error:
        problem = str(getattr(error, "problem", None) or error).strip()
        raise ConfigError(
            f"--set {override!r}: the value {value!r} is not valid YAML ({problem}); "
            f"quote it to pass it as a string, e.g. --set '{key.strip()}=\"{value}\"'"
        ) from None


def config_hash(data: Any) -> str:
    """Stable hash of a JSON-able value (sorted keys): equal configs hash equal."""
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _describe(error: ValidationError) -> str:
    lines = []
    for item, loc in _relevant_errors(error.errors()):
        location = ".".join(str(part) for part in loc) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            message = f"unknown key; allowed here: {', '.join(allowed)}"
        elif item["type"] == "missing":
            message = "required key is missing"
        elif "input" in item and item["type"] not in ("value_error",) and not isinstance(item["input"], dict):
            message = f"{message} (got {item['input']!r})"
        lines.append(f"  {location}: {message}")
    return "\n".join(lines)


def _relevant_errors(errors: list[dict]) -> list[tuple[dict, tuple]]:
    """Each error with its location as the user wrote it, leaving out the branch of a union the input was not.

    A field that is one thing or a list of them (`pretrain.data`) fails in both branches: pydantic
    names them in the location (`function-after[...]`, `list[...]`) and reports a wrong type for the
    branch the input does not fit. That type error is dropped when the other branch says more.
    """
    def user_location(loc) -> tuple:
        return tuple(part for part in loc if not (isinstance(part, str) and "[" in part))

    located = [(item, user_location(item["loc"])) for item in errors]
    kept = []
    for item, loc in located:
        wrong_type = item["type"] in ("model_type", "dict_type", "list_type", "model_attributes_type")
        deeper = any(len(other) > len(loc) and other[: len(loc)] == loc for _, other in located)
        if not (wrong_type and deeper):
            kept.append((item, loc))
    return kept


def _allowed_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = RunConfig
    for part in loc:
        if isinstance(part, int):  # an item of a list: the same model as the list's
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return []
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nested = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not nested:
            return []
        model = nested[0]
    return sorted(model.model_fields)
