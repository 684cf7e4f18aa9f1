"""Start a stage as its own process group and stream its output to the console and a log file.

One process runs as `python -m stages.<name>`. Several run under `accelerate launch` (GPUs, or any
accelerate config: DDP, FSDP, DeepSpeed) or `torchrun` (CPU processes over gloo, which
`accelerate launch --cpu` does not start); accelerate's `Accelerator` picks up either.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from pipeline.config import LaunchConfig

REPO_ROOT = Path(__file__).resolve().parent.parent


def choose_launcher(launch: LaunchConfig) -> str:
    if launch.launcher != "auto":
        return launch.launcher
    if launch.num_processes == 1 and launch.accelerate_config is None:
        return "python"
    import torch

    return "accelerate" if torch.cuda.is_available() or launch.accelerate_config else "torchrun"


def stage_command(module: str, launch: LaunchConfig, run_dir: Path) -> list[str]:
    """The command line that runs `module` for `run_dir` under the configured launcher."""
    stage_args = ["-m", module, "--run-dir", str(run_dir)]
    launcher = choose_launcher(launch)
    if launcher == "python":
        return [sys.executable, *stage_args]
    if launcher == "torchrun":
        return [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", str(launch.num_processes), *stage_args,
        ]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes)]
    if launch.accelerate_config:
        command += ["--config_file", launch.accelerate_config]
    return [*command, *stage_args]


def run_logged(command: list[str], log_path: Path, quiet: bool = False) -> int:
    """Run `command`, copying its output to `log_path` (appending) and, unless quiet, the console."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
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
