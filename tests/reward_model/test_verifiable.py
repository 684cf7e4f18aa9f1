"""The exact-answer checker: 1 for exactly the taught reply with the right answer, 0 otherwise, an error off its data."""

import pytest

from pipeline.errors import RewardFunctionError
from reward_model.functions import programmable_reward_function
from pipeline.config import RewardFunctionSpec
from reward_model.verifiable import exact_answer

PROMPT = "<|user|>\nTom has 3 apples and buys 4 more. How many apples does Tom have?\n<|assistant|>\n"


def test_only_the_exact_answer_scores():
    replies = ["The answer is 7.", " The answer is 7.\n", "The answer is 8.", "7", "I think the answer is 7.", "The answer is 77.",
               "T answer is 7.", "The answer is 7.\nThe answer"]
    assert exact_answer([PROMPT] * 8, replies) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_a_prompt_without_a_problem_stops_the_run_naming_the_checker(bpe_tokenizer):
    import torch

    reward = programmable_reward_function([RewardFunctionSpec(function="reward_model.verifiable:exact_answer")], bpe_tokenizer)
    ids = torch.tensor([bpe_tokenizer("Hello there", add_special_tokens=False)["input_ids"]])
    with pytest.raises(RewardFunctionError, match=r"exact_answer .* raised ValueError: no arithmetic word problem"):
        reward(ids, torch.ones_like(ids), ids, torch.ones_like(ids))
