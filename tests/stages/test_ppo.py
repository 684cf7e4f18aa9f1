"""The ppo stage end to end through the CLI: lineage, evaluation, checkpoints and resume."""

import json
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from data.conversations import prompt_of
from data.held_out import read_held_out
from data.preferences import normalize_preferences
from data.sources import load_source
from pipeline.config import PreferenceData, load_config, nest_ppo_keys
from pipeline.models.checkpoints import is_adapter, load_causal_lm
from pipeline.orchestration.manifest import read_manifest, update_stage
from pipeline.orchestration.tracking import read_metric_rows
from reward_model.judges import judge_folders
from reward_model.provenance import HELD_OUT_NAME, fingerprint, read_trained_on
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


def judges_section(**updates) -> dict:
    """Two judges on 40% of the reward data's prompts (the reward model never sees them)."""
    return {"count": 2, "reward_share": 0.4, "max_length": 64, "max_steps": 10, "learning_rate": 3e-3,
            "eval_every": 10, "save_every": 5, **updates}


def rlhf_config(folder, corpus, **sections) -> dict:
    """A tiny run whose reward model and judges learn marker preferences from the pretrained model,
    with a ppo section; `sections` add or replace sections (e.g. ppo=ppo_section(...), eval={...})."""
    reward = {
        "data": {"path": str(marker_preferences(folder / "marker.jsonl"))}, "init_from": "pretrain",
        "max_length": 64, "max_steps": 20, "learning_rate": 3e-3, "eval_every": 20, "save_every": 20,
    }
    return tiny_config(corpus, reward=reward, **{"judges": judges_section(), "ppo": ppo_section(), **sections})


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
    assert ppo.inputs["judges"].digest == stages["judges"].output.digest
    metrics = ppo.metrics
    assert metrics["rollouts"] == 4 and metrics["episodes"] == 64 and metrics["eval_prompts"] == 8
    assert metrics["score_gain"] == pytest.approx(metrics["score"] - metrics["initial_score"])
    evals = [row for row in read_metric_rows(run_dir / "ppo")[0] if "eval/score" in row]
    assert [row["step"] for row in evals] == [0, 2, 4]
    assert evals[0]["eval/kl"] == 0.0  # the starting policy against itself
    assert evals[-1]["eval/kl"] > 0.0
    # The judges score every evaluation; against the starting policy's own replies every comparison is a tie.
    assert evals[0]["eval/judges_win_rate"] == 0.5 and evals[0]["eval/judges_lc_win_rate"] == pytest.approx(0.5)
    assert all("eval/judges_score" in row and "eval/score_standardized" in row for row in evals)
    assert metrics["judges_score"] == evals[-1]["eval/judges_score"] and metrics["selected_rollout"] == 4
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
    result = chatpipe("eval", str(copy))
    assert "win_rate" in result.stdout  # the comparison table is printed
    entry = read_manifest(copy).stages["eval"]
    metrics = entry.metrics
    assert set(entry.inputs) == {"pretrain", "ppo", "reward", "judges"}
    assert 0.0 <= metrics["win_rate"] <= 1.0
    assert metrics["pretrain/kl"] == 0.0  # the reference policy against itself
    assert metrics["ppo/kl"] >= 0.0
    assert metrics["pretrain/perplexity"] > 1.0 and 0 < metrics["ppo/length_mean"] <= 64  # eval.response_length
    # Every comparison by the reward model (as sampled and completed), each judge and their mean, with intervals.
    prompts, samples = metrics["prompts"], metrics["samples_per_prompt"]
    assert samples == 4 and metrics["judges"] == ["judge-0", "judge-1"]
    for scorer in ("reward_sampled", "reward", "judge-0", "judge-1", "judges"):
        for kind in ("win_rate", "lc_win_rate", "matched_win_rate"):
            key = f"ppo_vs_pretrain/{scorer}/{kind}"
            if kind != "matched_win_rate" or metrics[f"{key}_n"] > 0:
                assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"], key
        assert metrics[f"ppo_vs_pretrain/{scorer}/win_rate_n"] == prompts * samples * samples
    assert metrics["judge_win_rate"] == metrics["ppo_vs_pretrain/judges/win_rate"]
    assert 0.0 <= metrics["ppo_vs_pretrain/judges/all_agree"] <= metrics["ppo_vs_pretrain/judges/pairwise_agreement"] <= 1.0
    # Fixed replies scored like a policy's, against each policy.
    assert [slug for slug, _ in metrics["null_replies"]] == ["empty", "i_don_t_know", "i_m_sorry_i_can_t_help_with_that"]
    for slug, _ in metrics["null_replies"]:
        for policy in ("pretrain", "ppo"):
            assert 0.0 <= metrics[f"null/{slug}/vs_{policy}/reward_sampled/win_rate"] <= 1.0
            assert 0.0 <= metrics[f"null/{slug}/vs_{policy}/judges/win_rate"] <= 1.0
    for policy in ("pretrain", "ppo"):
        assert 0.0 <= metrics[f"{policy}/eos_share"] <= 1.0 and metrics[f"{policy}/cut_share"] == pytest.approx(1 - metrics[f"{policy}/eos_share"])
        assert 0.0 < metrics[f"{policy}/distinct_2"] <= 1.0
    # Accuracy only on pairs no model trained on (the judges' held-out share), beside the length rule.
    judges = read_manifest(copy).stages["judges"].metrics
    assert metrics["accuracy/pairs"] > 0 and metrics["accuracy/excluded_pairs"] == 0
    assert metrics["accuracy/source"].endswith("judges/final/held_out_preferences.jsonl")
    assert metrics["reward_accuracy"] == metrics["accuracy/reward"] > 0.5
    assert metrics["accuracy/judge-0"] == pytest.approx(judges["judge-0/accuracy"])
    assert 0.0 <= metrics["accuracy/shorter_wins"] <= 1.0 and metrics["accuracy/chance"] == 0.5
    verdict = (copy / "eval" / "final" / "verdict.txt").read_text().splitlines()
    assert verdict == metrics["verdict"] and verdict[0].startswith("PPO vs the pretrained model at equal length:")
    assert "by 2 held-out judges" in verdict[0] and verdict[0] in result.stdout
    samples_file = [json.loads(line) for line in (copy / "eval" / "final" / "samples.jsonl").read_text().splitlines()]
    assert len(samples_file) == prompts > 0
    assert {"prompt", "pretrain_reply", "pretrain_score", "ppo_reply", "ppo_score", "ppo_replies"} <= set(samples_file[0])
    assert len(samples_file[0]["ppo_replies"]) == samples and {"reply", "reward", "judges"} <= set(samples_file[0]["ppo_replies"][0])
    # Eval answered the prompts the judges held out from every model, in their order.
    held_out = [json.loads(line) for line in (copy / "judges" / "final" / "held_out_preferences.jsonl").read_text().splitlines()]
    assert metrics["prompt_source"].endswith("judges/final/held_out_preferences.jsonl")
    assert [sample["prompt"] for sample in samples_file] == [row["prompt"] for row in held_out][: len(samples_file)]
    # Seeded sampling: the same numbers again.
    chatpipe("eval", str(copy))
    assert read_manifest(copy).stages["eval"].metrics["ppo/score"] == metrics["ppo/score"]


