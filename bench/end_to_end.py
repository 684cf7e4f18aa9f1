"""Where a whole run's time (and memory) goes, stage by stage.

    .venv/bin/python bench/end_to_end.py                          # read runs/tiny (after `make demo`)
    .venv/bin/python bench/end_to_end.py --run-dir runs/other     # any run dir with a manifest
    .venv/bin/python bench/end_to_end.py --run --fresh            # run configs/tiny.yaml into runs/bench-e2e, measuring memory
    .venv/bin/python bench/end_to_end.py --run --set pretrain.max_steps=100 --set ppo.total_episodes=128

Reading: each stage's wall time comes from the manifest's `started_at` / `finished_at` (whole
seconds: the manifest records no finer), with its share of the summed stage time, and the gap
before it (the time between the previous stage's end and this one's start: the new process
starting, importing torch and transformers, and verifying its inputs' hashes; a long gap means the
stage ran in a separate invocation).

Running (`--run`): the stages are launched one at a time, as a user would: the first with
`chatpipe run CONFIG --run-dir DIR --set wandb.mode=disabled --only tokenizer` (which records the
config in a new manifest), each later one with `chatpipe stage NAME --run-dir DIR`. While each
runs, its process tree is polled (psutil, every --poll seconds) for the peak memory: the stage
process's resident high-water mark (VmHWM from /proc, exact even between polls; the largest one
when a stage runs several workers), the same for the `chatpipe` process that launched it, and the
largest summed RSS of the whole tree seen at a poll (CLI, stage, workers). CPU seconds (user +
system, last seen per process) over launch seconds gives the cores kept busy. The
measurements are also written to DIR/bench_end_to_end.json, so reading that run dir later shows
them again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import REPO_ROOT, Reporter, table  # noqa: E402

NAME = "end_to_end"
MEASURED_FILE = "bench_end_to_end.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", help="Run directory (default runs/tiny; with --run, runs/bench-e2e).")
    parser.add_argument("--run", action="store_true", help="Run the config first, one stage at a time, measuring memory.")
    parser.add_argument("--config", default="configs/tiny.yaml", help="With --run: the run config.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="With --run: a config override for `chatpipe run` (repeatable).")
    parser.add_argument("--fresh", action="store_true", help="With --run: delete the run dir first (cold token cache).")
    parser.add_argument("--poll", type=float, default=0.2, help="With --run: seconds between memory polls.")
    parser.add_argument("--out", help="JSON-lines file to append to (default bench/results/end_to_end.jsonl).")
    return parser.parse_args(argv)


# ------------------------------------------------------------------------------ measuring
def process_tree_sample(root) -> list[tuple[int, float, float, float]]:
    """(pid, rss MB, VmHWM MB, cpu seconds) for `root` and every descendant alive now."""
    import psutil

    try:
        processes = [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    samples = []
    for process in processes:
        try:
            rss = process.memory_info().rss / 2**20
            times = process.cpu_times()
            cpu = times.user + times.system
        except psutil.Error:
            continue
        samples.append((process.pid, rss, high_water_mark_mb(process.pid, rss), cpu))
    return samples


def high_water_mark_mb(pid: int, fallback: float) -> float:
    """The process's peak resident set so far (VmHWM), which no poll can miss."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return fallback


def run_measured(command: list[str], log, poll: float, timeout: float | None = None) -> dict:
    """Run `command` (output to `log`), polling its process tree; returns wall time, memory, CPU time.

    Past `timeout` seconds the command is killed (`timed_out`; its exit code is then the kill's):
    bench/gpu_check.py must not let one run eat a lent GPU's time. The `chatpipe` CLI's stage
    processes end with it (pipeline/orchestration/launcher.py asks the kernel for that).
    """
    import psutil

    log.write(f"$ {' '.join(command)}\n".encode())
    log.flush()
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(process.pid)
    peak_tree, peak_stage, peak_cli, cpu_by_pid, timed_out = 0.0, 0.0, 0.0, {}, False
    while process.poll() is None:
        if timeout is not None and time.perf_counter() - started > timeout:
            process.kill()
            process.wait()
            timed_out = True
            break
        samples = process_tree_sample(root)
        if samples:
            peak_tree = max(peak_tree, sum(rss for _, rss, _, _ in samples))
            for pid, _, hwm, cpu in samples:
                if pid == process.pid:
                    peak_cli = max(peak_cli, hwm)
                else:
                    peak_stage = max(peak_stage, hwm)
                cpu_by_pid[pid] = cpu
        time.sleep(poll)
    wall = time.perf_counter() - started
    return {
        "exit_code": process.returncode,
        "launch_seconds": wall,
        "peak_rss_mb": peak_stage,  # the stage's process (the largest, with several workers)
        "cli_peak_rss_mb": peak_cli,  # the `chatpipe` process that launched it
        "peak_tree_rss_mb": peak_tree,
        "cpu_seconds": sum(cpu_by_pid.values()),
        "processes": len(cpu_by_pid),
        "timed_out": timed_out,
    }


