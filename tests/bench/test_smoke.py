"""Every benchmark script, run as a user runs it at its tiniest settings, so a refactor cannot break one silently.

Each test starts `python bench/<script>.py` from the repository root with flags that shrink the
model, the steps and the rounds to the least that still goes through the script's real code path,
sends its results to a temporary folder (never bench/results/ or runs/), and checks that it exits
0 and that what it wrote parses and carries every measurement with a finite, positive value where
one is expected. The numbers themselves mean nothing at this size: only their presence and shape
are checked. bench/ppo_vs_trl.py and its workers are not covered in this file.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT

# A model and pretraining run far smaller than configs/tiny.yaml's, for the scripts that run the
# `chatpipe` CLI on a config: `--set` overrides, after the benchmark's own.
TINY_RUN = [
    "tokenizer.vocab_size=400",
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
    "pretrain.block_size=32", "pretrain.per_device_batch_size=4", "pretrain.max_steps=2", "pretrain.warmup_steps=1",
    "pretrain.eval_every=2", "pretrain.eval_batches=1", "pretrain.save_every=2", "pretrain.log_every=1",
]
# The same for the scripts that build their model in memory (bench/pretrain_throughput.py's flags).
TINY_MODEL = ["--hidden", "32", "--layers", "1", "--heads", "2", "--intermediate", "64", "--vocab", "300"]


def run_bench(script: str, *arguments: str, default_output: str | None = None, timeout: int = 600) -> str:
    """Run bench/`script` from the repository root in a fresh process; its stdout.

    The environment is this one (tests/conftest.py has set WANDB_MODE, TOKENIZERS_PARALLELISM and
    TORCH_EXTENSIONS_DIR, DeepSpeed's build folder), with one OpenMP thread per process: on a
    shared 2-core machine two threads stall behind other jobs (bench/README.md, finding 7), which
    made these runs 3x slower, and the thread count changes no code path. The script's own
    `chatpipe` and torchrun processes inherit it. `default_output`: the repository file the script
    writes when not told otherwise, which must be left as it was.
    """
    default = REPO_ROOT / default_output if default_output else None
    before = _fingerprint(default)
    result = subprocess.run(
        [sys.executable, str(Path("bench") / script), *arguments],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, (
        f"bench/{script} exited {result.returncode}\n--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}"
    )
    assert _fingerprint(default) == before, f"bench/{script} wrote to {default_output} although told to write elsewhere"
    return result.stdout


def _fingerprint(path: Path | None):
    if path is None or not path.exists():
        return None
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def json_lines(text: str) -> list[dict]:
    """Every line of `text` that is a JSON object, parsed."""
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def by_measurement(records: list[dict]) -> dict[str, list[dict]]:
    grouped: dict[str, list[dict]] = {}
    for record in records:
        grouped.setdefault(record["measurement"], []).append(record)
    return grouped


def assert_positive(record: dict, *keys: str) -> None:
    """Each of `keys` is in `record` and is a finite number above zero."""
    for key in keys:
        value = record.get(key)
        assert isinstance(value, (int, float)) and math.isfinite(value) and value > 0, f"{key}={value!r} in {record}"


# ------------------------------------------------------------------------ in-process benchmarks
def test_pretrain_throughput_reports_both_loops_their_ratio_and_a_profile(tmp_path):
    out = tmp_path / "pretrain_throughput.jsonl"
    stdout = run_bench(
        "pretrain_throughput.py", *TINY_MODEL, "--seq", "32", "--batch", "4", "--warmup", "1", "--steps", "2",
        "--rounds", "2", "--peak-size", "64", "--profile", "1", "--out", str(out),
        default_output="bench/results/pretrain_throughput.jsonl",
    )

    records = json_lines(out.read_text())
    assert records == json_lines(stdout)  # what it printed is what it appended
    assert len({record["run_id"] for record in records}) == 1
    measurements = by_measurement(records)
    assert set(measurements) == {"peak", "chatpipe", "baseline", "ratio", "profile_chatpipe"}
    assert_positive(measurements["peak"][0], "peak_gflops", "peak_gflops_before", "peak_gflops_after")
    for loop in ("chatpipe", "baseline"):
        record = measurements[loop][0]
        assert record["steps"] == 2 and record["settings"]["hidden"] == 32
        assert_positive(record, "median_step_seconds", "tokens_per_second", "achieved_gflops", "mfu", "mfu_all_positions")
        assert 0 <= record["padding_fraction"] < 1
    assert measurements["chatpipe"][0]["padding_fraction"] == 0  # packed blocks carry no padding
    ratio = measurements["ratio"][0]
    assert_positive(ratio, "chatpipe_over_baseline_tokens_per_second", "mfu_chatpipe", "mfu_baseline")
    assert len(ratio["per_round"]) == 2 and all(math.isfinite(r) and r > 0 for r in ratio["per_round"])
    top_ops = measurements["profile_chatpipe"][0]["top_ops"]
    assert top_ops and all(op["op"] and op["self_cpu_ms"] >= 0 for op in top_ops)
    assert "chatpipe / baseline useful tokens/s:" in stdout


def test_scaling_reports_every_sequence_and_response_length_against_the_smallest(tmp_path):
    out = tmp_path / "scaling.jsonl"
    run_bench(
        "scaling.py", *TINY_MODEL, "--seq-lens", "16,32", "--tokens-per-batch", "64", "--pretrain-warmup", "1",
        "--pretrain-steps", "2", "--response-lengths", "4,8", "--ppo-hidden", "32", "--ppo-layers", "1",
        "--ppo-heads", "2", "--ppo-intermediate", "64", "--rollout-batch", "4", "--mini-batches", "2",
        "--micro-batch", "2", "--ppo-epochs", "1", "--query-length", "16", "--ppo-warmup", "1", "--ppo-steps", "2",
        "--out", str(out), default_output="bench/results/scaling.jsonl",
    )

    measurements = by_measurement(json_lines(out.read_text()))
    pretrain = {record["seq_len"]: record for record in measurements["pretrain_seq_len"]}
    assert sorted(pretrain) == [16, 32]
    assert [pretrain[16]["batch"], pretrain[32]["batch"]] == [4, 2]  # tokens per step held at 64
    for record in pretrain.values():
        assert_positive(record, "median_step_seconds", "tokens_per_second", "ratio_to_smallest", "flops_ratio_to_smallest",
                        "attention_share_of_flops")
        assert len(record["step_seconds"]) == 2
    assert pretrain[16]["ratio_to_smallest"] == 1 and pretrain[32]["flops_ratio_to_smallest"] > 1

    ppo = {record["response_length"]: record for record in measurements["ppo_response_length"]}
    assert sorted(ppo) == [4, 8]
    for length, record in ppo.items():
        assert_positive(record, "median_step_seconds", "median_rollout_seconds", "median_update_seconds",
                        "median_generate_seconds", "generated_tokens_per_second", "mean_response_tokens",
                        "step_ratio_to_smallest", "rollout_ratio_to_smallest", "update_ratio_to_smallest",
                        "generate_ratio_to_smallest", "sequence_ratio_to_smallest")
        # Sampling is timed inside the rollout, so it is a part of it.
        assert record["median_generate_seconds"] < record["median_rollout_seconds"]
        assert 0 < record["rollout_share"] < 1 and record["mean_response_tokens"] <= length
    assert ppo[8]["length_ratio_to_smallest"] == 2


def test_serve_concurrency_reports_each_server_and_client_count_and_the_ratios(tmp_path):
    # The script writes nothing: its JSON lines and ratios are on stdout.
    stdout = run_bench("serve_concurrency.py", "--hidden", "32", "--layers", "2", "--tokens", "4", "--requests", "16",
                       "--rounds", "1")

    records = json_lines(stdout)
    assert {(record["server"], record["clients"]) for record in records} == {
        ("batched", 1), ("unbatched", 1), ("batched", 16), ("unbatched", 16),
    }
    for record in records:
        assert record["requests"] == (16 if record["clients"] == 16 else 4)
        assert_positive(record, "tokens_per_s", "mean_latency_s")
    ratios = dict(re.findall(r"^\s*(.+?): median ([0-9.]+)x", stdout, flags=re.MULTILINE))
    assert set(ratios) == {"batched 16 / batched 1", "batched 16 / unbatched 16", "batched 1 / unbatched 1"}
    assert all(math.isfinite(float(value)) and float(value) > 0 for value in ratios.values())


# ------------------------------------------------------------------- benchmarks of the CLI
def test_end_to_end_runs_a_config_stage_by_stage_and_reads_its_run_dir_back(tmp_path, write_config):
    # A config with the tokenizer and pretraining sections only: the same launches as the demo's
    # six stages, two of them, on a model of hidden size 32.
    config = write_config(pretrain={"max_steps": 2, "warmup_steps": 1, "eval_every": 2, "eval_batches": 1,
                                    "save_every": 2, "log_every": 1})
    run_dir = tmp_path / "run"
    out = tmp_path / "end_to_end.jsonl"
    run_bench("end_to_end.py", "--run", "--fresh", "--config", str(config), "--run-dir", str(run_dir), "--out", str(out),
              default_output="bench/results/end_to_end.jsonl")

    measurements = by_measurement(json_lines(out.read_text()))
    stages = {record["stage"]: record for record in measurements["stage"]}
    assert list(stages) == ["tokenizer", "pretrain"]
    for record in stages.values():
        assert record["status"] == "completed" and record["exit_code"] == 0
        assert_positive(record, "launch_seconds", "peak_rss_mb", "cli_peak_rss_mb", "peak_tree_rss_mb", "cpu_seconds")
        assert record["seconds"] >= 0  # the manifest's whole seconds: a tiny stage can take 0
    assert stages["pretrain"]["gap_before_seconds"] >= 0
    total = measurements["total"][0]
    assert total["stage_seconds"] >= 0 and total["peak_rss_mb"] == max(r["peak_rss_mb"] for r in stages.values())
    recorded = json.loads((run_dir / "bench_end_to_end.json").read_text())
    assert set(recorded["stages"]) == {"tokenizer", "pretrain"}

    # Reading the run dir later shows the memory measured while it ran.
    again = tmp_path / "read.jsonl"
    stdout = run_bench("end_to_end.py", "--run-dir", str(run_dir), "--out", str(again),
                       default_output="bench/results/end_to_end.jsonl")
    read = by_measurement(json_lines(again.read_text()))
    assert read["total"][0]["settings"]["mode"] == "read"
    assert [record["peak_rss_mb"] for record in read["stage"]] == [stages[name]["peak_rss_mb"] for name in stages]
    assert "memory: from" in stdout


def test_data_pipeline_measures_the_token_store_on_a_corpus_and_chat_data(tmp_path):
    """The current tree's path only (--skip-baseline): CI checkouts may be shallow, and the old
    path needs `git archive` of an old revision.

    Covered: the corpus, the tokenizer run, the pretrain stage cold and warm through the CLI, the
    cache's size, and SFT, reward and PPO chat data cold and from the cache. Not covered: the old
    path (export_baseline, and the chat worker's branch for the old signatures, without
    cache_dir), and the largest corpus's run on two processes (--skip-two-processes: its three
    processes would add ~20 s; the engines test launches pretraining on two processes)."""
    out = tmp_path / "data_pipeline.json"
    stdout = run_bench(
        "data_pipeline.py", "--skip-baseline", "--skip-two-processes", "--sizes-mb", "1", "--conversations", "200",
        "--work-dir", str(tmp_path / "work"), "--out", str(out), *[f"--set={item}" for item in TINY_RUN],
        default_output="bench/results/data_pipeline.json",
    )

    results = json.loads(out.read_text())
    assert results["baseline_rev"] is None
    assert len(json_lines(stdout)) == len(results["pretrain"]) + len(results["chat"])
    [row] = results["pretrain"]
    assert row["path"] == "store" and row["corpus_mb"] == 1
    assert_positive(row, "tokens", "documents", "cold_seconds", "warm_seconds", "peak_rss_mib", "warm_peak_rss_mib",
                    "cache_bytes", "bytes_per_token")
    # Tokenizing 1 MB takes less than the two runs' noise, so the rate may come out at any sign.
    assert math.isfinite(row["tokenize_mb_per_s"])
    assert "two_process_peak_rss_mib" not in row

    chat = {(row["part"], row["attempt"]): row for row in results["chat"]}
    assert set(chat) == {(part, attempt) for part in ("sft", "reward", "ppo") for attempt in ("cold", "warm")}
    for (part, attempt), row in chat.items():
        assert row["path"] == "store" and row["conversations"] == 200
        assert_positive(row, "seconds", "items", "tokens", "peak_rss_mib")
        # The cache gives back what tokenizing gave.
        assert (row["items"], row["tokens"]) == (chat[part, "cold"]["items"], chat[part, "cold"]["tokens"])


def test_gpu_check_runs_every_phase_at_tiny_sizes_without_a_gpu(tmp_path):
    """bench/gpu_check.py --cpu-smoke: the GPU check's own phase functions (peak, the pretrain
    stage's step eager and compiled, chatpipe's sampler against transformers' generate, an
    RLTrainer step, the demo end to end through `chatpipe run`) at tiny sizes, so the check a
    lent GPU runs in one call cannot rot where no GPU is."""
    import torch

    on_gpu = torch.cuda.is_available()  # CI has none; on a GPU the tiny sizes run there
    out = tmp_path / "gpu_check.jsonl"
    stdout = run_bench("gpu_check.py", "--cpu-smoke", "--run-dir", str(tmp_path / "demo"), "--output", str(out),
                       default_output="bench/results/gpu_check.jsonl")

    records = json_lines(out.read_text())
    assert records == json_lines(stdout)
    assert len({record["run_id"] for record in records}) == 1
    assert all("gpu" in record["machine"] and record["settings"]["cpu_smoke"] for record in records)
    measurements = {name: rows[0] for name, rows in by_measurement(records).items()}
    phases = ("peak", "pretrain", "generation", "ppo", "demo", "pretrain_compiled")
    assert set(measurements) == {"versions", *phases, "demo_stage", "summary"}
    for phase in phases:
        assert measurements[phase]["status"] == "ok", measurements[phase]
        assert_positive(measurements[phase], "phase_seconds")
    assert measurements["versions"]["torch"] and measurements["versions"]["transformers"]
    assert_positive(measurements["peak"], "peak_gflops")
    for phase in ("pretrain", "pretrain_compiled"):
        assert_positive(measurements[phase], "median_step_seconds", "tokens_per_second", "achieved_gflops", "mfu",
                        "warmup_seconds", "matmul_parameters")
        assert measurements[phase]["compiled"] is (phase == "pretrain_compiled")
    assert_positive(measurements["generation"], "chatpipe_tokens_per_second", "hf_generate_tokens_per_second",
                    "chatpipe_over_hf_generate")
    ppo = measurements["ppo"]
    assert_positive(ppo, "median_step_seconds", "median_rollout_seconds", "median_sampling_seconds", "median_update_seconds",
                    "generated_tokens_per_second", "mean_response_tokens")
    assert ppo["median_sampling_seconds"] < ppo["median_rollout_seconds"]  # sampling is a part of the rollout

    stages = by_measurement(records)["demo_stage"]
    assert [row["stage"] for row in stages] == ["tokenizer", "pretrain", "sft", "reward", "judges", "ppo", "eval"]
    for row in stages:
        assert row["status"] == "completed" and row["error"] is None and row["seconds"] >= 0  # whole seconds
        assert_positive(row, "peak_rss_mib")
        assert (row["peak_gpu_mib"] is not None) == on_gpu  # recorded only where a GPU is
    assert measurements["demo"]["all_completed"] and measurements["demo"]["stages"] == [row["stage"] for row in stages]
    assert_positive(measurements["demo"], "run_seconds")

    summary = measurements["summary"]
    assert summary["phases_not_ok"] == [] and summary["demo_completed"] is True
    assert_positive(summary, "mfu_eager", "mfu_compiled", "compiled_over_eager", "sampler_over_hf_generate")
    if not on_gpu:
        assert set(summary["met"].values()) == {None}  # the targets are a GPU's


def test_gpu_check_records_a_failed_phase_and_runs_the_next(tmp_path):
    """A tokenizer larger than the model's vocabulary fails the phases that build the model; the
    peak before them and the exit code still say what happened."""
    out = tmp_path / "gpu_check.jsonl"
    result = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--phases", "pretrain,peak", "--bpe-vocab", "600",
         "--output", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    measurements = {name: rows[0] for name, rows in by_measurement(json_lines(out.read_text())).items()}
    assert measurements["pretrain"]["status"] == "failed"
    assert "--bpe-vocab 600 is above the model's vocabulary 512" in measurements["pretrain"]["error"]
    assert measurements["peak"]["status"] == "ok"  # run after the failure
    assert measurements["summary"]["phases_not_ok"] == ["pretrain"]


def test_gpu_check_without_a_gpu_says_to_use_the_cpu_smoke(tmp_path):
    # No GPU visible to the script, whatever this machine has, so the refusal is checked everywhere.
    result = subprocess.run([sys.executable, "bench/gpu_check.py", "--output", str(tmp_path / "out.jsonl")],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 2
    assert "no CUDA GPU here" in result.stderr and "--cpu-smoke" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.distributed
def test_engines_runs_a_stage_on_one_process_and_under_ddp(tmp_path, shakespeare_excerpt):
    """One engine (DDP, two CPU processes over gloo) and one stage: pretraining, as the script
    launches it. The other engines and part 2 (PPO memory at hidden 512) are left out."""
    out = tmp_path / "engines.json"
    corpus = f"pretrain.data={{path: {shakespeare_excerpt}}}"
    stdout = run_bench(
        "engines.py", "--engines", "ddp", "--stages", "pretrain", "--skip-memory", "--out", str(out),
        *[part for item in [*TINY_RUN, corpus] for part in ("--set", item)],
        default_output="bench/results/engines.json",
    )

    rows = json.loads(out.read_text())
    assert rows == json_lines(stdout)
    assert [(row["engine"], row["stage"], row["processes"]) for row in rows] == [("one", "pretrain", 1), ("ddp", "pretrain", 2)]
    for row in rows:
        assert row["part"] == "stages" and row["completed"] and row["error"] is None
        assert_positive(row, "peak_rss_mib", "eval_loss")
        assert row["seconds"] >= 0  # the manifest's whole seconds: a two-step stage can take 0


def test_the_fault_probe_classes_its_config_cases(tmp_path):
    """scripts/fault_probe.py, at its cheapest group (bad configs need no finished run): every case
    tried, classed, written as a JSON line; today each is a clear refusal."""
    out = tmp_path / "probe.jsonl"
    result = subprocess.run(
        [sys.executable, "scripts/fault_probe.py", "--work", str(tmp_path / "work"), "--group", "validation",
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    cases = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(cases) == 5 and {case["group"] for case in cases} == {"validation"}
    assert [case["outcome"] for case in cases] == ["clear"] * 5
    assert all(case["exit_code"] == 2 and case["message"].startswith("chatpipe: ") for case in cases)
    assert "validation      5      5          0     0     0" in result.stdout
