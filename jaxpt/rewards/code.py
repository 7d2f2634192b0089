"""Reward for code: run the completion's program against the task's tests in the sandbox.

Tests come in the dataset's `tests` column, one entry per completion, as either
- assert statements: a string of Python (`"assert f(1) == 2\\nassert f(2) == 3"`) or a list of
  such strings (MBPP's `test_list`), appended to the program and counted one by one; or
- stdin/stdout cases: a list of `{"input": ..., "output": ...}` or `{"inputs": [...],
  "outputs": [...]}` (APPS style); the program runs once per case.
Either may also arrive JSON-encoded in a string. The reward is the fraction of tests passed
(`partial_credit=False`: 1.0 only if all pass), always in [0, 1].

The program cannot forge its score. Assert tests run in a separate sandboxed process
(`run_tests`): each name the program defines is a stub there that calls the program with plain
data and gets plain data back, and that process alone reports verdicts, on a channel the program
does not hold. Printing, exiting early, patching builtins or returning an object that equals
everything earns nothing; only values the tests accept do. Arguments pass by value (changes a
function makes to its arguments in place are not seen by the tests), and only plain data crosses
(a test that passes a lambda, or gets back a generator, fails). Builtin names (`abs`, `len`...)
and the tests' own definitions always win over the program's; a test that calls another of the
program's functions (e.g. a helper from a HumanEval prompt) trusts that function. stdin/stdout
cases compare the program's captured output outside the sandbox, and need exit status 0.
"""

import ast
import json
import os
import re
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jaxpt.rewards.sandbox import run_tests, run_untrusted
from jaxpt.rewards.text import completion_text

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}

_MIN_OUTPUT_BYTES = 256 * 1024


def extract_code(text: str) -> str | None:
    """The last ```python fenced block (or the last untagged block when none is tagged)."""
    blocks = _FENCE.findall(text)
    python = [body for tag, body in blocks if tag.lower() in _PYTHON_TAGS]
    untagged = [body for tag, body in blocks if not tag]
    chosen = python or untagged
    return chosen[-1] if chosen else None


def code_reward(
    prompts: Sequence[Any],
    completions: Sequence[Any],
    tests: Sequence[Any],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    partial_credit: bool = True,
    max_workers: int | None = None,
    python: str | None = None,
    **kwargs: Any,
) -> list[float | None]:
    """Fraction of `tests` each completion's code passes; 0.0 without code, None without tests.

    Completions run in parallel threads, each in its own sandbox (`run_untrusted`);
    `timeout_s` and `memory_mb` apply to each sandboxed run.
    """
    if len(completions) != len(tests):
        raise ValueError(f"{len(completions)} completions but {len(tests)} tests")
    # Parse every row's tests first: a malformed one fails the batch before anything runs.
    suites = [None if t is None else _normalize_tests(t) for t in tests]
    run = {"timeout_s": timeout_s, "memory_mb": memory_mb, "python": python}

    def score(completion: Any, suite: tuple[str, list] | None) -> float | None:
        if suite is None:
            return None
        code = extract_code(completion_text(completion))
        if code is None:
            return 0.0
        return _score(code, suite, partial_credit, run)

    workers = max_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(completions)))) as pool:
        return list(pool.map(score, completions, suites))


def _score(code: str, suite: tuple[str, list], partial_credit: bool, run: dict) -> float:
    kind, cases = suite
    if kind == "asserts":
        passed = _run_asserts(code, cases, run)
        total = sum(is_test for is_test, _ in cases)
    else:
        passed, total = 0, len(cases)
        for stdin, expected in cases:
            # Room for the expected output, so that a correct answer is never cut; a cut one
            # carries a truncation marker and cannot match.
            cap = max(_MIN_OUTPUT_BYTES, 2 * len(expected.encode()) + 1024)
            result = run_untrusted(code, stdin=stdin, max_output_bytes=cap, **run)
            if not (result.ok and _same_output(result.stdout, expected)):
                if not partial_credit:
                    break
                continue
            passed += 1
    if total == 0:
        return 0.0
    passed = min(passed, total)
    return passed / total if partial_credit else float(passed == total)


def _run_asserts(code: str, statements: list[tuple[bool, str]], run: dict) -> int:
    result = run_tests(code, statements, **run)
    return sum(result.verdicts)


def _normalize_tests(case_spec: Any) -> tuple[str, list]:
    """("asserts", [(is_test, source)]) or ("io", [(stdin, expected_stdout)])."""
    if isinstance(case_spec, str) and case_spec.strip()[:1] in ("[", "{"):
        try:
            case_spec = json.loads(case_spec)
        except ValueError:
            pass  # Python that happens to start with a bracket
    if isinstance(case_spec, str):
        return "asserts", _split_statements(case_spec)
    if isinstance(case_spec, Mapping) and "inputs" in case_spec:
        pairs = zip(case_spec["inputs"], case_spec["outputs"], strict=True)
        return "io", [(_as_text(i), _as_text(o)) for i, o in pairs]
    if isinstance(case_spec, Sequence):
        if all(isinstance(item, str) for item in case_spec):
            return "asserts", [s for item in case_spec for s in _split_statements(item)]
        if all(isinstance(item, Mapping) for item in case_spec):
            return "io", [(_as_text(c["input"]), _as_text(c["output"])) for c in case_spec]
    raise ValueError(f"unsupported tests of type {type(case_spec).__name__}")


def _split_statements(source: str) -> list[tuple[bool, str]]:
    """Top-level statements, each marked as a test (an assert) or setup (anything else)."""
    module = ast.parse(source)  # the dataset's tests are trusted; a bad one should raise
    if not module.body:
        return []  # nothing to pass: an empty test must not be a free point
    statements = [
        (isinstance(node, ast.Assert), ast.get_source_segment(source, node) or "")
        for node in module.body
    ]
    if not any(is_test for is_test, _ in statements):
        # e.g. HumanEval's `def check(candidate): ...` followed by `check(f)`: one test.
        return [(True, source)]
    return statements


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, Sequence):
        return "\n".join(str(v) for v in value)
    return str(value)


def _same_output(actual: str, expected: str) -> bool:
    """Equal up to trailing spaces on each line and blank lines at either end."""

    def lines(text: str) -> list[str]:
        stripped = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
        while stripped and not stripped[-1]:
            stripped.pop()
        while stripped and not stripped[0]:
            stripped.pop(0)
        return stripped

    return lines(actual) == lines(expected)