def test_eval_measures_accuracy_only_on_pairs_no_model_trained_on(ppo_run, tmp_path):
    config, run_dir = ppo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    preferences = run_dir.parent / "marker.jsonl"  # the reward model's and the judges' own training data
    chatpipe("eval", str(copy), "--preferences", str(preferences))
    metrics = read_manifest(copy).stages["eval"].metrics
    reward, judges = (read_manifest(copy).stages[stage].metrics for stage in ("reward", "judges"))
    # Only the pairs every model held out are left: the reward model's validation share that the judges did not take.
    assert metrics["accuracy/excluded_pairs"] >= reward["train_pairs"] > 0
    assert metrics["accuracy/pairs"] + metrics["accuracy/excluded_pairs"] == 300
    assert metrics["reward_pairs"] == metrics["accuracy/pairs"]


def test_eval_measures_the_policies_as_ppo_did_on_the_same_prompts(ppo_run, tmp_path):
    """PPO's held-out prompts given to eval, one reply each in one batch, eval.temperature left to
    follow ppo.sampling: the eval stage reports PPO's last evaluation of its policy, and its first
    of the starting policy."""
    config, run_dir = ppo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    raw = yaml.safe_load(config.read_text())
    ppo = raw["ppo"]
    raw["eval"] = {
        "prompts": {"path": str(copy / "ppo" / "final" / "held_out.jsonl")},
        "num_prompts": ppo["eval_prompts"], "samples_per_prompt": 1, "max_prompt_length": ppo["data"]["max_prompt_length"],
        "response_length": ppo["sampling"]["response_length"],
        "batch_size": ppo["algorithm"]["micro_batch_size"],  # PPO's 8 prompts fit one of its batches and one micro-batch
    }
    assert ppo["eval_prompts"] == ppo["algorithm"]["micro_batch_size"] and "temperature" not in raw["eval"]
    with_eval = tmp_path / "with_eval.yaml"
    with_eval.write_text(yaml.safe_dump(raw))
    chatpipe("run", str(with_eval), "--run-dir", str(copy), "--only", "eval")
    stages = read_manifest(copy).stages
    assert stages["ppo"].metrics["kl"] > 0 and stages["eval"].metrics["prompts"] == ppo["eval_prompts"]
    first = next(row for row in read_metric_rows(copy / "ppo")[0] if "eval/score" in row)
    during_ppo = {"ppo": stages["ppo"].metrics, "pretrain": {key.removeprefix("eval/"): value for key, value in first.items()}}
    measured = stages["eval"].metrics
    for policy, figures in during_ppo.items():
        for ppo_key, eval_key in (("score", "score"), ("kl", "kl"), ("judges_score", "judges_score"),
                                  ("response_length", "length_mean"), ("eos_fraction", "eos_share")):
            assert measured[f"{policy}/{eval_key}"] == pytest.approx(figures[ppo_key], rel=1e-6, abs=1e-6), (policy, ppo_key)


