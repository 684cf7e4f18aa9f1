"""Verifiable rewards: programmable reward functions (`ppo.reward.functions`) that check a reply
against an answer known exactly, rather than ask a model what it prefers.

    ppo:
      reward:
        model: false
        functions: [{function: "reward_model.verifiable:exact_answer"}]

Each takes (prompts, replies, prompt_ids, reply_ids) and returns one float per reply (see
reward_model/functions.py).
"""

from __future__ import annotations

from data.arithmetic import answer_in, solve


def exact_answer(prompts: list[str], replies: list[str], prompt_ids=None, reply_ids=None) -> list[float]:
    """1.0 where the reply's "answer is N" is the prompt's arithmetic word problem's exact answer
    (data/arithmetic.py), else 0.0. A prompt with no such problem is an error, not a zero: the
    checker was pointed at data it cannot check."""
    scores = []
    for prompt, reply in zip(prompts, replies):
        expected = solve(prompt)
        if expected is None:
            raise ValueError(f"no arithmetic word problem in the prompt {prompt!r}")
        scores.append(1.0 if answer_in(reply) == expected else 0.0)
    return scores
