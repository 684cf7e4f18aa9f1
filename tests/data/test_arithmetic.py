"""The arithmetic word problems of the verifiable-RL example: seeded, exact, readable back from text."""

import json
import random

import pytest

from data.arithmetic import answer_in, distinct_problems, solve, word_problem, write_example


def test_the_same_seed_gives_the_same_problems_and_every_answer_is_exact():
    first, again = distinct_problems(50, seed=4), distinct_problems(50, seed=4)
    assert first == again and len({p.question for p in first}) == 50
    for problem in first:
        assert solve(problem.question) == problem.answer >= 0
        assert answer_in(problem.reply) == problem.answer


def test_solve_reads_the_problem_out_of_a_chat_formatted_prompt():
    problem = word_problem(random.Random(1))
    assert solve(f"<|user|>\n{problem.question}\n<|assistant|>\n") == problem.answer
    assert solve("Tom has 3 apples and buys 4 more. How many apples does Tom have?") == 7
    assert solve("Mia has 8 pens and loses 7. How many pens are left?") == 1
    assert solve("What is the capital of France?") is None


def test_the_files_never_share_a_question(tmp_path):
    files = write_example(tmp_path, sft=40, prompts=30, corpus=100, seed=2, largest=5)
    questions = {name: {json.loads(line)["messages"][0]["content"] for line in files[name].read_text().splitlines()}
                 for name in ("sft", "prompts")}
    assert len(questions["sft"]) == 40 and len(questions["prompts"]) == 30
    assert not questions["sft"] & questions["prompts"]
    corpus = files["corpus"].read_text().splitlines()
    assert len(corpus) == len(set(corpus)) == 100
    corpus_questions = {line.rsplit(" The answer is", 1)[0] for line in corpus}
    assert questions["sft"] <= corpus_questions and not questions["prompts"] & corpus_questions
    assert all(answer_in(line) == solve(line) for line in corpus)


def test_asking_for_more_problems_than_there_are_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="distinct problems over 1..1"):
        distinct_problems(1000, seed=0, largest=1)
