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
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

Split = Literal["train", "test"]
ANSWER_PREFIX = "#### "


@dataclasses.dataclass(frozen=True)
class Problem:
    """a <op> b (a >= b for subtraction unless the task allows negative answers)."""

    a: int
    b: int
    op: str  # "+" or "-"

    @property
    def question(self) -> str:
        return DEFAULT_QUESTION.format(a=self.a, op=self.op, b=self.b)

    @property
    def answer(self) -> str:
        if self.op == "*":
            return str(self.a * self.b)
        return str(self.a + self.b if self.op == "+" else self.a - self.b)

    @property
    def key(self) -> str:
        """Canonical form used to assign the split (addition and multiplication commute)."""
        commutes = self.op in ("+", "*")
        a, b = (min(self.a, self.b), max(self.a, self.b)) if commutes else (self.a, self.b)
        return f"{a}{self.op}{b}"


DEFAULT_QUESTION = "What is {a}{op}{b}?"
# worked: column by column; answer: the number alone; tool: a calculator call, its result
# in a tool turn, then the answer (``tool_trace``)
STYLES = ("worked", "answer", "tool")
OPS = ("+", "-", "*")
CALCULATOR_CALL = '<tool_call>\n{{"name": "calculator", "arguments": {{"expression": "{expression}"}}}}\n</tool_call>'


@dataclasses.dataclass(frozen=True)
class ArithmeticTask:
    """Which problems exist and how they are asked and answered.

    Operands are drawn by digit count (``min_digits``..``max_digits``, uniform in the count),
    or, when ``max_operand`` is set, uniformly from ``min_operand``..``max_operand`` (then the
    problem space is small enough to enumerate). ``negative_answers`` keeps ``a - b`` with
    ``a < b``; otherwise subtraction swaps its operands. ``question`` is a format string over
    ``a``, ``op`` and ``b``; ``system``, when set, opens the prompt with a system turn (an
    empty one keeps a chat template from inserting its default system prompt). ``style`` "worked" answers column by column ending in "#### x"
    (see the module docstring); "answer" replies with the number alone.

    ``dropped_carry_rate`` makes the train split's worked solutions come from an imperfect
    teacher: that share of the problems that carry or borrow into a next column get a
    solution that forgets to (no "+1"/"-1" there, so a wrong answer). The ``answer`` column
    and the held-out split stay true, so supervised fine-tuning copies the teacher's habit
    while a verifier-scored RL stage can unlearn it.

    ``tool_skip_rate`` (style "tool") makes the train split's traces come from a teacher
    that often does not use its calculator: that share of the problems get a reply that
    skips the call and guesses an answer close to the true one but wrong. The held-out
    split and the ``answer`` column stay true.

    ``near_duplicate_rate`` plants near-duplicates in the train split, as scraped data has:
    that share of the rows gets one extra copy whose question is reworded and re-spaced
    ("what's 67 + 34 ?") and whose reply is the same, so a habit in it counts twice. It is
    the noise that a curation pipeline's near-duplicate step exists to remove.
    """

    min_digits: int = 1
    max_digits: int = 3
    min_operand: int = 0
    max_operand: int | None = None
    ops: tuple[str, ...] = ("+", "-")
    negative_answers: bool = False
    question: str = DEFAULT_QUESTION
    system: str | None = None
    style: str = "worked"
    test_fraction: float = 0.1
    dropped_carry_rate: float = 0.0
    near_duplicate_rate: float = 0.0
    tool_skip_rate: float = 0.0

    def __post_init__(self):
        ops = tuple(self.ops)
        object.__setattr__(self, "ops", ops)
        if not ops or not set(ops) <= set(OPS):
            raise ValueError(f"ops must be a non-empty subset of {list(OPS)}, got {list(ops)}")
        if "*" in ops and self.style == "worked":
            raise ValueError("worked solutions cover '+' and '-': use style 'answer' or 'tool' "
                             "with '*'")
        if not 0 <= self.tool_skip_rate <= 1:
            raise ValueError(f"tool_skip_rate must be in [0, 1], got {self.tool_skip_rate}")
        if self.tool_skip_rate and self.style != "tool":
            raise ValueError("tool_skip_rate needs style 'tool' (it edits tool-use traces)")
        if self.max_operand is None and not 1 <= self.min_digits <= self.max_digits:
            raise ValueError(
                f"need 1 <= min_digits <= max_digits, got {self.min_digits}, {self.max_digits}"
            )
        if self.max_operand is not None and not 0 <= self.min_operand <= self.max_operand:
            raise ValueError(
                f"need 0 <= min_operand <= max_operand, got {self.min_operand}, "
                f"{self.max_operand}"
            )
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        if self.style == "worked" and self.negative_answers:
            raise ValueError("worked solutions need a >= b: use style 'answer' for negatives")
        if not 0 <= self.dropped_carry_rate <= 1:
            raise ValueError(f"dropped_carry_rate must be in [0, 1], got {self.dropped_carry_rate}")
        if not 0 <= self.near_duplicate_rate <= 1:
            raise ValueError(
                f"near_duplicate_rate must be in [0, 1], got {self.near_duplicate_rate}"
            )
        if self.dropped_carry_rate and self.style != "worked":
            raise ValueError("dropped_carry_rate needs style 'worked' (it edits worked solutions)")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        try:
            self.question.format(a=1, op="+", b=2)
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"question {self.question!r} must be a format string over {{a}}, {{op}}, {{b}}: "
                f"{error}"
            ) from None

    def ask(self, problem: Problem) -> list[dict]:
        """The prompt: an optional system turn and the question as the user turn."""
        system = [] if self.system is None else [{"role": "system", "content": self.system}]
        question = self.question.format(a=problem.a, op=problem.op, b=problem.b)
        return system + [{"role": "user", "content": question}]

    def reply(self, problem: Problem) -> str:
        return worked_solution(problem) if self.style == "worked" else problem.answer

    def replies(self, problem: Problem) -> list[dict]:
        """The assistant's side of the chat: one reply, or a tool-use trace."""
        if self.style == "tool":
            return tool_trace(problem)
        return [{"role": "assistant", "content": self.reply(problem)}]

    def oriented(self, a: int, b: int, op: str) -> Problem:
        if op == "-" and a < b and not self.negative_answers:
            a, b = b, a
        return Problem(a, b, op)

    def enumerable(self) -> list[Problem] | None:
        """Every problem of an operand-range task (in a fixed order), else None."""
        if self.max_operand is None:
            return None
        values = range(self.min_operand, self.max_operand + 1)
        problems = {self.oriented(a, b, op): None for a in values for b in values for op in self.ops}
        return list(problems)


