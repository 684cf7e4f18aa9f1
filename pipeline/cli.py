"""The `chatpipe` command line.

    chatpipe run CONFIG [--run-dir DIR] [--set section.key=value ...]   every stage, in order
             [--from STAGE | --only STAGE]
    chatpipe stage NAME --run-dir DIR                                   one stage, from the recorded config
    chatpipe status RUN_DIR                                             the manifest as a table
    chatpipe eval RUN_DIR [--preferences FILE]                          SFT vs PPO on held-out prompts
    chatpipe report RUN_DIR                                             report.md with plots, for offline runs
    chatpipe chat RUN_DIR [--stage sft|ppo] [--prompt TEXT]              talk to a trained policy
    chatpipe serve RUN_DIR [--stage sft|ppo] [--port 8000]               an OpenAI-compatible endpoint

`run` records the resolved config in RUN_DIR/manifest.json, then launches each stage as its own
process (group). A completed stage is skipped while its config slice and its inputs are unchanged;
a stage that crashed resumes from its last checkpoint when run again. `pipeline.orchestration.stage.plan_stage`
makes that choice, for this command and for the stage itself, and `run` prints what it chose.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline.config import LaunchConfig, RunConfig, load_config, validate_config
from pipeline.errors import ChatpipeError, ConfigError, ManifestError
from pipeline.orchestration.launcher import run_logged, stage_launch
from pipeline.orchestration.lock import describe_holder, hold_run_dir, lock_holder
from pipeline.orchestration.manifest import (
    Manifest,
    StageEntry,
    altered_files,
    manifest_path,
    new_manifest,
    output_folder,
    previous_manifest_path,
    read_manifest,
    read_previous_manifest,
    recover_manifest,
    require_run,
    write_manifest,
)
from pipeline.orchestration.registry import STAGES, StageSpec, get_stage
from pipeline.orchestration.stage import log_path, plan_stage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="chatpipe", description="ChatGPT-style training pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="Run every stage of a config, skipping completed ones.")
    run.add_argument("config", help="Run config YAML, e.g. configs/tiny.yaml.")
    run.add_argument("--run-dir", help="Where checkpoints and the manifest go (default: runs/<name>).")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                     help="Override a config value; may be repeated.")
    run.add_argument("--from", dest="start", metavar="STAGE", help="Rerun this stage and every later one.")
    run.add_argument("--only", metavar="STAGE", help="Rerun this stage alone (its inputs must be completed).")

    stage = commands.add_parser("stage", help="Run one stage of an existing run from its recorded config.")
    stage.add_argument("name", help="Stage name: " + ", ".join(spec.name for spec in STAGES))
    stage.add_argument("--run-dir", required=True)

    status = commands.add_parser("status", help="Print a run's manifest as a table.")
    status.add_argument("run_dir")

    report = commands.add_parser("report", help="Write RUN_DIR/report.md: plots and final metrics of every stage.")
    report.add_argument("run_dir")

    evaluate = commands.add_parser("eval", help="Compare the run's policies on held-out prompts (the eval stage).")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--preferences", help="Preference pairs to measure every reward model's accuracy on "
                          "(default: the pairs the judges held out; pairs a model trained on are always left out).")

    for name, help_text in (("chat", "Talk to a trained policy in the terminal."),
                            ("serve", "Serve a trained policy as an OpenAI-compatible HTTP endpoint.")):
        command = commands.add_parser(name, help=help_text)
        command.add_argument("run_dir")
        command.add_argument("--stage", choices=("ppo", "dpo", "sft", "pretrain"),
                             help="Which policy (default: the first completed of ppo, dpo, sft, pretrain).")
        if name == "chat":
            command.add_argument("--prompt", help="Answer this one message and exit (for scripts).")
            command.add_argument("--temperature", type=float, default=0.7, help="0 = greedy, as is anything below 1e-5.")
            command.add_argument("--top-p", type=float, default=0.9)
            command.add_argument("--top-k", type=int, default=0, help="0 = off.")
            command.add_argument("--max-new-tokens", type=int, default=256)
            command.add_argument("--seed", type=int, help="Make sampled replies repeatable.")
        else:
            command.add_argument("--host", default="127.0.0.1")
            command.add_argument("--port", type=int, default=8000)
            command.add_argument("--model-name", help="The model id clients send (default: RUN-STAGE).")

    args = parser.parse_args(argv)
    if args.command == "run" and args.start is not None and args.only is not None:
        parser.exit(2, f"chatpipe run: --from {args.start} and --only {args.only} ask for two things: --from STAGE "
                       f"reruns that stage and every later one, --only STAGE that stage alone; give one of them\n")
    try:
        if args.command == "run":
            return command_run(args.config, args.run_dir, args.overrides, start=args.start, only=args.only)
        if args.command == "stage":
            return command_stage(args.name, Path(args.run_dir))
        if args.command == "report":
            from pipeline.apps.report import write_report  # matplotlib loads only for this command

            print(f"chatpipe: wrote {write_report(Path(args.run_dir))}")
            return 0
        if args.command == "eval":
            return command_eval(Path(args.run_dir), args.preferences)
        if args.command == "chat":
            from pipeline.apps.chat import SamplingSettings, chat_command

            settings = SamplingSettings(
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_new_tokens=args.max_new_tokens
            )
            return chat_command(args.run_dir, args.stage, args.prompt, settings, args.seed)
        if args.command == "serve":
            from pipeline.apps.serve import serve_command

            return serve_command(args.run_dir, args.stage, args.host, args.port, args.model_name)
        return command_status(Path(args.run_dir))
    except ChatpipeError as error:
        print(f"chatpipe: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # the filesystem refused: a read-only folder, a file where a folder belongs
        print(f"chatpipe: {error.filename or ''}: {error.strerror or error}; "
              "check the path and its permissions", file=sys.stderr)
        return 2


def command_run(config_path: str, run_dir: str | None, overrides: list[str], start: str | None = None,
                only: str | None = None) -> int:
    if Path(config_path).is_dir():
        raise ConfigError(f"{config_path}: a folder, not a run config; pass a YAML file, e.g. configs/tiny.yaml")
    config = load_config(config_path, overrides)
    for name in filter(None, (start, only)):
        require_enabled(get_stage(name), config)
    run_dir_path = Path(run_dir or Path("runs") / config.name).resolve()
    with hold_run_dir(run_dir_path, "chatpipe run") as notes:
        announce(notes, recover(run_dir_path))
        record_config(run_dir_path, config, config_path)
        return run_stages(config, run_dir_path, start, only)


def run_stages(config: RunConfig, run_dir: Path, start: str | None, only: str | None) -> int:
    manifest = read_manifest(run_dir)
    forced = False
    for spec in STAGES:
        if not spec.enabled(config):
            continue
        forced = forced or spec.name == start
        if only is not None and spec.name != only:
            continue
        decision = plan_stage(
            manifest, spec.name, spec.config_digest(config), spec.inputs_for(config), run_dir,
            requested=forced or spec.name == only,
            launch_changes=spec.launch_changes(config, manifest.stages.get(spec.name)),
        )
        if decision.action == "refuse":
            print(f"chatpipe: {spec.name}: {decision.describe()}", file=sys.stderr)
            return 2
        print(f"chatpipe: {spec.name}: {decision.describe()}")
        if decision.action == "skip":
            continue
        code = launch_stage(spec, config, run_dir)
        if code != 0:
            return code
        manifest = read_manifest(run_dir)
    print(f"chatpipe: run complete: {run_dir}")
    print_status(read_manifest(run_dir), run_dir)
    offline_runs = sorted((run_dir / "wandb").glob("offline-run-*"))
    if offline_runs:
        print(f"chatpipe: W&B ran offline; to upload: wandb sync {run_dir / 'wandb'}/offline-run-*")
    return 0


def recover(run_dir: Path) -> list[str]:
    """Bring a run dir's lost or damaged manifest back from the one before it, if it has one."""
    note = recover_manifest(run_dir) if manifest_path(run_dir).exists() or previous_manifest_path(run_dir).exists() else None
    return [note] if note else []


