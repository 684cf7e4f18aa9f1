"""The dpo stage: on tiny real runs after SFT, and its reference log-probs on a tiny model."""

import logging
import shutil

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from data.preferences import pairwise_group
from pipeline.config import LoraSettings
from pipeline.models.lora import add_lora_adapters
from pipeline.orchestration.manifest import read_manifest
from pipeline.orchestration.tracking import read_metric_rows
from reward_model.batching import collate_groups, encode_groups
from stages.dpo.reference import cached_reference, reference_logps, reply_logps, reply_mask
from tests.conftest import chatpipe, resume_after_crash, tiny_causal_lm, tiny_config, tiny_sft_section
from tests.stages.test_reward import marker_preferences


def dpo_section(data, **updates) -> dict:
    """A `dpo:` section on the marker preferences, sized to train in seconds."""
    section = {
        "data": {"path": str(data)}, "validation_fraction": 0.2, "max_length": 64, "max_steps": 30,
        "prompts_per_batch": 8, "learning_rate": 3e-3, "beta": 0.1, "eval_every": 10, "save_every": 10, "log_every": 5,
    }
    section.update(updates)
    return section


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, shakespeare_excerpt):
    folder = tmp_path_factory.mktemp("dpo_run")
    data = marker_preferences(folder / "marker.jsonl")
    config = folder / "run.yaml"
    config.write_text(yaml.safe_dump(tiny_config(shakespeare_excerpt, sft=tiny_sft_section(), dpo=dpo_section(data))))
    run_dir = folder / "run"
    chatpipe("run", str(config), "--run-dir", str(run_dir))
    return config, run_dir


def reference_file(run_dir):
    (folder,) = (run_dir / "cache" / "dpo_reference").iterdir()
    return folder / "reference.safetensors"


def test_dpo_raises_held_out_preference_accuracy_above_the_sft_policys(dpo_run):
    _, run_dir = dpo_run
    stages = read_manifest(run_dir).stages
    metrics = stages["dpo"].metrics
    assert stages["dpo"].inputs["sft"].digest == stages["sft"].output.digest and set(stages["dpo"].inputs) == {"sft"}
    # 150 pairwise prompts (1 pair each) and 50 rankings of 3 (every ordered pair: 3 each), 40 prompts held out.
    assert (metrics["train_prompts"], metrics["validation_prompts"]) == (160, 40)
    assert metrics["train_pairs"] + metrics["eval_pairs"] == 150 + 50 * 3
    # At step 0 the policy is its reference: every implicit reward is 0, so accuracy is a coin flip.
    assert (metrics["initial_eval_accuracy"], metrics["initial_eval_margin"]) == (0.5, 0.0)
    assert metrics["initial_eval_loss"] == pytest.approx(0.6931, abs=1e-4)  # log 2
    # Measured on this run: accuracy 0.5 -> 0.81; the policy's own per-token preference 0.33 -> 0.70.
    assert metrics["eval_accuracy"] >= 0.75 and metrics["eval_margin"] > 0
    assert metrics["eval_likelihood_accuracy"] > metrics["initial_eval_likelihood_accuracy"] + 0.2
    assert metrics["eval_accuracy"] > max(metrics["initial_eval_likelihood_accuracy"], metrics["eval_shorter_wins_accuracy"])
    assert metrics["eval_chosen_reward"] > metrics["eval_rejected_reward"]
    rows = read_metric_rows(run_dir / "dpo")[0]
    assert [row["step"] for row in rows if "eval/accuracy" in row] == [0, 10, 20, 30]
    trained = [row for row in rows if "train/loss" in row]
    assert {"train/chosen_reward", "train/rejected_reward", "train/margin", "train/accuracy"} <= set(trained[-1])
    assert trained[-1]["train/loss"] < 0.6931
    # The output is a plain causal LM, like SFT's.
    assert AutoModelForCausalLM.from_pretrained(run_dir / "dpo" / "final").config.model_type == "llama"


def test_reference_log_probs_are_computed_once_and_reused_on_a_rerun(dpo_run, tmp_path):
    config, run_dir = dpo_run
    assert read_manifest(run_dir).stages["dpo"].metrics["reference_cached"] is False
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    before = reference_file(copy).stat().st_mtime_ns
    output = chatpipe("run", str(config), "--run-dir", str(copy), "--set", "dpo.learning_rate=1e-3").stdout
    assert "sft: up to date, skipped" in output and "dpo: config changed; running" in output
    metrics = read_manifest(copy).stages["dpo"].metrics
    assert metrics["reference_cached"] is True and reference_file(copy).stat().st_mtime_ns == before
    original = read_manifest(run_dir).stages["dpo"].metrics
    assert metrics["initial_eval_loss"] == original["initial_eval_loss"]  # the same reference, the same step 0


