"""Arithmetic word problems with exact answers: the data of the verifiable-RL example
(configs/tiny-arithmetic.yaml), generated here from a seed rather than downloaded.

    python -m data.arithmetic data/samples/arithmetic     # writes the files the example reads

    problem = word_problem(random.Random(0))
    problem.question   # "Tom has 3 apples and buys 4 more. How many apples does Tom have?"
    problem.answer     # 7
    solve(problem.question) == problem.answer    # the answer from the question's text alone

`solve` reads the numbers back out of any text that holds one of the templates (a chat-formatted
prompt included), which is what lets an exact-answer checker (reward_model/verifiable.py) score a
reply from the prompt and the reply alone.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

NAMES = ("Tom", "Ana", "Sam", "Mia", "Leo", "Ada", "Ben", "Zoe")
THINGS = ("apples", "pens", "books", "coins", "cards", "shells", "stamps", "marbles")
# (question template, +1 to add the second number, -1 to take it away)
TEMPLATES = (
    ("{name} has {a} {thing} and buys {b} more. How many {thing} does {name} have?", +1),
    ("{name} has {a} {thing} and finds {b} more. How many {thing} does {name} have now?", +1),
    ("{name} has {a} {thing} and gives away {b}. How many {thing} does {name} have left?", -1),
    ("{name} has {a} {thing} and loses {b}. How many {thing} are left?", -1),
)
ANSWER = "The answer is {answer}."  # the reply format SFT teaches and the checker reads
ANSWER_PATTERN = re.compile(r"answer is (-?\d+)")


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template)
    for field, group in (("name", r"(?P<name>\w+)"), ("thing", r"(?P<thing>\w+)"), ("a", r"(?P<a>\d+)"), ("b", r"(?P<b>\d+)")):
        escaped = escaped.replace(re.escape("{" + field + "}"), group, 1).replace(re.escape("{" + field + "}"), f"(?P={field})")
    return re.compile(escaped)


PATTERNS = tuple((_pattern(template), sign) for template, sign in TEMPLATES)


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int

    @property
    def reply(self) -> str:
        return ANSWER.format(answer=self.answer)

    def conversation(self) -> dict:
        """As a `messages` row: the question, and the solved reply (SFT learns it, PPO cuts it off)."""
        return {"messages": [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.reply}]}


def word_problem(rng: random.Random, largest: int = 9) -> Problem:
    """One problem over numbers 1..largest; a take-away never goes below zero."""
    template, sign = rng.choice(TEMPLATES)
    a, b = rng.randint(1, largest), rng.randint(1, largest)
    if sign < 0 and b > a:
        a, b = b, a
    question = template.format(name=rng.choice(NAMES), thing=rng.choice(THINGS), a=a, b=b)
    return Problem(question, a + sign * b)


def solve(text: str) -> int | None:
    """The exact answer to the first problem in `text`, or None when it holds none."""
    for pattern, sign in PATTERNS:
        match = pattern.search(text)
        if match:
            return int(match["a"]) + sign * int(match["b"])
    return None


def answer_in(reply: str) -> int | None:
    """The number a reply gives after "answer is", or None when it gives none."""
    match = ANSWER_PATTERN.search(reply)
    return int(match[1]) if match else None


def distinct_problems(count: int, seed: int, exclude: set[str] = frozenset(), largest: int = 9) -> list[Problem]:
    """`count` problems with different questions (none of `exclude`), the same for the same seed."""
    rng, problems, seen = random.Random(seed), [], set(exclude)
    for draws in itertools.count():
        if len(problems) == count:
            return problems
        if draws > 1000 * (count + 1):
            raise ValueError(f"only {len(problems)} distinct problems over 1..{largest} beyond the {len(exclude)} excluded; ask for fewer")
        problem = word_problem(rng, largest)
        if problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)


def write_example(folder: str | Path, sft: int = 600, prompts: int = 400, corpus: int = 4000, seed: int = 0,
                  largest: int = 9) -> dict[str, Path]:
    """The example's files: sft.jsonl (solved problems), prompts.jsonl (other problems: RL's prompts,
    whose held-out share measures exact match) and corpus.txt (pretraining's and the tokenizer's
    text: the sft problems and `corpus` - `sft` more, solved, as plain lines). No prompt's question
    is in either of the others.

    The corpus is what teaches the arithmetic: on the sft problems alone a small model memorises
    its questions and answers 1 in 5 new ones; on a few thousand it learns to add and take away,
    and SFT need only teach the reply's form."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    solved = distinct_problems(sft, seed, largest=largest)
    unseen = distinct_problems(prompts, seed + 1, exclude={p.question for p in solved}, largest=largest)
    held = {p.question for p in solved} | {p.question for p in unseen}
    extra = distinct_problems(max(corpus - sft, 0), seed + 2, exclude=held, largest=largest)
    paths = {"sft": folder / "sft.jsonl", "prompts": folder / "prompts.jsonl", "corpus": folder / "corpus.txt"}
    paths["sft"].write_text("".join(json.dumps(p.conversation()) + "\n" for p in solved))
    paths["prompts"].write_text("".join(json.dumps(p.conversation()) + "\n" for p in unseen))
    paths["corpus"].write_text("".join(f"{p.question} {p.reply}\n" for p in solved + extra))
    return paths


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="where to write sft.jsonl, prompts.jsonl and corpus.txt")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name, path in write_example(args.folder, seed=args.seed).items():
        print(f"{name}: {path}")