def announce(*notes: list[str]) -> None:
    for note in (line for group in notes for line in group):
        print(f"chatpipe: {note}")


def command_stage(name: str, run_dir: Path) -> int:
    spec = get_stage(name)
    run_dir = run_dir.resolve()
    with hold_run_dir(run_dir, f"chatpipe stage {name}") as notes:
        announce(notes, recover(run_dir))
        manifest = require_run(run_dir, read_manifest(run_dir))
        config = validate_config(manifest.config, source=f"{manifest_path(run_dir)} config")
        require_enabled(spec, config)
        return launch_stage(spec, config, run_dir)


def command_eval(run_dir: Path, preferences: str | None) -> int:
    """Run the eval stage on an existing run, adding an `eval:` section (defaults) if it has none."""
    run_dir = run_dir.resolve()
    with hold_run_dir(run_dir, "chatpipe eval") as notes:
        announce(notes, recover(run_dir))
        manifest = require_run(run_dir, read_manifest(run_dir))
        raw = manifest.config
        section = dict(raw.get("eval") or {})
        if preferences is not None:
            section["preferences"] = {"path": preferences}
        raw = {**raw, "eval": section}
        config = validate_config(raw, source=f"{manifest_path(run_dir)} config (with --preferences)")
        record_config(run_dir, config, manifest.config_source)
        return launch_stage(get_stage("eval"), config, run_dir)