def test_crashed_dpo_resumes_from_its_last_checkpoint(dpo_run, tmp_path):
    config, run_dir = dpo_run
    copy = tmp_path / "run"
    resume_after_crash(config, run_dir, copy, "dpo", ["step-000010", "step-000020"], lost="step-000020",
                       resumes_from="step-000010", steps=30)
    metrics, original = (read_manifest(folder).stages["dpo"].metrics for folder in (copy, run_dir))
    assert metrics["resumed_from_step"] == 10 and metrics["reference_cached"] is True
    assert metrics["initial_eval_accuracy"] == original["initial_eval_accuracy"]
    assert metrics["eval_loss"] == pytest.approx(original["eval_loss"], abs=1e-4)
    assert metrics["eval_accuracy"] == original["eval_accuracy"]


def rerun_without_reference_cache(dpo_run, tmp_path, *settings: str):
    """A copy of the run with its DPO reference cache gone, DPO rerun with `settings` (key=value): (run dir, DPO's metrics)."""
    config, run_dir = dpo_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "cache" / "dpo_reference")
    chatpipe("run", str(config), "--run-dir", str(copy), *(part for setting in settings for part in ("--set", setting)))
    return copy, read_manifest(copy).stages["dpo"].metrics


def test_lora_dpo_computes_the_same_reference_with_its_adapter_off(dpo_run, tmp_path):
    copy, metrics = rerun_without_reference_cache(dpo_run, tmp_path, "dpo.lora={r: 8, alpha: 16}", "dpo.learning_rate=1e-2")
    run_dir = dpo_run[1]
    assert metrics["reference_cached"] is False and metrics["eval_accuracy"] > 0.6
    from safetensors.torch import load_file

    lora_reference, full_reference = (load_file(reference_file(folder))["logps"] for folder in (copy, run_dir))
    torch.testing.assert_close(lora_reference, full_reference, atol=1e-5, rtol=1e-6)
    assert not (copy / "dpo" / "final" / "adapter_config.json").exists()  # merged, like SFT's merged policy


def test_simpo_trains_without_a_reference(dpo_run, tmp_path):
    copy, metrics = rerun_without_reference_cache(dpo_run, tmp_path, "dpo.loss=simpo", "dpo.beta=2.0")
    assert metrics["loss_kind"] == "simpo" and metrics["reference_cached"] is None
    assert not (copy / "cache" / "dpo_reference").exists()  # nothing computed, nothing cached
    # SimPO's reward is the policy's own per-token log-prob: its accuracy is the likelihood accuracy.
    # Measured on this run: 0.33 -> 0.89.
    assert metrics["initial_eval_accuracy"] == metrics["initial_eval_likelihood_accuracy"]
    assert metrics["eval_accuracy"] > metrics["initial_eval_accuracy"] + 0.3


def marker_groups(tokenizer):
    rows = [
        {"prompt": "what say you?", "chosen": "the gold of the king", "rejected": "the crown of the king is here"},
        {"prompt": "and then?", "chosen": "gold gold", "rejected": "nothing more"},
    ]
    return encode_groups([pairwise_group(row) for row in rows], tokenizer, max_length=64)


def test_reply_mask_marks_each_rows_last_reply_tokens():
    attention_mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    assert reply_mask(attention_mask, torch.tensor([2, 9])).tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_the_lora_reference_is_the_policy_with_its_adapter_off(bpe_tokenizer):
    groups = marker_groups(bpe_tokenizer)
    base = tiny_causal_lm(bpe_tokenizer)
    expected = reference_logps(base, groups, bpe_tokenizer.pad_token_id, 2, "cpu")
    policy = add_lora_adapters(tiny_causal_lm(bpe_tokenizer), LoraSettings(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # a trained adapter: the policy is no longer its base
        for name, parameter in policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    torch.testing.assert_close(reference_logps(policy, groups, bpe_tokenizer.pad_token_id, 2, "cpu"), expected)
    batch = collate_groups(groups, bpe_tokenizer.pad_token_id)
    with torch.no_grad():
        adapted, tokens = reply_logps(policy, batch["input_ids"], batch["attention_mask"], batch["reply_lengths"])
    assert not torch.allclose(adapted, expected)
    assert tokens.tolist() == [float(length) for group in groups for length in group.reply_lengths]
    assert policy.training  # left in the mode it was in


def test_a_damaged_reference_cache_is_computed_again(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return torch.tensor([-1.5, -2.25, -3.0])

    first, reused = cached_reference(tmp_path, "key", compute)
    again, reused_again = cached_reference(tmp_path, "key", compute)
    assert (reused, reused_again, len(calls)) == (False, True, 1) and torch.equal(first, again)
    path = tmp_path / "key" / "reference.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        repaired, reused = cached_reference(tmp_path, "key", compute)
    assert not reused and len(calls) == 2 and torch.equal(repaired, first)
    assert "was changed after it was written" in caplog.text and "computing the reference log-probs" in caplog.text
