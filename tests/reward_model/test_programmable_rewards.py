"""Programmable rewards (`ppo.reward.functions`): the combination by weight, the errors, the per-function metric."""

import copy
import math

import pytest
import torch
from accelerate import Accelerator

from data.padding import pad_batch
from pipeline.config import PPOConfig, RewardFunctionSpec, import_reward_function, nest_ppo_keys, validate_config
from pipeline.errors import ConfigError, RewardFunctionError
from reward_model.functions import programmable_reward_function
from stages.ppo.trainer import RLTrainer
from tests.conftest import tiny_causal_lm
from tests.stages.test_ppo_rollout import ppo_settings

HERE = "tests.reward_model.test_programmable_rewards"


# ------------------------------------------------------------------- functions named by path
def reply_length(prompts, replies, prompt_ids, reply_ids):
    return [float(len(ids)) for ids in reply_ids]


def constant_two(prompts, replies, prompt_ids, reply_ids):
    return [2.0] * len(replies)


def raises(prompts, replies, prompt_ids, reply_ids):
    raise KeyError("no answer")


def not_a_number(prompts, replies, prompt_ids, reply_ids):
    return [1.0] * (len(replies) - 1) + [math.nan]


def one_short(prompts, replies, prompt_ids, reply_ids):
    return [1.0] * (len(replies) - 1)


def spec(name: str, weight: float = 1.0) -> RewardFunctionSpec:
    return RewardFunctionSpec(function=f"{HERE}:{name}", weight=weight)


def batch(tokenizer, prompts=("First Citizen:", "Before we proceed"), replies=("hear me", "speak. All:")):
    query_ids, query_mask = pad_batch([tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts],
                                      tokenizer.pad_token_id, side="left")
    response_ids, response_mask = pad_batch([tokenizer(r, add_special_tokens=False)["input_ids"] for r in replies],
                                            tokenizer.pad_token_id, side="right")
    return query_ids, query_mask, response_ids, response_mask


def model_scores(query_ids, query_mask, response_ids, response_mask):
    return torch.tensor([3.0, 7.0])


# ------------------------------------------------------------------------------- combination
def test_functions_alone_are_their_weighted_sum(bpe_tokenizer):
    ids = batch(bpe_tokenizer)
    lengths = ids[3].sum(1).float()
    reward = programmable_reward_function([spec("reply_length", 0.5), spec("constant_two", -1.0)], bpe_tokenizer)
    assert torch.allclose(reward(*ids), 0.5 * lengths - 2.0)


def test_functions_add_to_the_models_standardised_score_in_its_raw_units(bpe_tokenizer):
    ids = batch(bpe_tokenizer)
    mean, std = 4.0, 2.0
    reward = programmable_reward_function([spec("constant_two", 0.25)], bpe_tokenizer, model_scores, model_weight=3.0,
                                          score_mean=mean, score_std=std)
    raw = reward(*ids)
    # What PPO optimises after normalising with the same statistics: 3 x the standardised score + 0.25 x 2.
    assert torch.allclose((raw - mean) / std, 3.0 * (torch.tensor([3.0, 7.0]) - mean) / std + 0.5)


def test_functions_see_decoded_text_and_the_real_ids(bpe_tokenizer):
    seen = {}

    def record(prompts, replies, prompt_ids, reply_ids):
        seen.update(prompts=prompts, replies=replies, prompt_ids=prompt_ids, reply_ids=reply_ids)
        return [0.0] * len(replies)

    from reward_model.functions import ProgrammableReward, WeightedFunction

    ids = batch(bpe_tokenizer)
    ProgrammableReward([WeightedFunction("record", "x:record", record, 1.0)], bpe_tokenizer)(*ids)
    assert [r.strip() for r in seen["replies"]] == ["hear me", "speak. All:"]
    assert seen["prompt_ids"][0] == bpe_tokenizer("First Citizen:", add_special_tokens=False)["input_ids"]
    assert bpe_tokenizer.pad_token_id not in seen["reply_ids"][0]


# ------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize("name, message", [
    ("raises", r"reward function raises \(.*\) raised KeyError: 'no answer'.*'hear me'"),
    ("not_a_number", r"not_a_number .* returned nan for reply 1 'speak. All:'"),
    ("one_short", r"one_short .* returned 1 values for 2 replies"),
])
def test_a_failing_function_is_an_error_naming_it_and_the_reply(bpe_tokenizer, name, message):
    reward = programmable_reward_function([spec(name)], bpe_tokenizer)
    with pytest.raises(RewardFunctionError, match=message):
        reward(*batch(bpe_tokenizer))