def command_status(run_dir: Path) -> int:
    """The manifest as a table; from the previous manifest (read, not restored) when it is lost or damaged."""
    try:
        manifest = require_run(run_dir, read_manifest(run_dir))
    except ManifestError as error:
        try:
            manifest = require_run(run_dir, read_previous_manifest(run_dir))
        except ManifestError:
            raise error from None
        print(f"chatpipe: {error}")
        print(f"chatpipe: showing {previous_manifest_path(run_dir)}, the manifest before the last write; "
              "`chatpipe run` recovers the run from it")
    holder = lock_holder(run_dir)
    if holder is not None:
        print(f"chatpipe: in use by {describe_holder(holder)}")
    print_status(manifest, run_dir)
    return 0


def record_config(run_dir: Path, config: RunConfig, source: str) -> None:
    """Write the resolved config into the manifest, creating it for a new run dir."""
    resolved = config.model_dump(mode="json")
    if manifest_path(run_dir).exists():
        manifest = read_manifest(run_dir)
        manifest.config, manifest.config_source, manifest.run_name = resolved, str(source), config.name
    else:
        manifest = new_manifest(config.name, resolved, str(source))
    write_manifest(run_dir, manifest)


def require_enabled(spec: StageSpec, config: RunConfig) -> None:
    if not spec.enabled(config):
        raise ConfigError(f"stage {spec.name!r} has no `{spec.name}:` section in this run's config; add one to run it")


def launch_stage(spec: StageSpec, config: RunConfig, run_dir: Path) -> int:
    launch = spec.launch(config) or LaunchConfig()
    log = log_path(run_dir, spec.name)
    started = stage_launch(spec.module, launch, run_dir)
    for note in started.notes:
        print(f"chatpipe: {spec.name}: {note}")
    code = run_logged(started.command, log, env=started.env, alongside=started.other_machines)
    if code != 0:
        print(f"chatpipe: stage {spec.name!r} failed (exit code {code}); log: {log}", file=sys.stderr)
        entry = read_manifest(run_dir).stages.get(spec.name)
        if entry is not None and entry.status == "completed":
            print(f"chatpipe: {spec.name}: its previous output was kept, and the stages after it stay valid; "
                  "fix the cause and run again", file=sys.stderr)
        else:
            print("chatpipe: fix the cause and run again: completed stages are skipped, this one resumes",
                  file=sys.stderr)
    return code


def print_status(manifest: Manifest, run_dir: Path) -> None:
    rows = [("stage", "status", "started", "took", "procs", "metrics", "output")]
    altered = {}
    for spec in STAGES:
        if spec.name not in manifest.stages and manifest.config.get(spec.name) is None:
            continue  # not part of this run (its section is off, or the run was recorded before the stage existed)
        entry = manifest.stages.get(spec.name) or StageEntry()
        changed = altered_output(run_dir, entry)
        if changed:
            altered[spec.name] = changed
        rows.append((
            spec.name,
            "altered" if changed else "stale" if is_stale(manifest, entry) else entry.status,
            (entry.started_at or "")[:19].replace("T", " "),
            entry.duration,
            str(entry.world_size or ""),
            _headline(entry.metrics) if entry.status == "completed" else (entry.error or "")[:60],
            entry.output.path if entry.output is not None else "",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print(f"run {manifest.run_name} ({manifest.config_source})")
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    for name, changed in altered.items():
        print(f"chatpipe: {name}: its output changed since it was recorded ({', '.join(changed[:3])}); "
              "`chatpipe run` rebuilds it")


def altered_output(run_dir: Path, entry: StageEntry) -> list[str]:
    """A completed stage's recorded output files that are missing or changed (all of them if its folder is gone)."""
    if entry.status != "completed" or entry.output is None:
        return []
    if not output_folder(run_dir, entry.output).is_dir():
        return [f"{entry.output.path}/ is missing"]
    return altered_files(run_dir, entry.output)


def is_stale(manifest: Manifest, entry: StageEntry) -> bool:
    """A completed stage whose recorded input is no longer its upstream's current output.

    `plan_stage` reruns such a stage on the next `chatpipe run` ("its input ... changed").
    """
    if entry.status != "completed":
        return False
    for stage, recorded in entry.inputs.items():
        upstream = manifest.stages.get(stage)
        if upstream is None or upstream.status != "completed" or upstream.output is None:
            return True
        if upstream.output.digest != recorded.digest:
            return True
    return False


HEADLINE_METRICS = (
    "eval_loss", "eval_perplexity", "train_loss", "accuracy", "mean_accuracy", "initial_score", "score", "kl",
    "judges_score", "steps", "rollouts", "ppo_vs_sft/judges/lc_win_rate", "win_rate", "ppo/score", "sft/score", "ppo/kl", "reward_accuracy", "vocab_size", "source",
)


def _headline(metrics: dict) -> str:
    """The few final metrics worth a glance, most telling first."""
    keys = [key for key in HEADLINE_METRICS if key in metrics]
    parts = []
    for key in keys[:5]:
        value = metrics[key]
        parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
