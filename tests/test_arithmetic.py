"""The arithmetic task: correct worked answers, disjoint splits, plausible wrong answers."""

import re

import numpy as np

from jaxpt.data import arithmetic
from jaxpt.data.arithmetic import Problem, generate_examples, generate_preference_pairs


def final_answer(text: str) -> str:
    return text.rsplit("\n#### ", 1)[1]


def test_worked_solutions_show_carries_and_borrows():
    assert (
        arithmetic.worked_solution(Problem(347, 85, "+")) == "7+5=12\n4+8+1=13\n3+0+1=4\n#### 432"
    )
    assert arithmetic.worked_solution(Problem(347, 85, "-")) == "7-5=2\n14-8=6\n3-0-1=2\n#### 262"
    assert arithmetic.worked_solution(Problem(999, 1, "+")).endswith("9+0+1=10\n#### 1000")


def test_every_answer_is_right_and_every_rejected_answer_wrong():
    rng = np.random.default_rng(0)
    for _ in range(3000):
        problem = arithmetic.make_problem(rng, min_digits=1, max_digits=4)
        assert final_answer(arithmetic.worked_solution(problem)) == problem.answer
        assert int(problem.answer) == eval(f"{problem.a}{problem.op}{problem.b}")
        assert final_answer(arithmetic.wrong_solution(problem, rng)) != problem.answer


def test_splits_are_disjoint_and_deterministic():
    train = generate_examples(3000, seed=0, split="train", max_digits=2)
    test = generate_examples(300, seed=1, split="test", max_digits=2)

    def keys(examples):
        pattern = r"What is (\d+)([+-])(\d+)\?"
        matches = (re.fullmatch(pattern, e["prompt"][0]["content"]) for e in examples)
        return {Problem(int(m[1]), int(m[3]), m[2]).key for m in matches}

    assert not keys(train) & keys(test)
    assert generate_examples(5, seed=0) == generate_examples(5, seed=0)
    example = test[0]
    assert example["messages"][0] == example["prompt"][0]
    assert final_answer(example["messages"][1]["content"]) == example["answer"]


def test_preference_pairs_share_prompt_and_differ_in_answer():
    for pair in generate_preference_pairs(50, seed=3, split="test"):
        assert pair["prompt"][0]["role"] == "user"
        assert final_answer(pair["chosen"][0]["content"]) == pair["answer"]
        assert final_answer(pair["rejected"][0]["content"]) != pair["answer"]
