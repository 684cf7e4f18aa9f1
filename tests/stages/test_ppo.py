"""The ppo stage end to end through the CLI: lineage, evaluation, checkpoints and resume."""

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from data.conversations import prompt_of
from data.held_out import read_held_out
from pipeline.config import load_config, nest_ppo_keys
from pipeline.models.checkpoints import is_adapter, load_causal_lm
from pipeline.orchestration.manifest import read_manifest, update_stage
from pipeline.orchestration.tracking import read_metric_rows
from stages.ppo.prompts import load_prompts
from tests.conftest import SAMPLES, chatpipe, tiny_config
from tests.stages.test_reward import marker_preferences


def ppo_section(**updates) -> dict:
    section = {
        "prompts": {"path": str(SAMPLES / "hh_harmless_1000.jsonl"), "conversation_format": "hh", "max_rows": 120},
        "max_prompt_length": 192,
        "validation_fraction": 0.2,
        "total_episodes": 64,
        "rollout_batch_size": 16,
        "num_mini_batches": 2,
        "micro_batch_size": 8,
        "ppo_epochs": 2,
        "response_length": 8,
        "policy_learning_rate": 1e-3,
        "value_learning_rate": 1e-3,
        "eval_prompts": 8,
        "eval_every": 2,
        "save_every": 2,
        "sample_table_every": 2,
    }
    section.update(updates)
    return nest_ppo_keys(section)[0]


def rlhf_config(folder, corpus, **sections) -> dict:
    """A tiny run whose reward model learns marker preferences from the pretrained model, with a
    ppo section; `sections` add or replace sections (e.g. ppo=ppo_section(...), eval={...})."""
    reward = {
        "data": {"path": str(marker_preferences(folder / "marker.jsonl"))}, "init_from": "pretrain",
        "max_length": 64, "max_steps": 20, "learning_rate": 3e-3, "eval_every": 20, "save_every": 20,
    }
    return tiny_config(corpus, reward=reward, **{"ppo": ppo_section(), **sections})


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, shakespeare_excerpt):
    folder = tmp_path_factory.mktemp("ppo_run")
    raw = rlhf_config(folder, shakespeare_excerpt)
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(raw))
    run_dir = folder / "run"
    chatpipe("run", str(config), "--run-dir", str(run_dir))
    return config, run_dir


def test_ppo_records_lineage_and_evaluates_against_the_starting_policy(ppo_run):
    _, run_dir = ppo_run
    stages = read_manifest(run_dir).stages
    ppo = stages["ppo"]
    assert ppo.status == "completed"
    assert ppo.inputs["pretrain"].digest == stages["pretrain"].output.digest
    assert ppo.inputs["reward"].digest == stages["reward"].output.digest
    metrics = ppo.metrics
    assert metrics["rollouts"] == 4 and metrics["episodes"] == 64 and metrics["eval_prompts"] == 8
    assert metrics["score_gain"] == pytest.approx(metrics["score"] - metrics["initial_score"])
    evals = [row for row in read_metric_rows(run_dir / "ppo")[0] if "eval/score" in row]
    assert [row["step"] for row in evals] == [0, 2, 4]
    assert evals[0]["eval/kl"] == 0.0  # the starting policy against itself
    assert evals[-1]["eval/kl"] > 0.0
    rollouts = [row for row in read_metric_rows(run_dir / "ppo")[0] if "objective/kl" in row]
    assert [row["episode"] for row in rollouts] == [16, 32, 48, 64]


