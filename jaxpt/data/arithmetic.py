"""A verifiable task small enough for a tiny char-level model: multi-digit addition/subtraction.

Each problem is a chat. The assistant works column by column from the units up, one line per
column, then gives the answer on a last line that starts with "#### ":

    user:       What is 347+85?
    assistant:  7+5=12
                4+8+1=13
                3+0+1=4
                #### 432

Addition lines read "x+y=s", with "+1" when a carry comes in. Subtraction (always a >= b, so
answers are never negative) borrows visibly: "14-8=6" when the top digit 4 borrowed ten, and
"-1" when the column pays back an earlier borrow ("3-0-1=2"). The answer is a plain base-10
integer without leading zeros or sign. Reward functions parse the text after the final "#### ".

Train and test splits are disjoint by construction: a problem's split is a hash of its
canonical form ("85+347" and "347+85" are the same problem), so no held-out problem can appear
in training, whatever the seeds.
"""

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import numpy as np

Split = Literal["train", "test"]
ANSWER_PREFIX = "#### "


@dataclasses.dataclass(frozen=True)
class Problem:
    """a <op> b, with a >= b for subtraction."""

    a: int
    b: int
    op: str  # "+" or "-"

    @property
    def question(self) -> str:
        return f"What is {self.a}{self.op}{self.b}?"

    @property
    def answer(self) -> str:
        return str(self.a + self.b if self.op == "+" else self.a - self.b)

    @property
    def key(self) -> str:
        """Canonical form used to assign the split (addition is commutative)."""
        a, b = (min(self.a, self.b), max(self.a, self.b)) if self.op == "+" else (self.a, self.b)
        return f"{a}{self.op}{b}"


def make_problem(
    rng: np.random.Generator,
    min_digits: int = 1,
    max_digits: int = 3,
    ops: Iterable[str] = ("+", "-"),
) -> Problem:
    """Draw one problem; each operand's digit count is uniform in [min_digits, max_digits].

    Raising `max_digits` is the difficulty knob: more columns and longer carry chains.
    """
    ops = tuple(ops)
    if not set(ops) <= {"+", "-"} or not ops:
        raise ValueError(f"ops must be a non-empty subset of '+', '-', got {ops}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")

    def number() -> int:
        digits = int(rng.integers(min_digits, max_digits + 1))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    a, b, op = number(), number(), ops[int(rng.integers(len(ops)))]
    if op == "-" and a < b:
        a, b = b, a
    return Problem(a, b, op)


def worked_solution(problem: Problem, mistake: tuple[str, int] | None = None) -> str:
    """The column-by-column solution ending in "#### <answer>".

    `mistake` makes a plausible wrong solution: ("drop_carry", col) forgets the carry/borrow
    leaving column `col`; ("slip", col) gets column `col`'s result off by one.
    """
    n_cols = max(len(str(problem.a)), len(str(problem.b)))
    top = [int(c) for c in str(problem.a).zfill(n_cols)[::-1]]
    bottom = [int(c) for c in str(problem.b).zfill(n_cols)[::-1]]
    lines, digits, carry = [], [], 0
    for col, (x, y) in enumerate(zip(top, bottom)):
        slip = 1 if mistake == ("slip", col) else 0
        if problem.op == "+":
            total = x + y + carry + slip
            lines.append(f"{x}+{y}{'+1' if carry else ''}={total}")
            digit, carry = total % 10, total // 10
        else:
            borrow = x - y - carry < 0
            shown_top = x + 10 if borrow else x
            digit = (shown_top - y - carry + slip) % 10
            lines.append(f"{shown_top}-{y}{'-1' if carry else ''}={digit}")
            carry = int(borrow)
        if mistake == ("drop_carry", col):
            carry = 0
        if problem.op == "+" and col == n_cols - 1 and carry:
            digit = total  # the last column writes its whole sum
        digits.append(str(digit))
    answer = str(int("".join(reversed(digits))))
    return "\n".join(lines) + f"\n{ANSWER_PREFIX}{answer}"