@pytest.mark.parametrize("path, message", [
    ("tests.no_such_module:fn", "cannot import module 'tests.no_such_module'"),
    (f"{HERE}:no_such_function", "has no function 'no_such_function'"),
    ("no_colon", r'is not "package.module:name"'),
])
def test_a_bad_import_path_is_a_config_error_naming_the_key_and_value(path, message):
    with pytest.raises(ConfigError, match=message):
        import_reward_function(path)
    raw = {"reward": {"model": False, "functions": [{"function": path}]}, "algorithm": {"estimator": "grpo"},
           "sampling": {"samples_per_prompt": 2}, "data": {"prompts": {"path": "data/samples/hh_harmless_1000.jsonl"}}}
    with pytest.raises(ConfigError) as error:
        validate_config({"name": "t", "model": {"architecture": "llama"}, "pretrain": {"data": {"path": "data/samples/tinyshakespeare.txt"}},
                         "ppo": raw})
    assert "ppo.reward.functions.0.function" in str(error.value) and path in str(error.value)


def test_without_a_model_the_config_needs_functions_and_a_group_estimator():
    base = {"data": {"prompts": {"path": "data/samples/hh_harmless_1000.jsonl"}}, "sampling": {"samples_per_prompt": 2}}
    with pytest.raises(ValueError, match="nothing would score"):
        PPOConfig.model_validate({**base, "reward": {"model": False}, "algorithm": {"estimator": "grpo"}})
    with pytest.raises(ValueError, match="needs estimator rloo or grpo"):
        PPOConfig.model_validate({**base, "reward": {"model": False, "functions": [{"function": f"{HERE}:constant_two"}]}})
    config = PPOConfig.model_validate({**base, "reward": {"model": False, "functions": [{"function": f"{HERE}:constant_two"}]},
                                       "algorithm": {"estimator": "grpo"}})
    assert config.reward.functions[0].name == "constant_two"


# ---------------------------------------------------------------------------------- metric
def test_each_function_logs_its_mean_over_the_rollout(bpe_tokenizer):
    torch.manual_seed(0)
    policy = tiny_causal_lm(bpe_tokenizer, seed=0)
    settings = ppo_settings(estimator="grpo", samples_per_prompt=2, normalize_scores=False, missing_eos_penalty="none")
    reward = programmable_reward_function([spec("reply_length", 0.5), spec("constant_two")], bpe_tokenizer)
    trainer = RLTrainer(policy, copy.deepcopy(policy), None, reward, bpe_tokenizer, settings, Accelerator(cpu=True), total_updates=2)
    query_ids, query_mask = pad_batch([[5, 6, 7]] * 2 + [[8, 9]] * 2, bpe_tokenizer.pad_token_id, side="left")
    for _ in range(2):  # the second rollout's means are its own, not a running total
        metrics, experience = trainer.step(query_ids, query_mask)
        assert metrics["reward/constant_two"] == 2.0
        assert metrics["reward/reply_length"] == pytest.approx(experience.response_mask.sum(1).float().mean().item())
        assert metrics["objective/raw_scores"] == pytest.approx(0.5 * metrics["reward/reply_length"] + 2.0)


# ------------------------------------------------------------------------------ the pipeline
def run_config(**reward):
    ppo = {"data": {"prompts": {"path": "data/samples/hh_harmless_1000.jsonl"}}, "sampling": {"samples_per_prompt": 2},
           "algorithm": {"estimator": "grpo"}, "reward": reward}
    raw = {"name": "t", "model": {"architecture": "llama"}, "pretrain": {"data": {"path": "data/samples/tinyshakespeare.txt"}},
           "sft": {"data": {"path": "data/samples/hh_harmless_1000.jsonl"}}, "ppo": ppo}
    if reward.get("model", True):
        raw["reward"] = {"data": {"path": "data/samples/hh_harmless_1000.jsonl"}}
    return validate_config(raw)


def test_functions_alone_need_no_reward_stage_and_a_config_without_them_hashes_as_before():
    from pipeline.orchestration.registry import get_stage

    ppo = get_stage("ppo")
    alone = run_config(model=False, functions=[{"function": f"{HERE}:constant_two"}])
    assert "reward" not in ppo.choose_inputs(alone)
    plain = run_config()
    assert "reward" in ppo.choose_inputs(plain)
    assert not {"model", "model_weight", "functions"} & set(ppo.config_slice(plain)["ppo"]["reward"])
    assert ppo.config_slice(run_config(functions=[{"function": f"{HERE}:constant_two"}]))["ppo"]["reward"]["functions"]
