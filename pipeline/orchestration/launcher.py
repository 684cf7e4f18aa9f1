"""Start a stage as its own process group and stream its output to the console and a log file.

One process runs as `python -m stages.<name>`. Several run under `accelerate launch` (GPUs, or any
accelerate config: DDP, FSDP, DeepSpeed) or `torchrun` (CPU processes over gloo, which
`accelerate launch --cpu` does not start); accelerate's `Accelerator` picks up either.

An accelerate config on a machine without GPUs is a rehearsal: the processes start under
torchrun, with the environment `accelerate launch` would have given them (accelerate's own code
reads the file), adapted to CPU: gloo (pipeline/training/distributed.make_accelerator), full
precision in place of bf16 or fp16, one machine. The engine (DDP, FSDP, DeepSpeed ZeRO) is the one the file names, so an 8-GPU layout can
be tried on a laptop before the node is paid for.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import LaunchConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_launcher(launch: LaunchConfig) -> str:
    if launch.launcher != "auto":
        return launch.launcher
    if launch.num_processes == 1 and launch.accelerate_config is None:
        return "python"
    return "accelerate" if has_gpu() else "torchrun"


@dataclass
class StageLaunch:
    """How a stage starts: its command line, what to add to its environment, and notes for the user."""

    command: list[str]
    env: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def stage_launch(module: str, launch: LaunchConfig, run_dir: Path) -> StageLaunch:
    """The command (and environment) that runs `module` for `run_dir` under the configured launcher."""
    stage_args = ["-m", module, "--run-dir", str(run_dir)]
    launcher = choose_launcher(launch)
    if launcher == "python":
        return StageLaunch([sys.executable, *stage_args])
    if launcher == "torchrun":
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(launch.num_processes), *stage_args,
        ]
        if launch.accelerate_config is None:
            return StageLaunch(command)
        env, notes = cpu_rehearsal_environment(launch.accelerate_config, launch.num_processes)
        return StageLaunch(command, env, notes)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes)]
    if launch.accelerate_config:
        command += ["--config_file", launch.accelerate_config]
    return StageLaunch([*command, *stage_args])


def cpu_rehearsal_environment(config_file: str, num_processes: int) -> tuple[dict[str, str], list[str]]:
    """What `accelerate launch --config_file F` sets for each process, adapted to CPU processes.

    Returns the variables to add to the environment and a note for each adaptation. accelerate
    computes the variables (its launch parser reads the file; `prepare_multi_gpu_env` and
    `prepare_deepspeed_cmd_env` turn it into ACCELERATE_USE_FSDP, FSDP_*, ACCELERATE_USE_DEEPSPEED,
    ACCELERATE_DEEPSPEED_* ...), so a file means the same engine here as on the GPU node.
    """
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", config_file, "--num_processes", str(num_processes), "-m", "stage"])
    args, defaults, precision_from_file = _validate_launch_command(args)
    notes = []
    if args.num_machines > 1:
        notes.append(f"{config_file} describes {args.num_machines} machines; rehearsing on this one")
        args.num_machines, args.machine_rank = 1, 0
    if args.mixed_precision not in (None, "no"):
        notes.append(f"{args.mixed_precision} from {config_file} runs in fp32 (float32) on CPU")
    args.mixed_precision = "no"
    before = dict(os.environ)
    if args.use_deepspeed:
        fields = list(defaults.deepspeed_config) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        _, env = prepare_deepspeed_cmd_env(args)
        engine = f"DeepSpeed ZeRO-{args.zero_stage}"
    else:
        env = prepare_multi_gpu_env(args)
        engine = f"FSDP{getattr(args, 'fsdp_version', 1)}" if args.use_fsdp else "DDP"
    added = {key: value for key, value in env.items() if before.get(key) != value}
    added.pop("PYTHONPATH", None)  # run_logged sets it
    for key in ("MASTER_ADDR", "MASTER_PORT"):  # torchrun --standalone picks a free port itself
        added.pop(key, None)
    notes.insert(0, f"no GPU here: {engine} from {config_file} rehearsed on {num_processes} CPU processes (gloo)")
    return added, notes


def run_logged(command: list[str], log_path: Path, quiet: bool = False, env: dict[str, str] | None = None) -> int:
    """Run `command`, copying its output to `log_path` (appending) and, unless quiet, the console.

    `env`: variables added to this process's environment for the command.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        assert process.stdout is not None
        # Chunks, not lines: progress bars redraw with carriage returns.
        while chunk := process.stdout.read1(65536):
            log.write(chunk)
            log.flush()
            if not quiet:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        return process.wait()
