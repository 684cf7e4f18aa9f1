"""bench/dpo_vs_trl.py at its tiniest setting: the SFT build, every side, the held-out scoring and the ratios.

One round of chatpipe's dpo stage and TRL's DPOTrainer (both reference modes) on a 1-layer,
hidden-32 SFT policy built by the script itself, 16 training pairs in 4 steps, 16 held out. The
numbers mean nothing at this size; what is checked is that every side completes and that its
lines parse with finite, positive values, and that the ratios are there.
"""

import json
import math
import os
import subprocess
import sys

from tests.bench.test_smoke import assert_positive
from tests.conftest import REPO_ROOT

# configs/tiny.yaml shrunk to seconds (as tests/bench/test_smoke.py's TINY_RUN), for the SFT build.
TINY_SFT = [
    "tokenizer.vocab_size=400", "tokenizer.max_chars=200000",
    "model.config.hidden_size=32", "model.config.intermediate_size=64", "model.config.num_hidden_layers=1",
    "model.config.num_attention_heads=2", "model.config.num_key_value_heads=2",
    "pretrain.data=[{path: data/samples/tinyshakespeare.txt, max_rows: 2000}]", "pretrain.block_size=32",
    "pretrain.per_device_batch_size=4", "pretrain.eval_batches=1", "pretrain.log_every=1",
    "sft.data.max_rows=40", "sft.max_length=96", "sft.max_steps=2", "sft.per_device_batch_size=4", "sft.log_every=1",
]


def test_every_side_completes_and_its_lines_parse(tmp_path):
    out = tmp_path / "dpo_vs_trl.jsonl"
    command = [sys.executable, "bench/dpo_vs_trl.py", "--pretrain-steps", "2", "--pair-rows", "200", "--max-length", "512", "--held-out", "16",
               "--train-pairs", "16", "--batch", "4", "--stage-eval-pairs", "4", "--rounds", "1", "--out", str(out),
               *(part for override in TINY_SFT for part in ("--set", override))]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert records == [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    by_kind = {}
    for record in records:
        by_kind.setdefault(record["measurement"], []).append(record)
    assert set(by_kind) == {"setup", "run", "summary", "ratio"}
    assert by_kind["setup"][0]["rendered_differently"] == 0  # TRL tokenizes exactly what chatpipe trains on
    runs = {record["name"]: record for record in by_kind["run"]}
    assert set(runs) == {"chatpipe", "trl", "trl-precompute"}
    for name, run in runs.items():
        assert (run["steps"], run["pairs"]) == (4, 16), name  # the same optimiser steps and pairs on every side
        assert_positive(run, "pairs_per_second", "loop_pairs_per_second", "process_pairs_per_second", "peak_rss_mb", "loop_seconds")
        held_out = run["held_out"]
        assert held_out["pairs"] == 16 and 0 <= held_out["interval"][0] <= held_out["accuracy"] <= held_out["interval"][1] <= 1
        assert math.isfinite(run.get("train_loss_last_logged", run.get("train_loss_mean"))) and math.isfinite(held_out["margin"]), name
    assert_positive(runs["chatpipe"], "reference_seconds")
    assert_positive(runs["trl-precompute"], "reference_seconds")
    assert runs["trl"]["reference_seconds"] == 0  # on the fly, inside its loop
    ratios = {record["trl_side"]: record for record in by_kind["ratio"]}
    assert set(ratios) == {"trl", "trl-precompute"}
    for ratio in ratios.values():
        assert_positive(ratio, "pairs_per_second_ratio", "loop_pairs_per_second_ratio", "process_pairs_per_second_ratio", "peak_rss_ratio")
        low, high = ratio["accuracy_difference"]["interval"]
        assert low <= ratio["accuracy_difference"]["difference"] <= high
    assert "chatpipe / trl:" in done.stdout and "held-out accuracy" in done.stdout