def make_problem(
    rng: np.random.Generator,
    min_digits: int = 1,
    max_digits: int = 3,
    ops: Iterable[str] = ("+", "-"),
    task: ArithmeticTask | None = None,
) -> Problem:
    """Draw one problem; each operand's digit count is uniform in [min_digits, max_digits]
    (or, with ``task``, as that task draws them).

    Raising `max_digits` is the difficulty knob: more columns and longer carry chains.
    """
    task = task or ArithmeticTask(min_digits=min_digits, max_digits=max_digits, ops=tuple(ops))

    def number() -> int:
        if task.max_operand is not None:
            return int(rng.integers(task.min_operand, task.max_operand + 1))
        digits = int(rng.integers(task.min_digits, task.max_digits + 1))
        low = 0 if digits == 1 else 10 ** (digits - 1)
        return int(rng.integers(low, 10**digits))

    a, b, op = number(), number(), task.ops[int(rng.integers(len(task.ops)))]
    return task.oriented(a, b, op)


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


def tool_trace(problem: Problem, guess: str | None = None) -> list[dict]:
    """A calculator call (Hermes ``<tool_call>`` format), the tool's result, then the
    answer line; with ``guess``, a reply that skips the tool and answers ``guess``."""
    if guess is not None:
        return [{"role": "assistant", "content": f"{ANSWER_PREFIX}{guess}"}]
    expression = f"{problem.a}{problem.op}{problem.b}"
    return [
        {"role": "assistant", "content": CALCULATOR_CALL.format(expression=expression)},
        {"role": "tool", "name": "calculator", "content": problem.answer},
        {"role": "assistant", "content": f"{ANSWER_PREFIX}{problem.answer}"},
    ]


def guessed_answer(problem: Problem, rng: np.random.Generator) -> str:
    """A wrong answer a model that skipped the tool would give: the true value's leading
    digits kept, one to three of the others changed."""
    true = problem.answer
    digits = list(true.lstrip("-"))
    if len(digits) < 2:
        return str(int(true) + int(rng.choice([-2, -1, 1, 2])))
    for _ in range(100):
        guess = list(digits)
        for at in rng.choice(np.arange(1, len(guess)), size=min(len(guess) - 1, 3),
                             replace=False)[: int(rng.integers(1, 4))]:
            guess[at] = str(int(rng.integers(10)))
        if guess != digits:
            return ("-" if true.startswith("-") else "") + "".join(guess)
    return str(int(true) + 1)


def split_of(problem: Problem, test_fraction: float = 0.1) -> Split:
    """Deterministic split from a hash of the problem's canonical form."""
    digest = hashlib.sha256(problem.key.encode()).digest()
    return "test" if int.from_bytes(digest[:8], "big") / 2**64 < test_fraction else "train"