def split_of(problem: Problem, test_fraction: float = 0.1) -> Split:
    """Deterministic split from a hash of the problem's canonical form."""
    digest = hashlib.sha256(problem.key.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _problems(
    n: int, seed: int, split: Split, test_fraction: float, **problem_kwargs
) -> list[Problem]:
    # Seed differs per split so train and test draws are independent; dedupe within a call.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    seen, problems = set(), []
    for _ in range(50 * n + 1000):
        if len(problems) == n:
            return problems
        problem = make_problem(rng, **problem_kwargs)
        if problem.key not in seen and split_of(problem, test_fraction) == split:
            seen.add(problem.key)
            problems.append(problem)
    raise ValueError(f"could not draw {n} distinct {split} problems; widen the digit range")


def to_example(problem: Problem, example_id: str) -> dict:
    """One SFT/RL example: messages, prompt (user turn only), answer and id."""
    prompt = [{"role": "user", "content": problem.question}]
    return {
        "id": example_id,
        "messages": prompt + [{"role": "assistant", "content": worked_solution(problem)}],
        "prompt": prompt,
        "answer": problem.answer,
    }


def generate_examples(
    n: int,
    seed: int = 0,
    split: Split = "train",
    *,
    min_digits: int = 1,
    max_digits: int = 3,
    ops: Iterable[str] = ("+", "-"),
    test_fraction: float = 0.1,
) -> list[dict]:
    """`n` distinct problems of one split as chat examples (see `to_example`)."""
    problems = _problems(
        n, seed, split, test_fraction, min_digits=min_digits, max_digits=max_digits, ops=ops
    )
    return [to_example(p, f"arith-{split}-{seed}-{i}") for i, p in enumerate(problems)]


def wrong_solution(problem: Problem, rng: np.random.Generator) -> str:
    """A plausible wrong worked answer: a dropped carry/borrow (when the problem has one) or a
    column that is off by one, each with probability 1/2."""
    n_cols = max(len(str(problem.a)), len(str(problem.b)))
    right = problem.answer

    def wrong_ones(kind: str) -> list[str]:
        solutions = (worked_solution(problem, (kind, col)) for col in range(n_cols))
        return [s for s in solutions if _answer(s) != right]

    dropped = wrong_ones("drop_carry")
    pool = dropped if dropped and rng.random() < 0.5 else wrong_ones("slip")
    return pool[int(rng.integers(len(pool)))]


def _answer(solution: str) -> str:
    return solution.rsplit(ANSWER_PREFIX, 1)[-1]


def generate_preference_pairs(
    n: int,
    seed: int = 0,
    split: Split = "train",
    *,
    min_digits: int = 1,
    max_digits: int = 3,
    ops: Iterable[str] = ("+", "-"),
    test_fraction: float = 0.1,
) -> list[dict]:
    """Rows {"prompt", "chosen", "rejected", "answer", "id"} for reward modeling and DPO."""
    problems = _problems(
        n, seed, split, test_fraction, min_digits=min_digits, max_digits=max_digits, ops=ops
    )
    rng = np.random.default_rng([seed, 2])
    rows = []
    for i, problem in enumerate(problems):
        rows.append(
            {
                "id": f"arith-pref-{split}-{seed}-{i}",
                "prompt": [{"role": "user", "content": problem.question}],
                "chosen": [{"role": "assistant", "content": worked_solution(problem)}],
                "rejected": [{"role": "assistant", "content": wrong_solution(problem, rng)}],
                "answer": problem.answer,
            }
        )
    return rows


def write_jsonl(path: str | Path, examples: Iterable[dict]) -> Path:
    """Write one JSON object per line; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for example in examples:
            f.write(json.dumps(example) + "\n")
    return path


def arithmetic_eval_rows(n: int = 200, seed: int = 0, **task_kwargs) -> list[dict]:
    """Held-out arithmetic problems (the test split: disjoint from any training split)."""
    return generate_examples(n, seed, "test", **task_kwargs)