def test_held_out_prompts_travel_with_the_output_and_were_never_trained_on(ppo_run):
    config_path, run_dir = ppo_run
    entry = read_manifest(run_dir).stages["ppo"]
    assert "held_out.jsonl" in entry.output.files  # covered by the output digest
    held_out = read_held_out(run_dir / "ppo" / "final")
    assert len(held_out) == entry.metrics["validation_prompts"] > 0
    config = load_config(config_path)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "pretrain" / "final")
    split = load_prompts(config.ppo.data, tokenizer, None, config.seed)
    assert held_out == split.held_out_conversations
    rendered = [
        list(tokenizer.apply_chat_template(prompt_of(c), add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for c in held_out
    ]
    assert rendered == split.held_out
    assert not {tuple(ids) for ids in split.train} & {tuple(ids) for ids in rendered}
    assert len(split.train) + len(split.held_out) == entry.metrics["train_prompts"] + entry.metrics["validation_prompts"]


def test_ppo_policy_loads_with_plain_transformers_and_samples_are_logged(ppo_run):
    _, run_dir = ppo_run
    folder = run_dir / "ppo" / "final"
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert model.generate(**prompt, max_new_tokens=4, do_sample=False).shape[1] > prompt["input_ids"].shape[1]
    samples = [json.loads(line) for line in (run_dir / "ppo" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {2, 4}
    assert all(s["query"].endswith("<|im_start|>assistant\n") and isinstance(s["score"], float) for s in samples)
    checkpoint = run_dir / "ppo" / "checkpoints" / "step-000002"
    assert (checkpoint / "policy" / "model.safetensors").exists() and (checkpoint / "value" / "model.safetensors").exists()
    assert not [p for p in checkpoint.rglob("*") if p.suffix in (".pt", ".pth", ".bin", ".pkl")]


def test_crashed_ppo_resumes_to_the_same_policy(ppo_run, tmp_path):
    config, run_dir = ppo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    checkpoints = copy / "ppo" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000002"]
    shutil.rmtree(copy / "ppo" / "final")
    metrics_file = copy / "ppo" / "metrics.jsonl"
    metrics_file.write_text("".join(line + "\n" for line in metrics_file.read_text().splitlines() if json.loads(line)["step"] <= 2))
    update_stage(copy, "ppo", status="running", output=None)
    assert "ppo: resuming from the last checkpoint (it was interrupted)" in chatpipe("run", str(config), "--run-dir", str(copy)).stdout
    resumed, original = (read_manifest(d).stages["ppo"].metrics for d in (copy, run_dir))
    assert resumed["resumed_from_step"] == 2 and resumed["episodes"] == 64
    assert resumed["initial_score"] == original["initial_score"]
    assert resumed["score"] == pytest.approx(original["score"], abs=1e-4)
    weights = [AutoModelForCausalLM.from_pretrained(d / "ppo" / "final").state_dict() for d in (copy, run_dir)]
    for name, tensor in weights[0].items():
        torch.testing.assert_close(tensor, weights[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_critic_free_estimators_run_through_the_stage(ppo_run, tmp_path, estimator):
    config, run_dir = ppo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    chatpipe("run", str(config), "--run-dir", str(copy), "--set", f"ppo.algorithm.estimator={estimator}", "--set", "ppo.sampling.samples_per_prompt=4")
    metrics = read_manifest(copy).stages["ppo"].metrics
    assert metrics["estimator"] == estimator and metrics["episodes"] == 64
    assert not (copy / "ppo" / "checkpoints" / "step-000002" / "value").exists()


def test_lora_policy_uses_the_disabled_adapter_as_reference(ppo_run, tmp_path):
    config, run_dir = ppo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    chatpipe("run", str(config), "--run-dir", str(copy), "--set", "ppo.lora={r: 4, alpha: 8, save: adapter}")
    folder = copy / "ppo" / "final"
    assert is_adapter(folder)
    evals = [row for row in read_metric_rows(copy / "ppo")[0] if "eval/kl" in row]
    assert evals[0]["eval/kl"] == 0.0 and evals[-1]["eval/kl"] > 0.0
    merged = load_causal_lm(folder)
    base = AutoModelForCausalLM.from_pretrained(copy / "pretrain" / "final")
    assert any(not torch.equal(p, base.get_parameter(n)) for n, p in merged.named_parameters())


def test_eval_compares_the_policies_on_held_out_prompts(ppo_run, tmp_path):
    config, run_dir = ppo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    preferences = run_dir.parent / "marker.jsonl"
    result = chatpipe("eval", str(copy), "--preferences", str(preferences))
    assert "win_rate" in result.stdout  # the comparison table is printed
    entry = read_manifest(copy).stages["eval"]
    metrics = entry.metrics
    assert set(entry.inputs) == {"pretrain", "ppo", "reward"}
    assert 0.0 <= metrics["win_rate"] <= 1.0
    assert metrics["pretrain/kl"] == 0.0  # the reference policy against itself
    assert metrics["ppo/kl"] >= 0.0
    assert metrics["pretrain/perplexity"] > 1.0 and 0 < metrics["ppo/length_mean"] <= 64  # eval.response_length
    assert metrics["reward_accuracy"] > 0.5 and metrics["reward_pairs"] == 300
    samples = [json.loads(line) for line in (copy / "eval" / "final" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == metrics["prompts"] > 0
    assert {"prompt", "pretrain_reply", "pretrain_score", "ppo_reply", "ppo_score"} <= set(samples[0])
    # Eval answered PPO's own held-out prompts, read from its output, in their order.
    held_out_prompts = [prompt_of(c) for c in read_held_out(copy / "ppo" / "final")]
    assert [sample["prompt"] for sample in samples] == held_out_prompts[: len(samples)]
    # Seeded sampling: the same numbers again.
    chatpipe("eval", str(copy), "--preferences", str(preferences))
    assert read_manifest(copy).stages["eval"].metrics["ppo/score"] == metrics["ppo/score"]


def test_report_plots_every_stage_of_a_real_run(ppo_run, tmp_path):
    _, run_dir = ppo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    assert "report.md" in chatpipe("report", str(copy)).stdout
    report = (copy / "report.md").read_text()
    for stage in ("tokenizer", "pretrain", "reward", "ppo"):
        assert stage in report
    for image in ("pretrain", "reward", "ppo"):
        assert f"report/{image}.png" in report
        assert (copy / "report" / f"{image}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