def _problems(n: int, seed: int, split: Split, task: ArithmeticTask) -> list[Problem]:
    """``n`` distinct problems of ``split`` (n = -1: all of them, for enumerable tasks)."""
    # Seed differs per split so train and test draws are independent.
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    every = task.enumerable()
    if every is not None:
        pool = [p for p in every if split_of(p, task.test_fraction) == split]
        order = rng.permutation(len(pool))
        if n > len(pool):
            raise ValueError(
                f"asked for {n} {split} problems but the task has only {len(pool)} "
                f"(operands {task.min_operand}..{task.max_operand}); use -1 for all of them"
            )
        return [pool[i] for i in order[: len(pool) if n < 0 else n]]
    if n < 0:
        raise ValueError("n = -1 (all problems) needs an operand range (max_operand)")
    seen, problems = set(), []
    for _ in range(50 * n + 1000):
        if len(problems) == n:
            return problems
        problem = make_problem(rng, task=task)
        if problem not in seen and split_of(problem, task.test_fraction) == split:
            seen.add(problem)
            problems.append(problem)
    raise ValueError(f"could not draw {n} distinct {split} problems; widen the digit range")


def _task(task: ArithmeticTask | None, **task_kwargs) -> ArithmeticTask:
    if task is not None and task_kwargs:
        raise TypeError("pass either task= or its fields, not both")
    return task or ArithmeticTask(**task_kwargs)


def to_example(problem: Problem, example_id: str, task: ArithmeticTask | None = None) -> dict:
    """One SFT/RL example: messages, prompt (user turn only), answer and id."""
    task = task or ArithmeticTask()
    prompt = task.ask(problem)
    return {
        "id": example_id,
        "messages": prompt + task.replies(problem),
        "prompt": prompt,
        "answer": problem.answer,
        "problem": f"{problem.a}{problem.op}{problem.b}",  # for step-level rewards
    }


def generate_examples(
    n: int,
    seed: int = 0,
    split: Split = "train",
    *,
    task: ArithmeticTask | None = None,
    **task_kwargs,
) -> list[dict]:
    """`n` distinct problems of one split as chat examples (see `to_example`); the task is
    ``task`` or built from ``ArithmeticTask`` fields (``max_digits=2``, ...)."""
    task = _task(task, **task_kwargs)
    problems = _problems(n, seed, split, task)
    examples = [to_example(p, f"arith-{split}-{seed}-{i}", task) for i, p in enumerate(problems)]
    if split == "train" and task.dropped_carry_rate > 0:
        rng = np.random.default_rng([seed, 3])
        for problem, example in zip(problems, examples):
            dropped = _wrong_solutions(problem, "drop_carry", into_next_column=True)
            if dropped and rng.random() < task.dropped_carry_rate:
                example["messages"][-1]["content"] = dropped[int(rng.integers(len(dropped)))]
    if split == "train" and task.tool_skip_rate > 0:
        rng = np.random.default_rng([seed, 4])
        for problem, example in zip(problems, examples):
            if rng.random() < task.tool_skip_rate:
                example["messages"] = example["prompt"] + tool_trace(
                    problem, guess=guessed_answer(problem, rng))
    if split == "train" and task.near_duplicate_rate > 0:
        examples = _plant_near_duplicates(examples, task.near_duplicate_rate, seed)
    return examples


# Each near-duplicate gets two of these edits of its question.
_REWORDINGS = (
    lambda q: q.replace("What is", "What's"),
    lambda q: q.replace("What is", "what is"),
    lambda q: q.replace("+", " + ").replace("-", " - "),
    lambda q: q.replace("?", " ?"),
    lambda q: "Q: " + q,
    lambda q: q + "  ",
)


def _plant_near_duplicates(examples: list[dict], rate: float, seed: int) -> list[dict]:
    """``examples`` with, after each picked row, a copy whose user turn is reworded."""
    rng = np.random.default_rng([seed, 4])
    out = []
    for example in examples:
        out.append(example)
        if rng.random() >= rate:
            continue
        edits = rng.choice(len(_REWORDINGS), size=2, replace=False)
        copy = json.loads(json.dumps(example))
        for turns in (copy["messages"], copy["prompt"]):
            user = next(t for t in turns if t["role"] == "user")
            for edit in sorted(edits):
                user["content"] = _REWORDINGS[edit](user["content"])
        copy["id"] = example["id"] + "-near-dup"
        out.append(copy)
    return out


def wrong_solution(problem: Problem, rng: np.random.Generator) -> str:
    """A plausible wrong worked answer: a dropped carry/borrow (when the problem has one) or a
    column that is off by one, each with probability 1/2."""
    dropped = _wrong_solutions(problem, "drop_carry")
    pool = dropped if dropped and rng.random() < 0.5 else _wrong_solutions(problem, "slip")
    return pool[int(rng.integers(len(pool)))]


