"""What every stage's `__main__` shares: read the manifest, check inputs, record the outcome.

    python -m stages.pretrain --run-dir runs/tiny        # what `accelerate launch -m` runs too

`run_stage(name, train)` loads the run config recorded in the manifest, resolves and verifies the
stage's inputs, marks the stage running, calls `train(context)`, then records the output
checkpoint's hashes and final metrics (or the error) in the manifest. Every process runs it; only
the main process writes the manifest.

`plan_stage` is the one place that decides what an attempt does: skip a stage that is up to date,
resume one that crashed or failed under the same config and inputs (its folder and checkpoints are
kept), or run it from scratch in a clean folder. `chatpipe run` asks it to choose and to say what it
chose; `execute_stage` asks it again when the stage starts, so the two cannot disagree.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from pipeline.config import RunConfig, validate_config
from pipeline.errors import ChatpipeError, ConfigError, ManifestError
from pipeline.orchestration.launcher import LAUNCHED_ENV, ask_for_kill_on_parent_exit
from pipeline.orchestration.lock import hold_run_dir
from pipeline.orchestration.manifest import (
    Manifest,
    StageEntry,
    altered_files,
    now,
    output_folder,
    output_record,
    read_manifest,
    replace_stage,
    require_run,
    resolve_input,
    update_stage,
)
from pipeline.orchestration.registry import get_stage
from pipeline.orchestration.tracking import Tracker

# The packages a stage's result depends on, recorded with it (deepspeed where installed; trl is the
# benchmarks' peer only, so no stage's result depends on it).
VERSIONED_PACKAGES = ("torch", "transformers", "datasets", "peft", "accelerate", "deepspeed", "wandb", "tokenizers")


@dataclass
class StageContext:
    """Everything a stage's training function gets."""

    name: str
    run_dir: Path
    config: RunConfig
    inputs: dict[str, Path]
    input_digests: dict[str, str]
    tracker: Tracker
    is_main: bool
    world_size: int
    resuming: bool

    @property
    def stage_dir(self) -> Path:
        return self.run_dir / self.name

    @property
    def output_dir(self) -> Path:
        """Where the stage's final checkpoint goes (a plain Hugging Face folder)."""
        return self.stage_dir / "final"


@dataclass
class StageResult:
    output_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """What an attempt at a stage does, and why (the reason reads after the stage's name).

    `refuse`: going on would throw away state the user may want (checkpoints written under another
    launch, outputs the manifest does not record); the reason says what to do instead.
    """

    action: Literal["skip", "resume", "restart", "refuse"]
    reason: str

    def describe(self) -> str:
        """The line the command line prints after `chatpipe: <stage>: `."""
        if self.action == "skip":
            return f"{self.reason}, skipped"
        if self.action == "resume":
            return f"resuming from the last checkpoint ({self.reason})"
        if self.action == "refuse":
            return self.reason
        return f"{self.reason}; running from scratch"


# Launch fields that say how processes start, not what they compute: changing one restarts nothing.
RESULT_NEUTRAL_LAUNCH = frozenset({"launcher"})


