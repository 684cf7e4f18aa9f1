"""Every stage under every engine on two CPU processes, and what sharding saves PPO in memory.

    python bench/engines.py [--engines ddp fsdp deepspeed_zero2 deepspeed_zero3] [--skip-memory]
    python bench/engines.py --engines ddp --stages pretrain --skip-memory --set pretrain.max_steps=2   # a quick look

Part 1, stage x engine: configs/tiny.yaml cut short (pretrain 40 steps, SFT 20, reward 20, PPO
128 episodes, eval 16 prompts; checkpoints only at the end), run once on one process and once per
engine with every stage launched as a user launches it (`--set <stage>.launch.num_processes=2
--set <stage>.launch.accelerate_config=configs/accelerate/<engine>.yaml`). The tokenizer is
trained once (main process only) and shared. For each stage: whether it completed, its wall time
(the manifest's), the peak RSS of its largest process (`peak_rss_mib`) and its headline number.

Part 2, PPO memory: a model with hidden size 512 (8 layers, about 19M parameters per model, four
models in PPO), pretrained and reward-trained for a few steps on one process, then 2 rollouts of
PPO on two processes under DDP and under ZeRO-3; the per-process peak RSS of each and their ratio.
A process that only imports torch, transformers and deepspeed is measured too, the floor under
both.

`--stages` runs a subset of part 1, each with `chatpipe run --only STAGE` in pipeline order (each
needs its inputs among them); `--set` adds config overrides after part 1's (part 2 keeps its own).

Prints one JSON line per measurement and a table; writes bench/results/engines.json (`--out`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.orchestration.manifest import parse_time, read_manifest  # noqa: E402

ENGINES = ["ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3"]
STAGES = ["pretrain", "sft", "reward", "ppo", "eval"]
HEADLINE = {"pretrain": "eval_loss", "sft": "eval_loss", "reward": "accuracy", "ppo": "score", "eval": "win_rate"}
SHORT = [
    "pretrain.max_steps=40", "pretrain.warmup_steps=5", "pretrain.eval_every=40", "pretrain.save_every=40",
    "sft.max_steps=20", "sft.eval_every=20", "sft.save_every=20",
    "reward.max_steps=20", "reward.eval_every=20", "reward.save_every=20",
    "ppo.sampling.total_episodes=128", "ppo.eval_every=4", "ppo.save_every=4", "ppo.eval_prompts=16",
    "eval.num_prompts=16",
]
LARGE = [
    "model.config.hidden_size=512", "model.config.intermediate_size=1376", "model.config.num_hidden_layers=8",
    "model.config.num_attention_heads=8", "model.config.num_key_value_heads=8",
    "pretrain.max_steps=4", "pretrain.warmup_steps=1", "pretrain.eval_every=4", "pretrain.save_every=4",
    "pretrain.eval_batches=1", "sft.max_steps=2", "sft.eval_every=2", "sft.save_every=2",
    "reward.max_steps=2", "reward.eval_every=2", "reward.save_every=2",
    "ppo.sampling.total_episodes=64", "ppo.sampling.rollout_batch_size=32", "ppo.sampling.response_length=24",
    "ppo.eval_every=2", "ppo.save_every=2", "ppo.eval_prompts=16",
]


def chatpipe(run_dir: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline.cli", "run", str(REPO / "configs" / "tiny.yaml"), "--run-dir", str(run_dir), *arguments]
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


def settings(values: list[str]) -> list[str]:
    return [part for value in values for part in ("--set", value)]


def launched(engine: str, stages: list[str]) -> list[str]:
    config = REPO / "configs" / "accelerate" / f"{engine}.yaml"
    return settings([f"{stage}.launch.{key}" for stage in stages for key in ("num_processes=2", f"accelerate_config={config}")])


def run_stages(run_dir: Path, stages: list[str], *arguments: str) -> subprocess.CompletedProcess:
    """The whole config in one `chatpipe run` (judges included), or each of a subset with --only."""
    if stages == STAGES:
        return chatpipe(run_dir, *arguments)
    for stage in stages:
        result = chatpipe(run_dir, "--only", stage, *arguments)
        if result.returncode != 0:
            break
    return result


def stage_rows(run_dir: Path, engine: str, stages: list[str]) -> list[dict]:
    rows = []
    for stage in stages:
        entry = read_manifest(run_dir).stages.get(stage)
        completed = entry is not None and entry.status == "completed"
        rows.append({
            "part": "stages", "engine": engine, "stage": stage, "completed": completed,
            "processes": entry.world_size if entry else None,
            "seconds": seconds(entry) if completed else None,
            "peak_rss_mib": entry.metrics.get("peak_rss_mib") if completed else None,
            HEADLINE[stage]: entry.metrics.get(HEADLINE[stage]) if completed else None,
            "error": None if completed or entry is None else entry.error,
        })
    return rows


def seconds(entry) -> float:
    """The stage's wall time as the manifest records it (from the stage's start to its record)."""
    return round((parse_time(entry.finished_at) - parse_time(entry.started_at)).total_seconds(), 1)


def floor_rss_mib() -> float:
    """Peak RSS of a process that imports what every stage imports and does nothing else."""
    code = ("import resource, torch, transformers, accelerate, deepspeed; "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", nargs="+", default=ENGINES, choices=ENGINES)
    parser.add_argument("--stages", nargs="+", default=STAGES, choices=STAGES,
                        help="Part 1's stages (default: all, in one `chatpipe run` of the config).")
    parser.add_argument("--skip-memory", action="store_true", help="Leave out part 2 (PPO memory at hidden 512).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="Part 1: a config override applied after the benchmark's own (repeatable).")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "engines.json")
    args = parser.parse_args()
    stages = [stage for stage in STAGES if stage in args.stages]
    short = SHORT + args.overrides
    rows = []
    with tempfile.TemporaryDirectory(prefix="chatpipe-engines-") as scratch:
        scratch = Path(scratch)
        base = scratch / "base"
        chatpipe(base, "--only", "tokenizer", *settings(short)).check_returncode()
        for engine in ["one", *args.engines]:
            run_dir = scratch / engine
            shutil.copytree(base, run_dir)
            extra = [] if engine == "one" else launched(engine, stages)
            result = run_stages(run_dir, stages, *settings(short), *extra)
            for row in stage_rows(run_dir, engine, stages):
                print(json.dumps(row), flush=True)
                rows.append(row)
            if result.returncode != 0:
                print(result.stderr[-2000:], file=sys.stderr)

        if not args.skip_memory:
            large = scratch / "large"
            for stage in ("tokenizer", "pretrain", "sft", "reward"):
                chatpipe(large, "--only", stage, *settings(SHORT), *settings(LARGE)).check_returncode()
            peaks = {}
            for engine in ("ddp", "deepspeed_zero3"):
                run_dir = scratch / f"large-{engine}"
                shutil.copytree(large, run_dir)
                chatpipe(run_dir, "--only", "ppo", *settings(SHORT), *settings(LARGE), *launched(engine, ["ppo"])).check_returncode()
                entry = read_manifest(run_dir).stages["ppo"]
                peaks[engine] = entry.metrics["peak_rss_mib"]
                row = {"part": "ppo_memory", "engine": engine, "hidden_size": 512, "processes": entry.world_size,
                       "peak_rss_mib": peaks[engine], "seconds": seconds(entry),
                       **{key: value for key, value in entry.metrics.items() if key.startswith("held/")}}
                print(json.dumps(row), flush=True)
                rows.append(row)
            floor = floor_rss_mib()
            ratio = {
                "part": "ppo_memory_ratio", "zero3_over_ddp": peaks["deepspeed_zero3"] / peaks["ddp"],
                "floor_rss_mib": floor,
                "zero3_over_ddp_above_floor": (peaks["deepspeed_zero3"] - floor) / (peaks["ddp"] - floor),
            }
            print(json.dumps(ratio), flush=True)
            rows.append(ratio)

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1) + "\n")
    print_table([row for row in rows if row["part"] == "stages"])


def print_table(rows: list[dict]) -> None:
    print("\nstage     engine            done  seconds  peak RSS/proc (MiB)  headline")
    for row in rows:
        headline = HEADLINE[row["stage"]]
        value = row.get(headline)
        print(f"{row['stage']:<9} {row['engine']:<17} {'yes' if row['completed'] else 'NO':<5} {row['seconds'] or '-':>7}  "
              f"{row['peak_rss_mib'] or '-':>19}  {headline}={value if value is None else round(value, 4)}")


if __name__ == "__main__":
    main()
