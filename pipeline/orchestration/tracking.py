"""Metric logging for every stage: a local `metrics.jsonl` always, Weights & Biases when enabled.

One W&B run per stage, grouped by the run name, `job_type` = the stage, the stage's resolved
config as the run config. Each stage's checkpoint is logged as a `model` artifact aliased with its
content digest, and online runs `use` their inputs' artifacts, so the dashboard's artifact graph
shows tokenizer -> pretrain -> sft -> reward -> ppo. (W&B cannot record artifact use in offline
mode; offline runs carry their inputs' digests in the run config instead.)

The mode comes from the config (`wandb.mode`), then `WANDB_MODE`, and `auto` means online when an
API key is available and offline otherwise. The key itself is never read into, or written with,
anything chatpipe records. Only the main process creates a tracker that writes; the others get a
silent one.
"""

from __future__ import annotations

import json
import netrc
import os
import re
from pathlib import Path
from typing import Any

from pipeline.config import WandbConfig

WANDB_MODES = ("online", "offline", "disabled")
METRICS_NAME = "metrics.jsonl"


def resolve_wandb_mode(config: WandbConfig) -> str:
    """online / offline / disabled, from the config, WANDB_MODE, and whether a key is available."""
    if config.mode == "disabled":
        return "disabled"
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode == "dryrun":
        env_mode = "offline"
    if env_mode in WANDB_MODES:
        return env_mode
    if config.mode != "auto":
        return config.mode
    return "online" if _has_wandb_credentials() else "offline"


def _has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


class Tracker:
    """Logs a stage's metrics. `log` is cheap and safe to call on every process."""

    def __init__(
        self,
        stage_dir: Path,
        *,
        run_name: str,
        stage: str,
        config: dict[str, Any],
        wandb_config: WandbConfig,
        run_dir: Path,
        is_main: bool,
        resume_id: str | None = None,
    ):
        self.is_main = is_main
        self.run_name = run_name
        self.log_artifacts = wandb_config.log_checkpoints
        self.warnings: list[str] = []
        self.metrics_path = Path(stage_dir) / METRICS_NAME
        self.mode = resolve_wandb_mode(wandb_config) if is_main else "disabled"
        self._wandb_run = None
        if not is_main:
            return
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if self.mode != "disabled":
            import wandb

            self._wandb_run = wandb.init(
                project=wandb_config.project,
                entity=wandb_config.entity,
                group=run_name,
                job_type=stage,
                name=f"{run_name}-{stage}",
                config=config,
                dir=str(run_dir),
                mode=self.mode,
                id=resume_id,
                resume="allow" if resume_id else None,
            )

    def artifact_name(self, stage: str) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "-", f"{self.run_name}-{stage}")

    def use_inputs(self, inputs: dict[str, dict]) -> None:
        """Record which upstream checkpoints (by digest) this stage consumed."""
        if self._wandb_run is None or not inputs:
            return
        self._wandb_run.config.update({"inputs": {name: record["digest"] for name, record in inputs.items()}}, allow_val_change=True)
        if self.mode != "online":
            return
        for name, record in inputs.items():
            try:
                self._wandb_run.use_artifact(f"{self.artifact_name(name)}:{record['digest']}")
            except Exception as error:  # e.g. the upstream stage ran with W&B disabled
                self.warnings.append(f"W&B: no artifact for input {name!r} ({error}); lineage edge skipped")

    def log_checkpoint(self, folder: Path, stage: str, digest: str, metadata: dict[str, Any]) -> None:
        """The stage's output folder as a `model` artifact, aliased with its content digest."""
        if self._wandb_run is None or not self.log_artifacts:
            return
        import wandb

        artifact = wandb.Artifact(self.artifact_name(stage), type="model", metadata={"digest": digest, **metadata})
        artifact.add_dir(str(folder))
        self._wandb_run.log_artifact(artifact, aliases=["latest", digest])

    @property
    def run_id(self) -> str | None:
        return self._wandb_run.id if self._wandb_run is not None else None

    def log(self, metrics: dict[str, Any], step: int) -> None:
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps({"step": step, **metrics}) + "\n")
        if self._wandb_run is not None:
            self._wandb_run.log(metrics, step=step)

    def prefixed(self, prefix: str, step_offset: int = 0) -> "PrefixedTracker":
        """A view that logs every key as `prefix/key` at `step + step_offset`: one stage training
        several models in turn (the judges) keeps one W&B run whose steps only go forward."""
        return PrefixedTracker(self, prefix, step_offset)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A table (e.g. sample replies) in W&B; the stage keeps its own file copy."""
        if self._wandb_run is not None:
            import wandb

            self._wandb_run.log({key: wandb.Table(columns=columns, data=rows)}, step=step)

    def summary(self, metrics: dict[str, Any]) -> None:
        if self._wandb_run is not None:
            self._wandb_run.summary.update(metrics)

    def finish(self, exit_code: int = 0) -> None:
        if self._wandb_run is not None:
            self._wandb_run.finish(exit_code=exit_code)
            self._wandb_run = None


class PrefixedTracker:
    """What `Tracker.prefixed` returns: `log` and `log_table` under a prefix and a step offset."""

    def __init__(self, tracker: Tracker, prefix: str, step_offset: int):
        self.tracker, self.prefix, self.step_offset = tracker, prefix, step_offset

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.tracker.log({f"{self.prefix}/{key}": value for key, value in metrics.items()}, step=step + self.step_offset)

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        self.tracker.log_table(f"{self.prefix}/{key}", columns, rows, step=step + self.step_offset)


def read_metric_rows(stage_dir: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The rows a stage logged, in the order logged, and how many lines could not be read.

    A resumed stage's rows follow the first attempt's. An unreadable line is skipped rather than
    fatal: a stage killed mid-write leaves a torn last line, and a crashed run is the one most
    worth reading. Rows without a numeric "step" count as unreadable. A missing file gives no rows.
    """
    path = Path(stage_dir) / METRICS_NAME
    if not path.is_file():
        return [], 0
    rows, unreadable = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            unreadable += 1
            continue
        step = row.get("step") if isinstance(row, dict) else None
        if isinstance(step, (int, float)) and not isinstance(step, bool):
            rows.append(row)
        else:
            unreadable += 1
    return rows, unreadable