def plan_stage(
    manifest: Manifest,
    name: str,
    config_digest: str,
    upstream: Iterable[str],
    run_dir: str | Path,
    requested: bool = False,
    launch_changes: dict[str, tuple[Any, Any]] | None = None,
) -> Decision:
    """Skip, resume or restart stage `name`, whose config slice now hashes to `config_digest`.

    upstream: the stages whose outputs it consumes; a changed output means its checkpoints are stale.
    requested: the user asked for this stage to run (`chatpipe stage`, `--only`, `--from`), so a
    completed stage runs again instead of being skipped.
    launch_changes: when the config differs from the recorded one in the stage's `launch` alone,
    {field: (recorded, now)} (`StageSpec.launch_changes`). A new launcher changes nothing; a new
    process count, engine or precision is a new result, but checkpoints an interrupted attempt
    wrote under the old one are not thrown away for it: that is refused, naming them.
    """
    entry = manifest.stages.get(name)
    if entry is None or entry.status == "pending":
        unrecorded = unrecorded_outputs(Path(run_dir), name)
        if unrecorded:
            return Decision("refuse", (
                f"{Path(run_dir) / name} holds {' and '.join(unrecorded)} that the manifest does not record "
                "(from a run whose manifest was lost or replaced?); chatpipe does not delete what it did not "
                f"record: move {Path(run_dir) / name} away, or delete it, and run again"
            ))
        return Decision("restart", "not run yet")
    if entry.config_hash != config_digest:
        if launch_changes is None:
            return Decision("restart", "config changed")
        changed = {key: values for key, values in launch_changes.items() if key not in RESULT_NEUTRAL_LAUNCH}
        if changed:
            checkpoint = newest_checkpoint(Path(run_dir), name)
            if entry.status in ("running", "failed") and checkpoint is not None:
                then = " ".join(f"--set {name}.launch.{key}={old}" for key, (old, _) in changed.items())
                described = ", ".join(f"launch.{key}={old} (now {new})" for key, (old, new) in changed.items())
                return Decision("refuse", (
                    f"its checkpoint {checkpoint} was written with {described}, and resuming under another "
                    f"launch would not continue the same run; resume it with {then}, or delete "
                    f"{checkpoint.parent} to start the stage over under the new launch"
                ))
            described = ", ".join(f"launch.{key} {old} -> {new}" for key, (old, new) in changed.items())
            return Decision("restart", f"its launch changed ({described})")
        # Only how the processes start changed: plan as if nothing had.
    for stage in upstream:
        recorded = entry.inputs.get(stage)
        current = manifest.stages.get(stage)
        current_digest = current.output.digest if current is not None and current.output is not None else None
        if recorded is None or recorded.digest != current_digest:
            return Decision("restart", f"its input {stage!r} changed")
    if entry.status == "failed":
        return Decision("resume", "it failed")
    if entry.status == "running":
        # Still "running" in the manifest: the process died without recording why (a kill, a lost node).
        return Decision("resume", "it was interrupted")
    if requested:
        return Decision("restart", "requested")
    if entry.output is None or not output_folder(run_dir, entry.output).is_dir():
        return Decision("restart", "its output folder is missing")
    # A corrupted checkpoint must not be handed on (or chatted with) as if it were the recorded one.
    changed = altered_files(run_dir, entry.output)
    if changed:
        return Decision("restart", f"its output was altered since it was recorded ({', '.join(changed[:3])})")
    return Decision("skip", "up to date")


def newest_checkpoint(run_dir: Path, name: str) -> Path | None:
    """The newest complete resumable checkpoint a stage's attempt left (`<stage>/checkpoints/**/step-N`)."""
    found = [path.parent for path in (run_dir / name / "checkpoints").glob("**/step-*/state.json")]
    return max(found, key=lambda path: (path.stat().st_mtime_ns, path.name)) if found else None


def unrecorded_outputs(run_dir: Path, name: str) -> list[str]:
    """What a stage folder holds that only a completed or resumable attempt writes: its final output
    (`final/`) or checkpoints. A folder with neither is what a kill right after creating it leaves."""
    stage_dir = run_dir / name
    found = []
    if (stage_dir / "final").is_dir() and any((stage_dir / "final").iterdir()):
        found.append("a final output (final/)")
    if newest_checkpoint(run_dir, name) is not None:
        found.append("checkpoints (checkpoints/)")
    return found


