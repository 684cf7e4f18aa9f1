"""The shipped configs: accelerate files load with accelerate's own loader, and every run config
validates and describes the run its comments promise (sizes, batch arithmetic, launch files).

Fast and offline: hub data sources need no files, and the model is built on the meta device.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser

from pipeline.config import RunConfig, load_config
from tests.conftest import REPO_ROOT

CONFIGS = REPO_ROOT / "configs"
ACCELERATE = CONFIGS / "accelerate"
STAGES = ("pretrain", "sft", "reward", "ppo")

# file: (distributed_type, num_processes, mixed_precision, zero stage or None)
ACCELERATE_FILES = {
    "single_process.yaml": ("NO", 1, "no", None),
    "ddp.yaml": ("MULTI_GPU", 8, "bf16", None),
    "fsdp.yaml": ("FSDP", 8, "bf16", None),
    "deepspeed_zero2.yaml": ("DEEPSPEED", 8, "bf16", 2),
    "deepspeed_zero3.yaml": ("DEEPSPEED", 8, "bf16", 3),
    "multi_node.yaml": ("MULTI_GPU", 16, "bf16", None),
}
RUN_CONFIGS = ("tiny.yaml", "gpt2-124m-8gpu.yaml", "qwen2.5-0.5b-rlhf.yaml")


@pytest.fixture(scope="module")
def run_configs() -> dict[str, RunConfig]:
    return {name: load_config(CONFIGS / name) for name in RUN_CONFIGS}


def launched_stages(config: RunConfig):
    """(stage name, its section) for every stage section present in the config."""
    for name in STAGES:
        section = getattr(config, name)
        if section is not None:
            yield name, section


def launch_args(path: Path, num_processes: int):
    """The arguments `accelerate launch --config_file PATH` ends up with, as chatpipe calls it."""
    command = ["--config_file", str(path), "--num_processes", str(num_processes), "-m", "stages.ppo", "--run-dir", "x"]
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(command))
    return args


# ------------------------------------------------------------------------------ accelerate files


def test_every_accelerate_file_is_known_to_these_tests():
    assert sorted(p.name for p in ACCELERATE.glob("*.yaml")) == sorted(ACCELERATE_FILES)


@pytest.mark.parametrize("name", sorted(ACCELERATE_FILES))
def test_accelerate_file_loads_with_accelerates_loader(name):
    distributed_type, num_processes, mixed_precision, zero_stage = ACCELERATE_FILES[name]
    config = load_config_from_file(str(ACCELERATE / name))
    assert config.distributed_type.value == distributed_type
    assert config.num_processes == num_processes
    assert config.mixed_precision == mixed_precision
    assert config.deepspeed_config.get("zero_stage") == zero_stage
    # What `accelerate launch` does with it: the file parses into launch arguments without error.
    args = launch_args(ACCELERATE / name, num_processes)
    assert args.mixed_precision == mixed_precision
    assert bool(args.use_deepspeed) == (distributed_type == "DEEPSPEED")
    assert bool(args.use_fsdp) == (distributed_type == "FSDP")


@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_deepspeed_files_clip_like_the_stages_and_offload_nothing(name):
    deepspeed = load_config_from_file(str(ACCELERATE / name)).deepspeed_config
    assert deepspeed["offload_optimizer_device"] == deepspeed["offload_param_device"] == "none"
    assert deepspeed["gradient_accumulation_steps"] == 1
    assert deepspeed["gradient_clipping"] == 1.0
    if deepspeed["zero_stage"] == 3:
        assert deepspeed["zero3_init_flag"] is True and deepspeed["zero3_save_16bit_model"] is True
        args = launch_args(ACCELERATE / name, 8)
        assert (args.zero_stage, args.zero3_init_flag, args.zero3_save_16bit_model) == (3, True, True)


def test_fsdp_file_is_v2_full_shard_with_full_state_dict_and_layer_wrapping():
    fsdp = load_config_from_file(str(ACCELERATE / "fsdp.yaml")).fsdp_config
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    assert fsdp["fsdp_cpu_ram_efficient_loading"] is True


def test_multi_node_file_starts_8_processes_on_each_of_2_machines():
    config = load_config_from_file(str(ACCELERATE / "multi_node.yaml"))
    assert (config.num_machines, config.machine_rank, config.rdzv_backend, config.same_network) == (2, 0, "static", True)
    assert config.main_process_ip and config.main_process_port
    assert config.num_processes // config.num_machines == 8


# ----------------------------------------------------------------------------------- run configs


def test_run_configs_validate_and_launch_with_shipped_accelerate_files(run_configs):
    for config_name, config in run_configs.items():
        for stage, section in launched_stages(config):
            path = section.launch.accelerate_config
            if path is None:
                continue
            where = f"{config_name} {stage}.launch.accelerate_config"
            assert Path(path).is_absolute() and Path(path).parent == ACCELERATE, where
            accelerate = load_config_from_file(path)
            assert accelerate.num_processes == section.launch.num_processes, where
            if accelerate.mixed_precision != "no":
                assert section.launch.mixed_precision == accelerate.mixed_precision, where


def test_gpt2_124m_has_124m_parameters(run_configs):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = run_configs["gpt2-124m-8gpu.yaml"]
    assert config.model.architecture == "gpt2" and config.model.base_model is None
    model_config = AutoConfig.for_model(
        config.model.architecture, **config.model.config, vocab_size=config.tokenizer.vocab_size
    )
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    parameters = sum(p.numel() for p in model.parameters())
    assert 120e6 <= parameters <= 130e6, parameters
    assert config.tokenizer.vocab_size == 50304
    assert config.pretrain.block_size == model_config.n_positions == 1024
    # Every sequence fits the 1024-token context: conversations, scored pairs, prompt + response.
    assert config.sft.max_length <= 1024 and config.reward.max_length <= 1024
    assert config.ppo.data.max_prompt_length + config.ppo.sampling.response_length <= 1024


def test_gpt2_124m_pretrains_on_half_a_million_tokens_per_step(run_configs):
    config = run_configs["gpt2-124m-8gpu.yaml"]
    pretrain = config.pretrain
    assert pretrain.data.hub == "HuggingFaceFW/fineweb-edu" and pretrain.data.hub_config == "sample-10BT"
    assert config.tokenizer.corpus.hub == pretrain.data.hub and config.tokenizer.corpus.max_rows
    tokens_per_step = (
        pretrain.per_device_batch_size * pretrain.launch.num_processes
        * pretrain.gradient_accumulation_steps * pretrain.block_size
    )
    assert tokens_per_step == pytest.approx(0.5e6, rel=0.10)
    assert pretrain.learning_rate == pytest.approx(6e-4)
    assert 0 < pretrain.warmup_steps < pretrain.max_steps


def test_qwen_run_adopts_the_base_model_and_fine_tunes_with_merged_lora(run_configs):
    config = run_configs["qwen2.5-0.5b-rlhf.yaml"]
    assert config.model.base_model == "Qwen/Qwen2.5-0.5B" and config.model.architecture == "qwen2"
    assert config.pretrain.data is None and config.tokenizer.corpus is None  # adopted, not trained
    lora = config.sft.lora
    assert (lora.r, lora.alpha, lora.save) == (64, 128, "merged")
    assert Path(config.ppo.launch.accelerate_config).name == "deepspeed_zero2.yaml"


@pytest.mark.parametrize("config_name", RUN_CONFIGS)
def test_ppo_rollout_splits_evenly_and_steps_once_per_mini_batch(run_configs, config_name):
    ppo = run_configs[config_name].ppo
    processes = ppo.launch.num_processes
    sampling, algorithm = ppo.sampling, ppo.algorithm
    assert sampling.rollout_batch_size % (processes * sampling.samples_per_prompt) == 0
    assert sampling.rollout_batch_size % algorithm.num_mini_batches == 0
    per_process_mini_batch = sampling.rollout_batch_size // processes // algorithm.num_mini_batches
    assert per_process_mini_batch >= 1
    if ppo.launch.accelerate_config is not None:
        accelerate = load_config_from_file(ppo.launch.accelerate_config)
        if accelerate.distributed_type.value == "DEEPSPEED":
            # accelerate steps the DeepSpeed engine after every backward: one micro-batch per mini-batch.
            assert algorithm.micro_batch_size == per_process_mini_batch


@pytest.mark.parametrize("config_name", ["gpt2-124m-8gpu.yaml", "qwen2.5-0.5b-rlhf.yaml"])
def test_scale_configs_read_chat_data_from_splits_with_assistant_turns(run_configs, config_name):
    config = run_configs[config_name]
    assert (config.sft.data.hub, config.sft.data.split) == ("HuggingFaceH4/ultrachat_200k", "train_sft")
    assert config.sft.validation_data.split == "test_sft"
    assert (config.reward.data.hub, config.reward.data.split) == ("HuggingFaceH4/ultrafeedback_binarized", "train_prefs")
    assert config.reward.validation_data.split == "test_prefs"
    prompts = config.ppo.data.prompts
    assert prompts.conversation_format == "messages" and prompts.split in ("train_gen", "test_gen")
    assert config.wandb.mode == "auto"


def test_a_config_hashes_the_same_after_its_round_trip_through_the_manifest(run_configs):
    """The command line hashes the config it loaded; a stage, the copy the manifest recorded (JSON,
    validated again). A default of the wrong type (an int in a float field: 64 -> 64.0) would make
    every stage look changed and rerun from scratch."""
    from pipeline.config import validate_config
    from pipeline.orchestration.registry import STAGES

    for config in [*run_configs.values(), load_config(REPO_ROOT / "configs" / "tiny.yaml")]:
        recorded = validate_config(config.model_dump(mode="json"), source="manifest")
        for spec in STAGES:
            if spec.enabled(config):
                assert spec.config_digest(recorded) == spec.config_digest(config), (config.name, spec.name)
