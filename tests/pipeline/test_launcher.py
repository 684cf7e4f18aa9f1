"""How a stage is started: the command line and, on a machine without GPUs, the rehearsal environment."""

import sys

import pytest

from pipeline.config import LaunchConfig
from pipeline.errors import ConfigError
from pipeline.orchestration.launcher import cpu_rehearsal, stage_launch
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
    rehearsal = cpu_rehearsal(str(ACCELERATE / f"{engine}.yaml"), 2)
    env, notes = rehearsal.env, rehearsal.notes
    assert rehearsal.machines == 1
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


def test_a_multi_node_file_is_rehearsed_as_that_many_torchrun_launches(tmp_path, monkeypatch):
    """multi_node.yaml (2 machines): one torchrun launch per machine, --nnodes 2, meeting at 127.0.0.1."""
    monkeypatch.setattr("pipeline.orchestration.launcher.has_gpu", lambda: False)
    launch = LaunchConfig(num_processes=2, accelerate_config=str(ACCELERATE / "multi_node.yaml"))
    started = stage_launch("stages.pretrain", launch, tmp_path)
    assert len(started.other_machines) == 1
    for rank, command in enumerate([started.command, *started.other_machines]):
        flags = dict(zip(command[3:13:2], command[4:13:2]))
        assert flags == {"--nnodes": "2", "--node_rank": str(rank), "--master_addr": "127.0.0.1",
                         "--master_port": flags["--master_port"], "--nproc_per_node": "1"}
        assert command[-4:] == ["-m", "stages.pretrain", "--run-dir", str(tmp_path)]
    assert started.command[10] == started.other_machines[0][10]  # one meeting point
    assert any("rehearsed as 2 torchrun launches on this one" in note for note in started.notes)
    assert "MASTER_ADDR" not in started.env and started.env["ACCELERATE_MIXED_PRECISION"] == "no"
    # num_processes counts processes on all machines, so it must split evenly over them.
    with pytest.raises(ConfigError, match="does not split over the 2 machines.*multiple of 2"):
        cpu_rehearsal(str(ACCELERATE / "multi_node.yaml"), 3)
