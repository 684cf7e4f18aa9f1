"""Start a stage as its own process group and stream its output to the console and a log file.

One process runs as `python -m stages.<name>`. Several run under `accelerate launch` (GPUs, or any
accelerate config: DDP, FSDP, DeepSpeed) or `torchrun` (CPU processes over gloo, which
`accelerate launch --cpu` does not start); accelerate's `Accelerator` picks up either.

An accelerate config on a machine without GPUs is a rehearsal: the processes start under
torchrun, with the environment `accelerate launch` would have given them (accelerate's own code
reads the file), adapted to CPU: gloo (pipeline/training/distributed.make_accelerator), full
precision in place of bf16 or fp16. The engine (DDP, FSDP, DeepSpeed ZeRO) is the one the file
names, so an 8-GPU layout can be tried on a laptop before the node is paid for. A file for several
machines is rehearsed as several machines: one torchrun launch per machine (`--nnodes N
--node_rank i`), all on this one, meeting at 127.0.0.1 as real nodes meet at the main machine.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import LaunchConfig
from pipeline.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent
# Set in every process chatpipe launches: a stage process then ends when its launcher does
# (pipeline/orchestration/stage.stop_with_launcher).
LAUNCHED_ENV = "CHATPIPE_LAUNCHED"
PR_SET_PDEATHSIG = 1


def ask_for_kill_on_parent_exit() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it exits (PR_SET_PDEATHSIG).

    It holds across exec, so `run_logged` sets it in each launched command (torchrun, accelerate,
    python) between fork and exec (libc is loaded beforehand: nothing is imported in the child),
    and each stage process sets it for itself. Elsewhere than Linux it does nothing.
    """
    prctl = _prctl()
    if prctl is not None:
        prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)  # 9: SIGKILL


@functools.cache
def _prctl():
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


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
    other_machines: list[list[str]] = field(default_factory=list)  # rehearsed machines 1..N-1, started alongside


def stage_launch(module: str, launch: LaunchConfig, run_dir: Path) -> StageLaunch:
    """The command (and environment) that runs `module` for `run_dir` under the configured launcher."""
    stage_args = ["-m", module, "--run-dir", str(run_dir)]
    launcher = choose_launcher(launch)
    if launcher == "python":
        return StageLaunch([sys.executable, *stage_args])
    if launcher == "torchrun":
        if launch.accelerate_config is None:
            return StageLaunch(torchrun(launch.num_processes, stage_args))
        rehearsal = cpu_rehearsal(launch.accelerate_config, launch.num_processes)
        if rehearsal.machines == 1:
            return StageLaunch(torchrun(launch.num_processes, stage_args), rehearsal.env, rehearsal.notes)
        port = free_port()
        commands = [
            torchrun(launch.num_processes // rehearsal.machines, stage_args, machines=rehearsal.machines, rank=rank, port=port)
            for rank in range(rehearsal.machines)
        ]
        return StageLaunch(commands[0], rehearsal.env, rehearsal.notes, commands[1:])
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(launch.num_processes)]
    if launch.accelerate_config:
        command += ["--config_file", launch.accelerate_config]
    return StageLaunch([*command, *stage_args])


def torchrun(processes: int, stage_args: list[str], *, machines: int = 1, rank: int = 0, port: int | None = None) -> list[str]:
    """A torchrun command line: standalone on one machine, or machine `rank` of `machines` meeting at 127.0.0.1:`port`."""
    command = [sys.executable, "-m", "torch.distributed.run"]
    if machines == 1:
        command.append("--standalone")
    else:
        command += ["--nnodes", str(machines), "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [*command, "--nproc_per_node", str(processes), *stage_args]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the rehearsed machines' meeting point)."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class CpuRehearsal:
    """A GPU layout adapted to CPU processes: environment to add, notes for the user, machines to rehearse."""

    env: dict[str, str]
    notes: list[str]
    machines: int


def cpu_rehearsal(config_file: str, num_processes: int) -> CpuRehearsal:
    """What `accelerate launch --config_file F` sets for each process, adapted to CPU processes.

    Returns the variables to add to the environment, a note for each adaptation, and how many
    machines the file describes (each rehearsed by its own torchrun launch). accelerate
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
    machines = args.num_machines or 1
    if machines > 1:
        if num_processes % machines:
            raise ConfigError(
                f"launch.num_processes={num_processes} does not split over the {machines} machines of {config_file}: "
                f"it counts processes on all machines, so use a multiple of {machines}"
            )
        notes.append(
            f"{config_file} describes {machines} machines: rehearsed as {machines} torchrun launches on this one "
            f"(--nnodes {machines}, {num_processes // machines} process(es) each, meeting at 127.0.0.1)"
        )
        args.num_machines, args.machine_rank = 1, 0  # each launch's environment; torchrun says which machine it is
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
    return CpuRehearsal(added, notes, machines)


def run_logged(
    command: list[str], log_path: Path, quiet: bool = False, env: dict[str, str] | None = None,
    alongside: list[list[str]] | None = None,
) -> int:
    """Run `command`, copying its output to `log_path` (appending) and, unless quiet, the console.

    `env`: variables added to this process's environment for the command. `alongside`: commands
    started with it (the other machines of a multi-machine rehearsal), each logging to
    `<log>.machine<i>.log`; the result is the first non-zero exit code of them all. If `command`
    fails, those still running after a grace period are stopped. Every command is killed when this
    process ends, however it ends, and takes its own workers with it (LAUNCHED_ENV).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1", LAUNCHED_ENV: "1"}
    _prctl()  # loaded here, not in the forked child
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    others = []
    for index, other in enumerate(alongside or [], start=1):
        with open(log_path.with_name(f"{log_path.stem}.machine{index}.log"), "ab") as other_log:
            other_log.write(f"$ {' '.join(other)}\n".encode())
            other_log.flush()
            others.append(subprocess.Popen(
                other, stdout=other_log, stderr=subprocess.STDOUT, env=env, preexec_fn=ask_for_kill_on_parent_exit
            ))
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, preexec_fn=ask_for_kill_on_parent_exit
        )
        assert process.stdout is not None
        # Chunks, not lines: progress bars redraw with carriage returns.
        while chunk := process.stdout.read1(65536):
            log.write(chunk)
            log.flush()
            if not quiet:
                sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()
        codes = [process.wait()]
    for other in others:
        try:
            codes.append(other.wait(timeout=None if codes[0] == 0 else 60))
        except subprocess.TimeoutExpired:
            other.terminate()
            codes.append(other.wait())
    return next((code for code in codes if code != 0), 0)
