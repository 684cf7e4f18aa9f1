"""bench/ppo_vs_trl.py at a tiny setting: every side it can run here completes and its output parses.

Covered: the driver's setup, chatpipe's PPO, RLOO and GRPO worker, a chatpipe variant, TRL's
GRPO and RLOO worker (the TRL the project installs), the held-out score and KL both sides
share, the summary, comparison and curve lines. Not covered: TRL 1.12's PPO worker, which runs
in a venv the benchmark builds from PyPI on first use (bench/.venv-trl112).
"""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import ppo_vs_trl  # noqa: E402

TINY = [
    "--episodes", "16", "--rollout-batch-size", "8", "--micro-batch-size", "4", "--ppo-epochs", "1",
    "--response-length", "8", "--samples-per-prompt", "2", "--hidden-size", "16", "--layers", "1", "--vocab-size", "300",
    "--eval-prompts", "4", "--eval-samples-per-prompt", "1", "--repeats", "1",
]


def test_every_side_completes_and_its_lines_parse(tmp_path):
    results = tmp_path / "ppo_vs_trl.jsonl"
    command = [sys.executable, "bench/ppo_vs_trl.py", *TINY, "--trl", "grpo,rloo",
               "--variant", "gspo=grpo:importance_ratio=sequence,loss_aggregation=sequence_mean", "--results", str(results)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    runs = {line["name"]: line for line in lines if line["kind"] == "run"}
    assert set(runs) == {"trl-grpo", "trl-rloo", "chatpipe-ppo", "chatpipe-rloo", "chatpipe-grpo", "chatpipe-grpo-gspo"}
    for name, run in runs.items():
        assert run["episodes"] == 16, name
        assert run["optimizer_steps"] == 4, name  # 2 rollouts x 1 epoch x 2 minibatches, on both sides
        assert run["episodes_per_second"] > 0 and run["peak_rss_mb"] > 0, name
        assert run["eval_before"]["kl"] == 0.0, name  # the policy before training is the reference
        assert math.isfinite(run["kl_after"]) and math.isfinite(run["score_gain"]), name
    assert runs["chatpipe-grpo-gspo"]["options"] == {"importance_ratio": "sequence", "loss_aggregation": "sequence_mean"}
    assert len({run["eval_before"]["score"] for run in runs.values()}) == 1  # one held-out score before, shared
    comparisons = [line["chatpipe_over_trl"] for line in lines if line["kind"] == "comparison"]
    assert sorted(c["estimator"] for c in comparisons) == ["grpo", "rloo"]
    assert all(c["episodes_per_second_ratio"] > 0 and c["peak_rss_ratio"] > 0 for c in comparisons)
    assert "chatpipe grpo / TRL" in done.stdout and "held-out gain" in done.stdout


def test_a_sweep_runs_grpo_and_rloo_at_every_value_and_ppo_once():
    args = ppo_vs_trl.parse_args(["--sweep", "learning_rate=1e-3,1e-2", "--trl", "grpo,rloo",
                                  "--variant", "dr=grpo:scale_group_rewards=false"])
    sides = ppo_vs_trl.plan_sides(args, trl_python=None)
    names = [side["name"] for side in sides]
    assert names.count("chatpipe-ppo") == 1  # PPO is not swept
    for name in ("trl-grpo", "trl-rloo", "chatpipe-rloo", "chatpipe-grpo", "chatpipe-grpo-dr"):
        assert f"{name}@0.001" in names and f"{name}@0.01" in names
    dr = next(side for side in sides if side["name"] == "chatpipe-grpo-dr@0.01")
    assert dr["options"] == {"scale_group_rewards": False} and dr["changed"] == {"learning_rate": 0.01}
    for bad in ("epochs=1,2", "learning_rate"):
        try:
            ppo_vs_trl.plan_sides(ppo_vs_trl.parse_args(["--sweep", bad]), trl_python=None)
        except SystemExit as error:
            assert bad in str(error)
        else:
            raise AssertionError(f"--sweep {bad} was accepted")


def test_a_malformed_variant_is_named():
    for text, message in (("nolabel", "expected LABEL"), ("x=dpo:a=1", "estimator must be")):
        try:
            ppo_vs_trl.parse_variant(text)
        except SystemExit as error:
            assert message in str(error) and text in str(error)
        else:
            raise AssertionError(f"{text!r} was accepted")
