"""How a stage is started: the command line and, on a machine without GPUs, the rehearsal environment."""

import sys

import pytest

from pipeline.config import LaunchConfig
from pipeline.orchestration.launcher import cpu_rehearsal_environment, stage_launch
from tests.conftest import REPO_ROOT

ACCELERATE = REPO_ROOT / "configs" / "accelerate"


@pytest.mark.parametrize(
    "engine, expected, absent",
    [
        ("ddp", {}, ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"]),
        ("fsdp", {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
                  "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}, ["ACCELERATE_USE_DEEPSPEED"]),
        ("deepspeed_zero2", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, ["ACCELERATE_USE_FSDP"]),
        ("deepspeed_zero3", {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                             "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true"}, ["ACCELERATE_USE_FSDP"]),
    ],
)
def test_a_shipped_accelerate_file_becomes_the_environment_accelerate_launch_would_set(engine, expected, absent):
    env, notes = cpu_rehearsal_environment(str(ACCELERATE / f"{engine}.yaml"), 2)
    assert {key: env.get(key) for key in expected} == expected
    assert not set(absent) & set(env)
    # bf16 in the file runs in fp32 on CPU, and the user is told.
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"
    assert notes[0].endswith("rehearsed on 2 CPU processes (gloo)")
    assert any("bf16 from" in note and "fp32" in note for note in notes)
    # torchrun --standalone picks its own port; CPU is not forced (that would turn every engine into DDP).
    assert "MASTER_PORT" not in env and "ACCELERATE_USE_CPU" not in env


def test_without_gpus_an_accelerate_config_starts_under_torchrun_with_that_environment(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.orchestration.launcher.has_gpu", lambda: False)
    launch = LaunchConfig(num_processes=2, accelerate_config=str(ACCELERATE / "fsdp.yaml"))
    started = stage_launch("stages.pretrain", launch, tmp_path)
    assert started.command[:4] == [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    assert started.command[-4:] == ["-m", "stages.pretrain", "--run-dir", str(tmp_path)]
    assert started.env["ACCELERATE_USE_FSDP"] == "true"
    # One process without a config runs in-line; with GPUs the config goes to accelerate launch as it is.
    assert stage_launch("stages.sft", LaunchConfig(), tmp_path).command == [sys.executable, "-m", "stages.sft", "--run-dir", str(tmp_path)]
    monkeypatch.setattr("pipeline.orchestration.launcher.has_gpu", lambda: True)
    on_gpus = stage_launch("stages.pretrain", launch, tmp_path)
    assert "accelerate.commands.launch" in on_gpus.command and on_gpus.env == {} and on_gpus.notes == []
    assert on_gpus.command[on_gpus.command.index("--config_file") + 1] == str(ACCELERATE / "fsdp.yaml")


def test_a_multi_node_file_is_rehearsed_on_this_machine(tmp_path):
    env, notes = cpu_rehearsal_environment(str(ACCELERATE / "multi_node.yaml"), 2)
    assert any("machines; rehearsing on this one" in note for note in notes)
