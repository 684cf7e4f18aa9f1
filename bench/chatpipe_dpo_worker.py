"""One chatpipe DPO run for bench/dpo_vs_trl.py, in its own process (so its peak memory is its own).

    .venv/bin/python bench/chatpipe_dpo_worker.py CONFIG.json     # prints one JSON object

Runs the real `dpo` stage on a copy of the prepared run dir: the benchmark's config (with its
`dpo:` section) is recorded in the run's manifest as `chatpipe run` records it
(`pipeline.cli.record_config`), then `pipeline.orchestration.stage.execute_stage("dpo", ...)`
runs `stages.dpo.__main__.train`, as `python -m stages.dpo --run-dir RUN` does, in this process.
Its phases are timed by wrapping, in this process only, the functions the stage calls by name
(the data encoding, the reference pass, the loop `fit`, its evaluations, the final save);
nothing in the stage changes. The training loop's time is `fit`'s less its evaluations (it
writes no checkpoints here: save_every is past the last step).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

from ppo_bench_common import current_rss_mb, emit, environment, peak_rss_mb, profiled, read_config  # noqa: E402


def main() -> None:
    started_process = time.perf_counter()
    config = read_config()
    sys.stdout = sys.stderr  # anything the stage prints stays off the JSON answer
    import torch

    if config.get("threads"):
        torch.set_num_threads(config["threads"])
    import stages.dpo.__main__ as dpo
    from pipeline.cli import record_config
    from pipeline.config import load_config
    from pipeline.orchestration.manifest import read_manifest
    from pipeline.orchestration.stage import execute_stage

    run_dir = Path(config["run_dir"])
    record_config(run_dir, load_config(config["config"], []), config["config"])

    seconds: dict[str, float] = {}

    def timed(name: str, function):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
        return wrapper

    for name in ("encode_groups", "reference_logps", "fit", "evaluate_pairs", "save_final_model"):
        setattr(dpo, name, timed(name, getattr(dpo, name)))

    rss_before = current_rss_mb()
    started = time.perf_counter()
    with profiled(config.get("profile")):
        result = execute_stage("dpo", run_dir, dpo.train)
    stage_seconds = time.perf_counter() - started
    metrics = read_manifest(run_dir).stages["dpo"].metrics
    steps = result.metrics["steps"]
    pairs_per_step = config["prompts_per_batch"]  # pairwise rows: one pair per prompt
    loop_seconds = seconds["fit"] - seconds.get("evaluate_pairs", 0.0)
    emit({
        "side": "chatpipe", **environment(),
        "steps": steps, "pairs": steps * pairs_per_step, "train_pairs": metrics["train_pairs"],
        "loop_seconds": loop_seconds,
        "reference_seconds": seconds.get("reference_logps", 0.0),
        "encode_seconds": seconds.get("encode_groups", 0.0),
        "stage_eval_seconds": seconds.get("evaluate_pairs", 0.0),
        "save_seconds": seconds.get("save_final_model", 0.0),
        "stage_seconds": stage_seconds,
        "worker_seconds": time.perf_counter() - started_process,
        "train_loss_last_logged": metrics["train_loss"], "stage_eval_accuracy": metrics.get("eval_accuracy"),
        "stage_peak_rss_mib": metrics.get("peak_rss_mib"),
        "rss_before_stage_mb": rss_before, "peak_rss_mb": peak_rss_mb(),
        "policy": str(run_dir / "dpo" / "final"),
    })


if __name__ == "__main__":
    main()