def run_stage(name: str, train: Callable[[StageContext], StageResult], argv: list[str] | None = None) -> None:
    """Entry point of `python -m stages.<name>`; exits non-zero with a clear message on failure."""
    parser = argparse.ArgumentParser(prog=f"python -m stages.{name}", description=f"Run the {name} stage.")
    parser.add_argument("--run-dir", required=True, help="Run directory holding manifest.json.")
    args = parser.parse_args(argv)
    stop_with_launcher()
    try:
        execute_stage(name, Path(args.run_dir), train)
    except ChatpipeError as error:
        print(f"chatpipe: {name}: {error}", file=sys.stderr)
        sys.exit(2)
    leave_process_group()


def stop_with_launcher() -> None:
    """End this stage process the moment the chatpipe launch that started it is gone.

    torchrun starts each worker in a session of its own, so a `kill -9` of the launch's process
    group does not reach the workers: they trained on, and one wrote the manifest after the kill.
    A process started by chatpipe (CHATPIPE_LAUNCHED, set by `run_logged`) asks the kernel for
    SIGKILL when its parent exits (Linux's PR_SET_PDEATHSIG; the launcher is set up the same way
    by `run_logged`), and a watchdog thread checks its parent as well where that is not available.
    A stage started by hand is left alone: its parent is a shell.
    """
    if os.environ.get(LAUNCHED_ENV) != "1":
        return
    import threading

    parent = os.getppid()
    ask_for_kill_on_parent_exit()
    if os.getppid() != parent:  # the launcher exited before the request took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="chatpipe-launcher-watchdog", daemon=True).start()