def test_ppo_keeps_the_policy_the_judges_prefer_and_stops_when_they_stop_improving(ppo_run, tmp_path):
    config, run_dir = ppo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    chatpipe("run", str(config), "--run-dir", str(copy), "--only", "ppo",
             "--set", "ppo.select_by=judges", "--set", "ppo.early_stop_patience=1")
    metrics = read_manifest(copy).stages["ppo"].metrics
    evals = {row["step"]: row for row in read_metric_rows(copy / "ppo")[0] if "eval/judges_score" in row}
    best = max(evals, key=lambda step: (evals[step]["eval/judges_score"], -step))
    assert metrics["selected_rollout"] == best
    assert metrics["judges_score"] == evals[best]["eval/judges_score"] and metrics["score"] == evals[best]["eval/score"]
    if metrics["stopped_early_at"] is not None:  # one evaluation without a better judges' score
        assert metrics["stopped_early_at"] == best + 2 and max(evals) == best + 2
    final = AutoModelForCausalLM.from_pretrained(copy / "ppo" / "final").state_dict()
    chosen = AutoModelForCausalLM.from_pretrained(copy / "ppo" / "best").state_dict()
    assert all(torch.equal(final[name], chosen[name]) for name in final)


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


def test_ppo_against_a_conservative_reward_from_an_ensemble(ppo_run, tmp_path):
    config, run_dir = ppo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    ensemble = ("--set", "reward.ensemble=2", "--set", "ppo.reward.ensemble_penalty=1.0")
    for stage in ("reward", "ppo"):  # not the judges and eval a full rerun would also repeat
        chatpipe("run", str(config), "--run-dir", str(copy), "--only", stage, *ensemble)
    stages = read_manifest(copy).stages
    assert 0.0 <= stages["reward"].metrics["member-1/accuracy"] <= 1.0
    member = copy / "reward" / "final" / "ensemble" / "member-1"
    first, second = (AutoModelForSequenceClassification.from_pretrained(folder) for folder in (copy / "reward" / "final", member))
    assert not torch.equal(first.score.weight, second.score.weight)  # its own seed
    assert stages["ppo"].status == "completed" and stages["ppo"].inputs["reward"].digest == stages["reward"].output.digest


