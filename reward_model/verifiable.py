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

from data.arithmetic import ANSWER, solve


def exact_answer(prompts: list[str], replies: list[str], prompt_ids=None, reply_ids=None) -> list[float]:
    """1.0 where the reply is exactly the taught answer, "The answer is N." with N the prompt's
    arithmetic word problem's answer (data/arithmetic.py), surrounding whitespace aside; else 0.0.
    Strict on purpose: a checker that finds "answer is N" anywhere pays a policy to drift from the
    format ("T answer is 7.") or run on past its answer, and it does. A prompt with no such problem
    is an error, not a zero: the checker was pointed at data it cannot check."""
    scores = []
    for prompt, reply in zip(prompts, replies):
        expected = solve(prompt)
        if expected is None:
            raise ValueError(f"no arithmetic word problem in the prompt {prompt!r}")
        scores.append(1.0 if reply.strip() == ANSWER.format(answer=expected) else 0.0)
    return scores