def leave_process_group() -> None:
    """End a process of a multi-process launch after its stage completed: the processes meet at a
    barrier, the process group is destroyed, and the process exits with `os._exit(0)`, without the
    interpreter's teardown (its result is recorded, its files closed, its trackers finished).

    Why not a plain exit: one of gloo's worker threads (`pt_gloo_runloop`) that lets go of a
    collective's last tensors must release their Python objects, and torch takes the GIL for that
    even while the interpreter is finalizing (it checks `Py_IsInitialized`, still true then).
    Python before 3.14 ends such a thread with `pthread_exit`, whose unwinding reaches a noexcept
    destructor, and the process aborts: "terminate called without an active exception", after its
    work is done and recorded. Destroying the group does not prevent it: gloo's threads stop only
    when the group's last reference goes, and DDP's and DeepSpeed's objects hold references that
    outlive `destroy_process_group`, so the threads run on into finalization; and the barrier
    orders only the default group's work, not that of DeepSpeed's own groups. With the exit left
    to the interpreter, tests/test_distributed.py's teardown test aborted in 9 runs of 12 (torch
    2.13, Python 3.11); a ZeRO-3 PPO stage with LoRA aborted so once in CI.

    Waits on pytorch/pytorch#190489 (torch's threads take the GIL during finalization). Python
    3.14 parks such a thread instead of unwinding it (python/cpython#87135); not tried here.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def execute_stage(name: str, run_dir: Path, train: Callable[[StageContext], StageResult]) -> StageResult:
    import torch
    from accelerate import PartialState

    # Joins the process group when launched by torchrun / accelerate. Without cpu=True accelerate
    # ignores a torchrun world on a machine without GPUs and runs every process alone.
    state = PartialState(cpu=not torch.cuda.is_available())
    run_dir = run_dir.resolve()
    # The main process writes the run dir: under its launcher's lock, or its own when started by hand.
    with hold_run_dir(run_dir, f"python -m stages.{name}") if state.is_main_process else contextlib.nullcontext():
        return _execute_stage(name, run_dir, train, state)


def _execute_stage(name: str, run_dir: Path, train: Callable[[StageContext], StageResult], state) -> StageResult:
    manifest = require_run(run_dir, read_manifest(run_dir))
    config = validate_config(manifest.config, source=f"{run_dir}/manifest.json config")
    spec = get_stage(name)
    if not spec.enabled(config):
        raise ConfigError(f"stage {name!r} has no `{name}:` section in this run's config; add one to run it")
    sliced = spec.config_slice(config)
    digest = spec.config_digest(config)
    previous = manifest.stages.get(name)
    upstreams = spec.inputs_for(config)
    decision = plan_stage(
        manifest, name, digest, upstreams, run_dir, requested=True, launch_changes=spec.launch_changes(config, previous)
    )
    if decision.action == "refuse":
        raise ManifestError(decision.reason)
    resuming = decision.action == "resume"
    stage_dir = run_dir / name
    inputs = {
        upstream: resolve_input(run_dir, manifest, upstream, verify=state.is_main_process)
        for upstream in upstreams
    }
    replacing: dict[str, StageEntry] = {}  # {"replacing": entry} when there is one; nothing otherwise
    if state.is_main_process:
        if not resuming and stage_dir.exists():
            replacing = clear_for_a_fresh_attempt(run_dir, name, previous)
        stage_dir.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

    tracker = Tracker(
        stage_dir,
        run_name=config.name,
        stage=name,
        config=sliced,
        wandb_config=config.wandb,
        run_dir=run_dir,
        is_main=state.is_main_process,
        resume_id=previous.wandb_run_id if resuming else None,
    )
    tracker.use_inputs({upstream: record.to_json() for upstream, record in inputs.items()})
    if state.is_main_process:
        update_stage(
            run_dir,
            name,
            status="running",
            config=sliced,
            config_hash=digest,
            inputs=inputs,
            output=None,
            metrics={},
            error=None,
            started_at=now(),
            finished_at=None,
            world_size=state.num_processes,
            versions=package_versions(),
            git_commit=git_commit(),
            wandb_run_id=tracker.run_id,
            log=str(log_path(run_dir, name)),
            **replacing,
        )
    context = StageContext(
        name=name,
        run_dir=run_dir,
        config=config,
        inputs={upstream: Path(record.path) for upstream, record in inputs.items()},
        input_digests={upstream: record.digest for upstream, record in inputs.items()},
        tracker=tracker,
        is_main=state.is_main_process,
        world_size=state.num_processes,
        resuming=resuming,
    )
    try:
        result = train(context)
        result.metrics.update(peak_memory(state))
    except BaseException as error:
        if state.is_main_process:
            record_failure(run_dir, name, error)
        tracker.finish(exit_code=1)
        raise
    if state.is_main_process:
        record_completion(run_dir, name, result, inputs, tracker)
    tracker.finish()
    return result


def clear_for_a_fresh_attempt(run_dir: Path, name: str, previous: StageEntry | None) -> dict[str, StageEntry]:
    """Empty the stage folder for an attempt that starts over; returns {"replacing": entry} or {}.

    A fresh attempt (new config, or a rerun of a finished stage) must not resume from checkpoints
    of an earlier one. A completed output is moved aside, not deleted, until its replacement
    exists: a rerun that fails puts it back (see restore_previous_output). An attempt that was
    itself replacing one carries that record on.
    """
    stage_dir, aside = run_dir / name, previous_output_path(run_dir, name)
    completed = previous is not None and previous.status == "completed" and previous.output is not None
    kept = previous if completed else previous.replacing if previous is not None else None
    replacing = {"replacing": kept} if kept is not None else {}
    if completed and aside.exists():
        shutil.rmtree(aside)  # left by an earlier replacement that succeeded
    # Recorded as running (and what it replaces) before the folder moves, so a kill in
    # between never leaves the manifest claiming a completed output that is gone.
    update_stage(run_dir, name, status="running", output=None, finished_at=None, **replacing)
    if kept is not None and not aside.exists():
        stage_dir.rename(aside)  # the output being replaced
    else:
        shutil.rmtree(stage_dir)  # checkpoints of an attempt that never completed
    return replacing


def record_failure(run_dir: Path, name: str, error: BaseException) -> None:
    """Mark the stage failed with its reason, and put back the output a failed rerun was replacing."""
    reason = f"{type(error).__name__}: {error}"
    try:
        entry = update_stage(run_dir, name, status="failed", error=reason, finished_at=now())
        restore_previous_output(run_dir, name, entry, reason)
    except ChatpipeError as unrecorded:  # a full disk: the error itself matters more
        print(f"chatpipe: {name}: the failure could not be recorded ({unrecorded})", file=sys.stderr)


def record_completion(run_dir: Path, name: str, result: StageResult, inputs: dict, tracker: Tracker) -> None:
    """Record the output's hashes and final metrics; only then let the output it replaces go."""
    tracker.summary(result.metrics)
    output = output_record(run_dir, result.output_dir)
    tracker.log_checkpoint(result.output_dir, name, output.digest, {"stage": name, "inputs": {
        upstream: record.digest for upstream, record in inputs.items()
    }})
    entry = update_stage(
        run_dir,
        name,
        status="completed",
        output=output,
        metrics=result.metrics,
        finished_at=now(),
        warnings=tracker.warnings,
    )
    if entry.replacing is not None:
        replace_stage(run_dir, name, entry.without_replacing())
    aside = previous_output_path(run_dir, name)
    if aside.exists():
        shutil.rmtree(aside)


