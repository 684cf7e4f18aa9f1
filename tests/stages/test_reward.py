"""The reward stage end to end on an easy synthetic preference, through the CLI."""

import json
import random

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from data.padding import pad_batch
from pipeline.orchestration.manifest import read_manifest
from pipeline.orchestration.tracking import read_metric_rows
from reward_model import per_token_scores
from reward_model.scoring import at_last_token, conversation_ids
from reward_model.statistics import STATISTICS_NAME, ScoreStatistics
from tests.conftest import SAMPLES, chatpipe, tiny_config

MARKER = "gold"


@torch.no_grad()
def score_messages(model, tokenizer, conversations):
    """One score per conversation, read where every stage reads it: at the final reply's EOS."""
    ids, mask = pad_batch([conversation_ids(tokenizer, messages) for messages in conversations], tokenizer.pad_token_id)
    return at_last_token(per_token_scores(model.eval(), ids, mask), mask)


def marker_preferences(path, seed=0):
    """Replies with the marker word are preferred: pairwise rows, and 3-way rankings by marker count."""
    words = [w for w in set((SAMPLES / "tinyshakespeare.txt").read_text()[:50_000].lower().split()) if w.isalpha() and w != MARKER]
    words.sort()
    rng = random.Random(seed)

    def reply(markers: int) -> str:
        tokens = rng.sample(words, rng.randint(5, 9))
        for _ in range(markers):
            tokens.insert(rng.randrange(len(tokens) + 1), MARKER)
        return " ".join(tokens)

    rows = []
    for index in range(200):
        prompt = " ".join(rng.sample(words, 4)) + "?"
        if index % 4 == 3:
            rows.append({"prompt": prompt, "completions": [reply(0), reply(2), reply(1)], "scores": [0, 2, 1]})
        else:
            rows.append({"prompt": prompt, "chosen": reply(1), "rejected": reply(0)})
    path.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    return path


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory, shakespeare_excerpt):
    folder = tmp_path_factory.mktemp("reward_run")
    data = marker_preferences(folder / "marker.jsonl")
    raw = tiny_config(
        shakespeare_excerpt,
        reward={
            "data": {"path": str(data)},
            "init_from": "pretrain",
            "validation_fraction": 0.2,
            "max_length": 64,
            "max_steps": 60,
            "prompts_per_batch": 8,
            "learning_rate": 3e-3,
            "warmup_ratio": 0.1,
            "eval_every": 20,
            "save_every": 20,
            "log_every": 10,
        },
    )
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = folder / "run"
    chatpipe("run", str(config), "--run-dir", str(run_dir))
    return config, run_dir


def test_reward_model_learns_an_easy_preference(reward_run):
    _, run_dir = reward_run
    metrics = read_manifest(run_dir).stages["reward"].metrics
    # 150 pairwise prompts (1 pair each) and 50 rankings of 3 (3 pairs each), 40 prompts held out.
    assert metrics["validation_prompts"] == 40 and metrics["train_prompts"] == 160
    assert metrics["validation_pairs"] + metrics["train_pairs"] == 150 + 50 * 3
    assert metrics["accuracy"] >= 0.9
    assert metrics["mean_margin"] > 0
    assert 0.3 <= metrics["initial_accuracy"] <= 0.7  # an untrained head is at chance
    evals = [row for row in read_metric_rows(run_dir / "reward")[0] if "eval/accuracy" in row]
    assert [row["step"] for row in evals] == [0, 20, 40, 60]


def test_reward_checkpoint_scores_new_replies_with_plain_transformers(reward_run):
    _, run_dir = reward_run
    folder = run_dir / "reward" / "final"
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    prompt = [{"role": "user", "content": "what say you?"}]
    with_marker = [prompt + [{"role": "assistant", "content": f"the {MARKER} of the king is here"}] for _ in range(1)]
    without = [prompt + [{"role": "assistant", "content": "the crown of the king is here"}]]
    scores = score_messages(model, tokenizer, with_marker + without)
    assert scores[0] > scores[1]


def test_reward_manifest_records_lineage_and_statistics(reward_run):
    _, run_dir = reward_run
    stages = read_manifest(run_dir).stages
    reward = stages["reward"]
    assert set(reward.inputs) == {"pretrain"}
    assert reward.inputs["pretrain"].digest == stages["pretrain"].output.digest
    assert reward.metrics["reward_std"] > 0 and "reward_mean" in reward.metrics
    assert reward.metrics["rows_read"] == 200 and reward.metrics["rows_dropped"] == 0
    # PPO reads the statistics from the checkpoint folder, where the output digest covers them.
    statistics = ScoreStatistics.read(run_dir / reward.output.path)
    assert (statistics.mean, statistics.std) == (reward.metrics["reward_mean"], reward.metrics["reward_std"])
    assert STATISTICS_NAME in reward.output.files


def test_lora_reward_model_is_saved_merged_and_still_ranks(reward_run, tmp_path):
    import shutil

    config, run_dir = reward_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    chatpipe("run", str(config), "--run-dir", str(copy), "--set", "reward.lora={r: 8, alpha: 16}", "--set", "reward.learning_rate=1e-2")
    metrics = read_manifest(copy).stages["reward"].metrics
    folder = copy / "reward" / "final"
    assert not (folder / "adapter_config.json").exists()
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = [{"role": "user", "content": "what say you?"}]
    scores = score_messages(model, tokenizer, [
        prompt + [{"role": "assistant", "content": f"the {MARKER} of the king is here"}],
        prompt + [{"role": "assistant", "content": "the crown of the king is here"}],
    ])
    assert metrics["accuracy"] >= 0.8 and scores[0] > scores[1]


def test_crashed_reward_stage_resumes_to_the_same_model(reward_run, tmp_path):
    import shutil

    import torch

    from pipeline.orchestration.manifest import update_stage

    config, run_dir = reward_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoints = copy / "reward" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000020", "step-000040"]
    shutil.rmtree(checkpoints / "step-000040")
    shutil.rmtree(copy / "reward" / "final")
    update_stage(copy, "reward", status="running", output=None)
    assert "reward: resuming from the last checkpoint (it was interrupted)" in chatpipe("run", str(config), "--run-dir", str(copy)).stdout
    resumed, original = (read_manifest(d).stages["reward"].metrics for d in (copy, run_dir))
    assert resumed["resumed_from_step"] == 20 and resumed["initial_accuracy"] == original["initial_accuracy"]
    assert resumed["mean_margin"] == pytest.approx(original["mean_margin"], abs=1e-4)
    weights = [AutoModelForSequenceClassification.from_pretrained(d / "reward" / "final").state_dict() for d in (copy, run_dir)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], atol=1e-5, rtol=1e-4)
