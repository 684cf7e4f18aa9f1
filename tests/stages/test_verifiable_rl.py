"""Verifiable RL end to end: GRPO rewarded by the exact-answer checker alone (no reward stage)
raises the held-out exact-match rate of the SFT policy on arithmetic word problems.

The run is configs/tiny-arithmetic.yaml made smaller (fewer steps, problems over 1..5), on
problems generated into the test's folder.
"""

import json

import pytest
import yaml

from data.arithmetic import write_example
from pipeline.orchestration.manifest import read_manifest
from tests.conftest import REPO_ROOT, chatpipe


def arithmetic_config(folder) -> dict:
    files = write_example(folder / "data", sft=300, prompts=200, seed=0, largest=5)
    raw = yaml.safe_load((REPO_ROOT / "configs" / "tiny-arithmetic.yaml").read_text())
    raw["pretrain"].update(data={"path": str(files["corpus"])}, max_steps=100, eval_every=100, save_every=100)
    raw["sft"].update(data={"path": str(files["sft"]), "conversation_format": "messages"}, epochs=3)
    ppo = raw["ppo"]
    ppo["data"].update(prompts={"path": str(files["prompts"]), "conversation_format": "messages"}, validation_fraction=0.2)
    ppo["sampling"].update(total_episodes=320)
    ppo.update(eval_every=10, save_every=10, sample_table_every=10)
    return raw


@pytest.fixture(scope="module")
def arithmetic_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arithmetic")
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(arithmetic_config(folder)))
    run_dir = folder / "run"
    chatpipe("run", str(config), "--run-dir", str(run_dir))
    return config, run_dir


# Not yet true at this scale (issue 28, item 3). Measured held-out exact match, SFT -> GRPO, 40
# problems sampled once each: this test's run 0.15 -> 0.075 (2m28s); the same SFT policy with GRPO at
# lr 3e-4 0.15 -> 0.10, at T 0.7 0.20 -> 0.175, at lr 1e-4 and T 0.7 flat; a stronger SFT (pretrain
# 300 steps, 8 epochs, T 0.7) 0.30 -> 0.25 (4m18s), with lr 1e-3 and no KL 0.30 -> 0.025, with
# 8 samples per prompt 0.175 -> 0.20 (and at lr 1e-4 0.175 -> 0.15). The per-rollout reward shows no upward trend in any of them,
# and the SFT policy's own figure moves 0.175-0.30 with the sampling batch alone: 40 prompts are
# too few to see a small gain. The assertion stays as the issue states it.
@pytest.mark.xfail(reason="GRPO does not yet raise held-out exact match at test scale; see the measurements above", strict=False)
def test_grpo_with_the_checker_alone_beats_the_sft_policy_on_held_out_problems(arithmetic_run):
    _, run_dir = arithmetic_run
    metrics = read_manifest(run_dir).stages["ppo"].metrics
    # Without a reward model the score is the checker's: the exact-match rate on the 40 held-out
    # problems, for the SFT policy (initial_score) and the GRPO policy (score).
    assert metrics["score"] > metrics["initial_score"], metrics


def test_the_checker_alone_needs_no_reward_stage_and_logs_its_own_metric_every_rollout(arithmetic_run):
    _, run_dir = arithmetic_run
    manifest = read_manifest(run_dir)
    assert "reward" not in manifest.stages and "reward" not in manifest.stages["ppo"].inputs
    rows = [json.loads(line) for line in (run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()]
    rollouts = [row for row in rows if "objective/raw_scores" in row]
    assert rollouts and all(row["reward/exact_answer"] == pytest.approx(row["objective/raw_scores"]) for row in rollouts)