def _wrong_solutions(problem: Problem, kind: str, into_next_column: bool = False) -> list[str]:
    """Worked solutions with one ``kind`` mistake whose answer is wrong: in any column, or
    (``into_next_column``) only where it is passed to a next column ("+1"/"-1" left out)."""
    n_cols = max(len(str(problem.a)), len(str(problem.b)))
    cols = range(n_cols - 1 if into_next_column else n_cols)
    solutions = (worked_solution(problem, (kind, col)) for col in cols)
    return [s for s in solutions if _answer(s) != problem.answer]


def _answer(solution: str) -> str:
    return solution.rsplit(ANSWER_PREFIX, 1)[-1]


def wrong_answer(problem: Problem, rng: np.random.Generator) -> str:
    """A plausible wrong bare answer: off by 1-2, or (for subtraction) the sign flipped."""
    right = int(problem.answer)
    candidates = [right + d for d in (-2, -1, 1, 2)]
    if problem.op == "-" and right:
        candidates.append(-right)
    return str(candidates[int(rng.integers(len(candidates)))])


def generate_preference_pairs(
    n: int,
    seed: int = 0,
    split: Split = "train",
    *,
    task: ArithmeticTask | None = None,
    **task_kwargs,
) -> list[dict]:
    """Rows {"prompt", "chosen", "rejected", "answer", "id"} for reward modeling and DPO."""
    task = _task(task, **task_kwargs)
    problems = _problems(n, seed, split, task)
    rng = np.random.default_rng([seed, 2])
    rows = []
    for i, problem in enumerate(problems):
        rejected = (
            wrong_solution(problem, rng) if task.style == "worked" else wrong_answer(problem, rng)
        )
        rows.append(
            {
                "id": f"arith-pref-{split}-{seed}-{i}",
                "prompt": task.ask(problem),
                "chosen": [{"role": "assistant", "content": task.reply(problem)}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "answer": problem.answer,
            }
        )
    return rows


def solution_steps(solution: str) -> list[str]:
    """A worked solution's steps: its non-empty lines, in order (the answer line last)."""
    return [line for line in solution.split("\n") if line.strip()]


def step_labels(problem: Problem, steps: Sequence[str]) -> list[bool]:
    """Whether each step of a worked solution of ``problem`` is right: step ``i`` is good
    when the first ``i + 1`` steps equal the reference solution's (whitespace aside). The
    first step that differs is the first bad one, and every step after it is bad too: a
    solution that went wrong cannot reach the answer from there."""
    reference = [s.strip() for s in solution_steps(worked_solution(problem))]
    labels, right = [], True
    for i, step in enumerate(steps):
        right = right and i < len(reference) and step.strip() == reference[i]
        labels.append(right)
    return labels


STEP_MISTAKES = ("drop_carry", "slip")


def generate_step_rows(
    n: int,
    seed: int = 0,
    split: Split = "train",
    *,
    error_rate: float = 0.5,
    mistakes: Sequence[str] = ("drop_carry",),
    task: ArithmeticTask | None = None,
    **task_kwargs,
) -> list[dict]:
    """Step-labelled worked solutions for process reward models, one per problem, in the
    stepwise format ``{"prompt", "completions": [steps], "labels": [bool per step]}`` plus
    ``answer``, ``problem`` and ``id``.

    With probability ``error_rate`` a solution is a sloppy one, with one mistake of a kind
    drawn from ``mistakes``: ``drop_carry`` is the sloppy teacher's habit (a carry or borrow
    into the next column forgotten, as ``dropped_carry_rate`` writes SFT data), ``slip`` a
    column's result off by one. A problem without such a mistake to make keeps its right
    solution. The solutions label themselves (``step_labels``): the first wrong column is
    the first bad step.
    """
    task = _task(task, **task_kwargs)
    if task.style != "worked":
        raise ValueError("step-labelled rows need style 'worked' (one step per column)")
    if not 0 <= error_rate <= 1:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    mistakes = tuple(mistakes)
    if not mistakes or not set(mistakes) <= set(STEP_MISTAKES):
        raise ValueError(f"mistakes must be a non-empty subset of {STEP_MISTAKES}, got {mistakes}")
    problems = _problems(n, seed, split, task)
    rng = np.random.default_rng([seed, 5])
    rows = []
    for i, problem in enumerate(problems):
        solution = worked_solution(problem)
        if rng.random() < error_rate:
            kind = mistakes[int(rng.integers(len(mistakes)))]
            wrong = _wrong_solutions(problem, kind, into_next_column=kind == "drop_carry")
            if wrong:
                solution = wrong[int(rng.integers(len(wrong)))]
        steps = solution_steps(solution)
        rows.append({
            "id": f"arith-steps-{split}-{seed}-{i}",
            "prompt": task.ask(problem),
            "completions": steps,
            "labels": step_labels(problem, steps),
            "answer": problem.answer,
            "problem": f"{problem.a}{problem.op}{problem.b}",
        })
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