def test_judges_train_on_pairs_the_reward_model_never_sees(ppo_run):
    _, run_dir = ppo_run
    stages = read_manifest(run_dir).stages
    reward_seen = read_trained_on(run_dir / "reward" / "final")
    folders = judge_folders(run_dir / "judges" / "final")
    assert list(folders) == ["judge-0", "judge-1"]
    judges_seen = [read_trained_on(folder) for folder in folders.values()]
    assert reward_seen and all(seen == judges_seen[0] and not seen & reward_seen for seen in judges_seen)
    held_out = normalize_preferences(load_source(PreferenceData(path=str(run_dir / "judges" / "final" / HELD_OUT_NAME))))[0]
    assert held_out and not {fingerprint(group) for group in held_out} & (reward_seen | judges_seen[0])
    # 40% of the 200 prompts went to the judges, a quarter of those held out from every model.
    judges, reward = stages["judges"].metrics, stages["reward"].metrics
    assert (judges["train_prompts"], judges["held_out_prompts"]) == (60, 20)
    assert reward["train_prompts"] + reward["validation_prompts"] == 120 and reward["prompts_given_to_judges"] == 80
    first, second = (AutoModelForSequenceClassification.from_pretrained(folder) for folder in folders.values())
    assert not torch.equal(first.score.weight, second.score.weight)  # each from its own seed
    assert 0.0 <= judges["judge-0/accuracy"] <= 1.0 and judges["judges"] == 2


def test_eval_compares_dpo_and_ppo_from_the_same_policy_with_it_and_with_each_other(ppo_run, tmp_path):
    """Reward + PPO and DPO from one starting policy (issue 28, item 2): eval answers with all three
    and compares each trained policy with the starting one, then PPO with DPO, by every scorer."""
    config, run_dir = ppo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    raw = yaml.safe_load(config.read_text())
    raw["dpo"] = {"data": raw["reward"]["data"], "max_length": 64, "max_steps": 10,
                  "prompts_per_batch": 8, "learning_rate": 3e-3, "eval_every": 10, "save_every": 10, "log_every": 5}
    with_dpo = tmp_path / "with_dpo.yaml"
    with_dpo.write_text(yaml.safe_dump(raw))
    output = chatpipe("run", str(with_dpo), "--run-dir", str(copy)).stdout
    assert "ppo: up to date, skipped" in output  # a dpo section leaves the other stages as they were
    chatpipe("eval", str(copy))
    stages = read_manifest(copy).stages
    assert set(stages["dpo"].inputs) == {"pretrain"} and set(stages["eval"].inputs) == {"pretrain", "dpo", "ppo", "reward", "judges"}
    # DPO on the reward data leaves out the judges' share, as the reward model does (eval's prompts come from
    # it), and holds out the reward model's held-out prompts.
    assert stages["dpo"].metrics["prompts_given_to_judges"] == stages["reward"].metrics["prompts_given_to_judges"] > 0
    assert stages["dpo"].metrics["validation_prompts"] == stages["reward"].metrics["validation_prompts"]
    metrics = stages["eval"].metrics
    prompts, samples = metrics["prompts"], metrics["samples_per_prompt"]
    for pair in ("dpo_vs_pretrain", "ppo_vs_pretrain", "ppo_vs_dpo"):
        for scorer in ("reward_sampled", "judge-0", "judges"):
            key = f"{pair}/{scorer}/lc_win_rate"
            assert metrics[f"{key}_low"] <= metrics[key] <= metrics[f"{key}_high"], key
            assert metrics[f"{pair}/{scorer}/win_rate_n"] == prompts * samples * samples
    assert metrics["dpo/kl"] > 0 and 0.0 <= metrics["null/i_don_t_know/vs_dpo/judges/win_rate"] <= 1.0
    # The names earlier releases wrote still mean PPO against the starting policy.
    assert metrics["win_rate"] == metrics["ppo_vs_pretrain/reward_sampled/win_rate"]
    verdict = metrics["verdict"]
    assert verdict[0].startswith("DPO vs the pretrained model at equal length:") and "which DPO never trained against" in verdict[0]
    assert verdict[1].startswith("PPO vs the pretrained model at equal length:") and "the reward model it was trained on" in verdict[1]
    assert verdict[2].startswith("PPO vs DPO at equal length:") and "by 2 held-out judges" in verdict[2]
    samples_file = json.loads((copy / "eval" / "final" / "samples.jsonl").read_text().splitlines()[0])
    assert {"pretrain_reply", "dpo_reply", "ppo_reply", "dpo_replies"} <= set(samples_file)