def run_stages(args, run_dir: Path) -> dict[str, dict]:
    """Launch every enabled stage of the config, one at a time; per-stage measurements."""
    from pipeline.config import load_config
    from pipeline.orchestration.registry import STAGES

    overrides = ["wandb.mode=disabled", *args.overrides]
    config = load_config(REPO_ROOT / args.config if not Path(args.config).is_absolute() else args.config, overrides)
    names = [spec.name for spec in STAGES if spec.enabled(config)]
    if run_dir.exists():
        if args.fresh:
            if any(run_dir.iterdir()) and not (run_dir / "manifest.json").exists():
                raise SystemExit(f"{run_dir} is not a chatpipe run dir (no manifest.json); not deleting it")
            shutil.rmtree(run_dir)
        else:
            print(f"note: {run_dir} exists; its token cache is warm and every stage reruns. --fresh starts cold.")
    run_dir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "pipeline.cli"]
    sets = [part for override in overrides for part in ("--set", override)]
    measured = {}
    log_file = run_dir / "logs" / "bench_end_to_end.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        for index, name in enumerate(names):
            if index == 0:
                command = [*cli, "run", args.config, "--run-dir", str(run_dir), *sets, "--only", name]
            else:
                command = [*cli, "stage", name, "--run-dir", str(run_dir)]
            print(f"running {name}: {' '.join(command[2:])}", flush=True)
            result = run_measured(command, log, args.poll)
            measured[name] = result
            print(f"  {result['launch_seconds']:.0f}s, peak RSS {result['peak_rss_mb']:.0f} MB, exit {result['exit_code']}", flush=True)
            if result["exit_code"] != 0:
                print(f"{name} failed; its log: {log_file} and {run_dir / 'logs' / (name + '.log')}")
                break
    (run_dir / MEASURED_FILE).write_text(json.dumps({
        "measured_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": args.config, "overrides": overrides, "stages": measured,
    }, indent=2) + "\n")
    return measured


# -------------------------------------------------------------------------------- reading
def stage_rows(manifest, measured: dict[str, dict]) -> list[dict]:
    """One row per stage in pipeline order: seconds from the manifest, gap before, memory if measured."""
    from pipeline.orchestration.registry import STAGE_NAMES

    def parse(stamp):
        return dt.datetime.fromisoformat(stamp) if stamp else None

    rows, previous_end = [], None
    for name in STAGE_NAMES:
        entry = manifest.stages.get(name)
        if entry is None:
            continue
        started, finished = parse(entry.started_at), parse(entry.finished_at)
        seconds = (finished - started).total_seconds() if started and finished else None
        gap = (started - previous_end).total_seconds() if started and previous_end else None
        row = {"stage": name, "status": entry.status, "seconds": seconds, "gap_before_seconds": gap,
               "started_at": entry.started_at, "world_size": entry.world_size}
        row.update(measured.get(name, {}))
        rows.append(row)
        previous_end = finished or previous_end
    total = sum(row["seconds"] or 0 for row in rows)
    for row in rows:
        row["share"] = (row["seconds"] or 0) / total if total else None
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from pipeline.errors import ManifestError
    from pipeline.orchestration.manifest import read_manifest

    run_dir = Path(args.run_dir or ("runs/bench-e2e" if args.run else "runs/tiny"))
    if not run_dir.is_absolute():
        run_dir = REPO_ROOT / run_dir
    settings = {"run_dir": str(run_dir.relative_to(REPO_ROOT) if run_dir.is_relative_to(REPO_ROOT) else run_dir),
                "mode": "run" if args.run else "read"}
    if args.run:
        settings.update(config=args.config, overrides=["wandb.mode=disabled", *args.overrides], fresh=args.fresh, poll=args.poll)
    reporter = Reporter(NAME, args.out, settings)
    reporter.header()

    measured = run_stages(args, run_dir) if args.run else {}
    try:
        manifest = read_manifest(run_dir)
    except ManifestError as error:
        print(f"end_to_end: {error}")
        print("end_to_end: run `make demo` first (it writes runs/tiny), or measure a run of its own: "
              "`.venv/bin/python bench/end_to_end.py --run`")
        return 2
    if not measured and (run_dir / MEASURED_FILE).exists():
        recorded = json.loads((run_dir / MEASURED_FILE).read_text())
        measured = recorded.get("stages", {})
        print(f"memory: from {run_dir / MEASURED_FILE} (measured {recorded.get('measured_at')})")

    rows = stage_rows(manifest, measured)
    for row in rows:
        reporter.emit("stage", **row)
    total = sum(row["seconds"] or 0 for row in rows)
    gaps = sum(row["gap_before_seconds"] or 0 for row in rows if (row["gap_before_seconds"] or 0) < 120)
    reporter.emit("total", stage_seconds=total, gaps_under_2min_seconds=gaps,
                  peak_rss_mb=max((row.get("peak_rss_mb") or 0 for row in rows), default=None) or None,
                  run_name=manifest.run_name)

    print()
    has_memory = any("peak_rss_mb" in row for row in rows)
    headers = ["stage", "status", "took s", "share", "gap before s"]
    if has_memory:
        headers += ["launch s", "stage peak RSS MB", "CLI RSS MB", "tree RSS MB", "CPU s", "cores busy"]
    lines = []
    for row in rows:
        line = [row["stage"], row["status"], row["seconds"], f"{100 * row['share']:.0f}%" if row["share"] is not None else None,
                row["gap_before_seconds"]]
        if has_memory:
            launch = row.get("launch_seconds")
            cpu = row.get("cpu_seconds")
            line += [launch, row.get("peak_rss_mb"), row.get("cli_peak_rss_mb"), row.get("peak_tree_rss_mb"), cpu,
                     f"{cpu / launch:.2f}" if cpu is not None and launch else None]
        lines.append(line)
    lines.append(["total", "", total, "100%", gaps] + ([""] * 6 if has_memory else []))
    print(table(lines, headers))
    print(f"\nrun {manifest.run_name} in {settings['run_dir']}; times from manifest.json (whole seconds). "
          f"'gap before' is process start-up + imports + input checks (gaps over 2 min left out of the total: "
          f"separate invocations).")
    if not has_memory:
        print("memory: not measured for this run dir; `bench/end_to_end.py --run` measures it per stage.")
    reporter.footer()
    return 0


if __name__ == "__main__":
    sys.exit(main())
