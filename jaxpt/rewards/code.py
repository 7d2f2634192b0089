"""Reward for code: run the completion's program against the task's tests in the sandbox.

Tests come in the dataset's `tests` column, one entry per completion, as either
- assert statements: a string of Python (`"assert f(1) == 2\\nassert f(2) == 3"`) or a list of
  such strings (MBPP's `test_list`), appended to the program and counted one by one; or
- stdin/stdout cases: a list of `{"input": ..., "output": ...}` or `{"inputs": [...],
  "outputs": [...]}` (APPS style); the program runs once per case.
Either may also arrive JSON-encoded in a string. The reward is the fraction of tests passed
(`partial_credit=False`: 1.0 only if all pass).
"""

import ast
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from jaxpt.rewards.sandbox import run_untrusted
from jaxpt.rewards.text import completion_text

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = {"python", "py", "python3"}

# Appended after the program. Each assert runs on its own, so one failure does not hide the
# rest, and reports through a line carrying a per-run nonce that the program cannot guess,
# so printing "passed" or exiting early with status 0 earns nothing.
_ASSERT_HARNESS = """

def __jaxpt_run_tests(statements, nonce):
    import os
    for index, (is_test, source) in enumerate(statements):
        try:
            exec(source, globals())
            ok = True
        except BaseException:
            ok = False
        if is_test:
            os.write(1, f"\\n{{nonce}} {{index}} {{int(ok)}}\\n".encode())
        elif not ok:
            break  # failed setup: the remaining tests count as failed


__jaxpt_run_tests({statements!r}, {nonce!r})
"""


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
            result = run_untrusted(code, stdin=stdin, max_output_bytes=256 * 1024, **run)
            if not (result.ok and _same_output(result.stdout, expected)):
                if not partial_credit:
                    break
                continue
            passed += 1
    if total == 0:
        return 0.0
    return passed / total if partial_credit else float(passed == total)


def _run_asserts(code: str, statements: list[tuple[bool, str]], run: dict) -> int:
    nonce = secrets.token_hex(16)
    harness = _ASSERT_HARNESS.format(statements=statements, nonce=nonce)
    result = run_untrusted(code + "\n" + harness, max_output_bytes=256 * 1024, **run)
    pattern = re.compile(rf"^{nonce} (\d+) 1$", re.MULTILINE)
    return len(set(pattern.findall(result.stdout)))


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
