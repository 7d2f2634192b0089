"""The arithmetic task: correct worked answers, disjoint splits, plausible wrong answers."""

import re

import numpy as np
import pytest

from jaxpt.data import arithmetic
from jaxpt.data.arithmetic import Problem, generate_examples, generate_preference_pairs
from jaxpt.rewards.arithmetic import parse_problem


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


def test_operand_range_task_enumerates_882_problems_split_disjointly():
    task = arithmetic.ArithmeticTask(
        max_operand=20, negative_answers=True, style="answer", test_fraction=0.4,
        question="What is {a} {op} {b}? Reply with just the number.",
    )
    train = generate_examples(-1, seed=0, split="train", task=task)
    test = generate_examples(-1, seed=0, split="test", task=task)
    assert len(train) + len(test) == 21 * 21 * 2  # every ordered a, b in 0..20 and both ops
    assert len(test) >= 300

    def problems(rows):
        pattern = r"What is (\d+) ([+-]) (\d+)\? Reply with just the number\."
        matches = (re.fullmatch(pattern, r["prompt"][0]["content"]) for r in rows)
        return [Problem(int(m[1]), int(m[3]), m[2]) for m in matches]

    train_p, test_p = problems(train), problems(test)
    assert len(set(train_p)) == len(train_p) and len(set(test_p)) == len(test_p)
    # 3+5 and 5+3 are one problem for the split: never one in train and one held out.
    assert not {p.key for p in train_p} & {p.key for p in test_p}
    for row, p in zip(test, test_p):
        assert row["answer"] == str(eval(f"{p.a}{p.op}{p.b}")) == row["messages"][-1]["content"]
    assert any(int(r["answer"]) < 0 for r in test)
    # Another seed draws another order of the same split.
    again = generate_examples(-1, seed=1, split="test", task=task)
    assert sorted(r["answer"] for r in again) == sorted(r["answer"] for r in test)
    assert generate_examples(10, seed=0, split="test", task=task) == test[:10]


def test_operand_range_task_errors_are_clear():
    with pytest.raises(ValueError, match="only .* use -1"):
        generate_examples(500, seed=0, split="test", max_operand=20, test_fraction=0.4)
    with pytest.raises(ValueError, match="needs an operand range"):
        generate_examples(-1, seed=0, split="test", max_digits=2)
    with pytest.raises(ValueError, match="worked solutions need a >= b"):
        arithmetic.ArithmeticTask(max_operand=9, negative_answers=True)
    with pytest.raises(ValueError, match="format string"):
        arithmetic.ArithmeticTask(question="What is {x}?")


def test_answer_style_preference_pairs_have_a_wrong_bare_answer():
    for pair in generate_preference_pairs(
        40, seed=0, split="train", max_operand=20, negative_answers=True, style="answer",
        test_fraction=0.4,
    ):
        assert pair["chosen"][0]["content"] == pair["answer"]
        assert pair["rejected"][0]["content"] != pair["answer"]
        int(pair["rejected"][0]["content"])


def carries(problem: Problem) -> bool:
    """Whether a column carries or borrows into the next one."""
    width = max(len(str(problem.a)), len(str(problem.b)))
    a, b = str(problem.a).zfill(width)[::-1], str(problem.b).zfill(width)[::-1]
    carry = 0
    for x, y in list(zip(map(int, a), map(int, b)))[:-1]:
        carry = int(x + y + carry >= 10) if problem.op == "+" else int(x - y - carry < 0)
        if carry:
            return True
    return False


def test_sloppy_teacher_drops_carries_in_train_solutions_only():
    task = arithmetic.ArithmeticTask(min_digits=1, max_digits=2, dropped_carry_rate=0.6)
    clean = arithmetic.ArithmeticTask(min_digits=1, max_digits=2)
    train = generate_examples(4000, seed=0, split="train", task=task)
    wrong = [e for e in train if final_answer(e["messages"][-1]["content"]) != e["answer"]]
    carrying = [e for e in train if carries(parse_problem(e["problem"]))]
    # Only problems that carry get a wrong solution, about 60% of them; answers stay true.
    assert {e["id"] for e in wrong} <= {e["id"] for e in carrying}
    assert 0.55 < len(wrong) / len(carrying) < 0.65
    for example in wrong:
        solution = example["messages"][-1]["content"]
        assert not re.search(r"^\d+[+-]\d+[+-]1=", solution, re.MULTILINE), solution  # no carry in
        assert example["answer"] == str(eval(example["problem"]))
    # Same problems as the clean teacher; held-out rows are never touched.
    assert [e["problem"] for e in train] == [
        e["problem"] for e in generate_examples(4000, seed=0, split="train", task=clean)
    ]
    test = generate_examples(500, seed=0, split="test", task=task)
    assert test == generate_examples(500, seed=0, split="test", task=clean)
    with pytest.raises(ValueError, match="dropped_carry_rate needs style 'worked'"):
        arithmetic.ArithmeticTask(max_operand=9, style="answer", dropped_carry_rate=0.5)
    with pytest.raises(ValueError, match=r"dropped_carry_rate must be in \[0, 1\]"):
        arithmetic.ArithmeticTask(dropped_carry_rate=1.5)



def test_near_duplicates_are_reworded_copies_in_train_only():
    task = arithmetic.ArithmeticTask(min_digits=1, max_digits=2, near_duplicate_rate=0.3)
    clean = generate_examples(2000, seed=0, split="train", min_digits=1, max_digits=2)
    noisy = generate_examples(2000, seed=0, split="train", task=task)
    copies = [e for e in noisy if e["id"].endswith("-near-dup")]
    # The original rows are untouched and in order; about 30% of them gained one copy.
    assert [e for e in noisy if not e["id"].endswith("-near-dup")] == clean
    assert 0.26 < len(copies) / len(clean) < 0.34
    by_id = {e["id"]: e for e in clean}
    for copy in copies:
        original = by_id[copy["id"].removesuffix("-near-dup")]
        question, reworded = original["messages"][0]["content"], copy["messages"][0]["content"]
        assert reworded != question and copy["prompt"][0]["content"] == reworded
        assert copy["messages"][1:] == original["messages"][1:]
        assert (copy["answer"], copy["problem"]) == (original["answer"], original["problem"])
    test = generate_examples(300, seed=0, split="test", task=task)
    assert test == generate_examples(300, seed=0, split="test", min_digits=1, max_digits=2)
    with pytest.raises(ValueError, match=r"near_duplicate_rate must be in \[0, 1\]"):
        arithmetic.ArithmeticTask(near_duplicate_rate=-0.1)