def peak_memory(state) -> dict[str, float]:
    """The stage's peak memory per process, the largest over all processes, in MiB (collective).

    `peak_rss_mib`: the resident set's high-water mark (host memory); `peak_gpu_mib`: the most
    the accelerator's allocator held, where there is one; with several processes also
    `peak_rss_mib_by_process`, each one's peak RSS by rank.
    """
    import resource

    import torch
    from accelerate.utils import gather

    peaks = [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]  # KiB on Linux
    if torch.cuda.is_available():
        peaks.append(torch.cuda.max_memory_allocated() / 2**20)
    mine = torch.tensor([peaks], dtype=torch.float64, device=state.device)
    everyone = gather(mine) if state.num_processes > 1 else mine
    largest = everyone.max(dim=0).values.tolist()
    names = ["peak_rss_mib", "peak_gpu_mib"][: len(largest)]
    peaks = {name: round(value, 1) for name, value in zip(names, largest)}
    if state.num_processes > 1:  # each process's, by rank: what one process holds that the others do not
        peaks["peak_rss_mib_by_process"] = [round(value, 1) for value in everyone[:, 0].tolist()]
    return peaks


def previous_output_path(run_dir: Path, name: str) -> Path:
    """Where a completed stage's folder waits while a fresh attempt runs (`RUN_DIR/<stage>.previous`)."""
    return Path(run_dir) / f"{name}.previous"


def restore_previous_output(run_dir: Path, name: str, failed: StageEntry, reason: str) -> None:
    """After a failed fresh attempt, put back the completed output it was replacing, folder and record.

    Later stages consumed that output, so they stay valid. Without a folder set aside (the stage
    had not completed before) the failed attempt is left as it is, to resume from.
    """
    aside = previous_output_path(run_dir, name)
    previous = failed.replacing
    if previous is None or not aside.is_dir():
        return
    stage_dir = Path(run_dir) / name
    if stage_dir.exists():
        shutil.rmtree(stage_dir)
    aside.rename(stage_dir)
    restored = previous.model_copy()
    restored.error = f"a rerun failed ({reason}); the previous output was kept"
    replace_stage(run_dir, name, restored)


def resolve_mixed_precision(setting: str) -> str:
    """`auto` means bf16 on a GPU that has it, full precision elsewhere."""
    if setting != "auto":
        return setting
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def log_path(run_dir: Path, name: str) -> Path:
    """Where the launcher writes a stage's console output (outside the stage folder, which a rerun clears)."""
    return Path(run_dir) / "logs" / f"{name}.log"


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for package in ("chatpipe", *VERSIONED_PACKAGES):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return versions


def git_commit() -> str | None:
    """The commit of the chatpipe checkout running this, with `-dirty` when it has local changes."""
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
