"""Answer extraction and checking, format reward, the registry and the reward runner."""

import logging
import threading
from fractions import Fraction

import numpy as np
import pytest

from jaxpt.rewards import (
    BUILTIN_REWARDS,
    RewardRunner,
    accuracy,
    answers_match,
    build_reward_fns,
    completion_text,
    extract_answer,
    extract_code,
    format_reward,
    last_number,
    last_number_reward,
    math_reward,
    normalize_number,
    resolve_reward_fn,
)
from jaxpt.rewards.code import code_reward
from jaxpt.rewards.math import math_reward as math_reward_direct

# --- answer extraction ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("First \\boxed{3}, no wait, \\boxed{5}.", "5"),  # the last box wins
        ("So \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),  # nested braces
        ("\\boxed{\\frac{\\sqrt{3}}{2}} is it", "\\frac{\\sqrt{3}}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not count
        ("\\boxed{4} and then a truncated \\boxed{7", "4"),  # unclosed final box is skipped
        ("The answer is 7, but \\boxed{8}", "8"),  # a box beats a phrase
        ("Work.\n#### 72", "72"),
        ("Work.\n#### 1,000\nHope this helps!", "1,000"),  # trailing text after the answer
        ("#### 3\nmore work\n#### 4", "4"),  # the last #### line
        ("#### Step 1: add\n2 + 2 = 4\nThe answer is 4.", "4"),  # a heading is no answer
        ("The answer is 42. Hope this helps!", "42"),
        ("**Answer:** 17", "17"),
        ("so the final answer: -3.5", "-3.5"),
        ("The answer is \\(12\\).", "12"),
        ("I will answer this question later.", None),
        ("no numbers here", None),
        ("", None),
        ("\\boxed{}", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("42", Fraction(42)),
        (" 1,000 ", Fraction(1000)),
        ("$1,234,567.5", Fraction(2469135, 2)),
        ("+5.", Fraction(5)),
        ("-0.75", Fraction(-3, 4)),
        ("6/8", Fraction(3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("-\\dfrac{1}{2}", Fraction(-1, 2)),
        ("123456789012345678901234567890", Fraction(123456789012345678901234567890)),
        ("1,2", None),  # a pair, not a thousands separator
        ("3/0", None),
        ("x+1", None),
        ("", None),
        ("9" * 5000, None),  # over Python's int-parsing limit: not a plain number for us
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_answers_match_is_exact_for_numbers():
    big = "123456789012345678901234567890"
    assert answers_match(big, big)
    assert answers_match("123,456,789,012,345,678,901,234,567,890", big)
    assert not answers_match("123456789012345678901234567891", big)  # float would say equal
    assert answers_match(str(10**40), "1" + "0" * 40)
    assert answers_match("6/8", "3/4")
    assert answers_match("0.75", "3/4")
    assert answers_match("1,000", "1000")
    assert not answers_match("1/3", "0.333333")  # exact, unlike a rounded comparison
    assert not answers_match(None, "1")
    assert not answers_match("1", None)


def test_answers_match_falls_back_to_math_verify():
    assert answers_match("\\frac{1}{2}", "0.5")
    assert answers_match("0.5", "\\frac{1}{2}")
    assert answers_match("\\frac{\\sqrt{2}}{2}", "\\sqrt{2}/2")
    assert answers_match("1+x^2", "x^2+1")
    assert not answers_match("\\frac{1}{3}", "0.5")


def test_answers_match_outside_the_main_thread():
    # math-verify's timeouts use signals, which only work in the main thread.
    results = []
    worker = threading.Thread(target=lambda: results.append(answers_match("\\frac{1}{2}", "0.5")))
    worker.start()
    worker.join()
    assert results == [True]


def test_math_reward():
    completions = [
        "Adding up: 36 + 36 = 72.\n#### 72",
        "I think it is \\boxed{71}",
        "No idea.",
        [{"role": "assistant", "content": "So the answer is 72."}],
        "\\boxed{72}",
    ]
    gold = ["Natalia sold 48/2 = 24 clips... 48+24 = 72\n#### 72", "72", "72", "72", None]
    assert math_reward(prompts=[""] * 5, completions=completions, answer=gold) == [
        1.0,
        0.0,
        0.0,
        1.0,
        None,
    ]
    assert math_reward is math_reward_direct


def test_accuracy():
    assert accuracy(["\\boxed{1}", "\\boxed{2}", "none"], ["1", "3", "4"]) == pytest.approx(1 / 3)


def test_completion_text():
    assert completion_text("plain") == "plain"
    conversation = [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "first"},
        {"role": "assistant", "content": [{"type": "text", "text": "last"}]},
    ]
    assert completion_text(conversation) == "last"
    assert completion_text([{"role": "user", "content": "only"}]) == "only"


# --- format ---------------------------------------------------------------------------------


def test_format_reward_default():
    completions = [
        "Half of 48 is 24.\n48 + 24 = 72\n#### 72",
        "Reasoning.\n#### 1,000\n",
        "#### 72",  # no reasoning
        "Reasoning.\n#### 72\nand then more text",  # #### is not the last line
        "Reasoning, so \\boxed{\\frac{1}{2}}",
        "Reasoning without a marked answer: 72",
    ]
    assert format_reward(None, completions) == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0]


def test_format_reward_custom_pattern():
    completions = ["<think>x</think><answer>3</answer>", "<answer>3</answer>"]
    pattern = r"\A<think>.*?</think><answer>.*?</answer>\Z"
    assert format_reward(None, completions, pattern=pattern) == [1.0, 0.0]


def test_extract_code_takes_the_last_python_block():
    text = "```python\nprint(1)\n```\nbetter:\n```python\nprint(2)\n```\n```text\nout\n```"
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```\nprint(3)\n```") == "print(3)\n"
    assert extract_code("no code") is None
    assert extract_code("```python\nprint(4)") is None  # never closed


# --- registry -------------------------------------------------------------------------------


def test_resolve_builtins_and_import_paths():
    assert resolve_reward_fn("math") is math_reward
    assert resolve_reward_fn("accuracy") is math_reward
    assert resolve_reward_fn("code") is code_reward
    assert set(BUILTIN_REWARDS) >= {"math", "accuracy", "format", "code"}
    assert resolve_reward_fn("jaxpt.rewards.math:math_reward") is math_reward
    assert resolve_reward_fn("jaxpt.rewards.format.format_reward") is format_reward
    with pytest.raises(ValueError, match="unknown reward"):
        resolve_reward_fn("nope")
    with pytest.raises(ImportError):
        resolve_reward_fn("jaxpt.rewards.math:no_such_fn")
    with pytest.raises(ImportError):
        resolve_reward_fn("no_such_package.module.fn")


def test_build_reward_fns_from_config_specs():
    fns = build_reward_fns(
        [
            "math",
            {"name": "format", "weight": 0.5},
            {"name": "boxed", "fn": "format", "weight": 0.1, "kwargs": {"pattern": "boxed"}},
            {"fn": "jaxpt.rewards.math:math_reward", "name": "math2", "weight": 2},
        ]
    )
    assert [(f.name, f.weight) for f in fns] == [
        ("math", 1.0),
        ("format", 0.5),
        ("boxed", 0.1),
        ("math2", 2.0),
    ]
    assert fns[2].fn(None, ["\\boxed{1}", "1"]) == [1.0, 0.0]
    mapping = build_reward_fns({"math": 1.0, "format": {"weight": 0.2}})
    assert [(f.name, f.weight) for f in mapping] == [("math", 1.0), ("format", 0.2)]
    with pytest.raises(ValueError, match="unknown keys"):
        build_reward_fns([{"name": "math", "wieght": 1.0}])


# --- runner ---------------------------------------------------------------------------------


def _constant(value):
    def reward(prompts, completions, **kwargs):
        return [value] * len(completions)

    return reward


def _raises(prompts, completions, **kwargs):
    raise RuntimeError("broken reward")


def test_runner_weights_and_abstain():
    def abstain_on_odd(prompts, completions, **kwargs):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    runner = RewardRunner([("a", _constant(1.0), 2.0), ("b", abstain_on_odd, 0.5)])
    batch = runner(prompts=["p"] * 4, completions=["c"] * 4)
    assert batch.scores["a"].dtype == np.float32
    np.testing.assert_array_equal(batch.scores["b"], [1.0, np.nan, 1.0, np.nan])
    np.testing.assert_allclose(batch.total, [2.5, 2.0, 2.5, 2.0])  # abstain counts as 0
    assert batch.counters["b"]["abstained"] == 2
    metrics = batch.metrics()
    assert metrics["rewards/b/mean"] == 1.0
    assert metrics["rewards/total/mean"] == pytest.approx(2.25)


def test_runner_survives_a_raising_function(caplog):
    runner = RewardRunner([("broken", _raises, 1.0), ("ok", _constant(1.0), 1.0)])
    with caplog.at_level(logging.WARNING, logger="jaxpt.rewards.runner"):
        batch = runner(prompts=["p", "p"], completions=["x" * 10_000, "y"])
        batch = runner(prompts=["p", "p"], completions=["x" * 10_000, "y"])
    assert np.isnan(batch.scores["broken"]).all()
    np.testing.assert_array_equal(batch.total, [1.0, 1.0])
    assert batch.counters["broken"]["errors"] == 1
    assert batch.counters["broken"]["item_errors"] == 2
    assert runner.totals["broken"]["errors"] == 2
    assert runner.totals["ok"]["errors"] == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("'broken'" in m and "RuntimeError" in m for m in messages)
    assert all(len(m) < 1000 for m in messages)  # the 10k-character input is truncated


def test_runner_retries_item_by_item():
    def fails_on_bad(prompts, completions, answer, **kwargs):
        if "bad" in completions:
            raise ValueError("cannot score 'bad'")
        return [float(c == a) for c, a in zip(completions, answer)]

    runner = RewardRunner([("picky", fails_on_bad, 1.0)])
    batch = runner(prompts=["p"] * 3, completions=["1", "bad", "3"], answer=["1", "2", "4"])
    np.testing.assert_array_equal(batch.scores["picky"], [1.0, np.nan, 0.0])
    assert batch.counters["picky"]["item_errors"] == 1

    no_retry = RewardRunner([("picky", fails_on_bad, 1.0)], retry_per_item=False)
    batch = no_retry(prompts=["p"] * 3, completions=["1", "bad", "3"], answer=["1", "2", "4"])
    assert np.isnan(batch.scores["picky"]).all()


def test_runner_counts_wrong_length_and_invalid_values():
    def too_short(prompts, completions, **kwargs):
        return [1.0]

    def odd_values(prompts, completions, **kwargs):
        return [True, "1.0", float("inf"), np.float64(0.5)]

    runner = RewardRunner([("short", too_short, 1.0), ("odd", odd_values, 1.0)])
    batch = runner(prompts=["p"] * 4, completions=["c"] * 4)
    assert batch.counters["short"]["wrong_length"] == 1
    assert np.isnan(batch.scores["short"]).all()
    np.testing.assert_array_equal(batch.scores["odd"], [1.0, np.nan, np.nan, 0.5])
    assert batch.counters["odd"]["invalid_values"] == 2


def test_runner_with_builtins_from_config():
    runner = RewardRunner(build_reward_fns({"math": 1.0, "format": 0.5}))
    batch = runner(
        prompts=["q", "q"],
        completions=["Sum.\n#### 5", [{"role": "assistant", "content": "It is 4"}]],
        answer=["5", "5"],
    )
    np.testing.assert_allclose(batch.total, [1.5, 0.0])
    with pytest.raises(ValueError, match="unique"):
        RewardRunner([("a", _raises, 1.0), ("a", _raises, 1.0)])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("12 + 7 = 19", "19"),
        ("8 - 16 is -8.", "-8"),
        ("It is \u22124", "\u22124"),
        ("The answer is 7.\n\nThis is a classic", "7"),
        ("1.5", "1.5"),
        ("3 / 4", "3/4"),
        ("x2 and the 2nd", None),  # digits glued to letters are not numbers
        ("", None),
        ("no digits", None),
    ],
)
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_last_number_reward_reads_the_last_number_exactly():
    completions = ["12 + 7 = 19", "12 + 7 = 9", "19 is wrong, it is 20", "-3", "3",
                   [{"role": "assistant", "content": "6 - 9 = -3."}], "19.0"]
    gold = ["19", "19", "19", "-3", "-3", "-3", "19"]
    assert last_number_reward([""] * 7, completions, answer=gold) == [
        1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0
    ]
    assert last_number_reward([""], ["5"], answer=[None]) == [None]
    assert resolve_reward_fn("last_number") is last_number_reward
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        last_number_reward(["", ""], ["1", "2"], answer=["1"])


def test_worked_steps_reward_scores_each_column_against_the_problem():
    from jaxpt.rewards import worked_steps_reward

    right = "6+5=11\n7+6+1=14\n#### 141"  # 76+65
    completions = [
        right,
        "6+5=12\n7+6+1=14\n#### 142",  # one column wrong
        "1+1=2\n#### 141",  # a true line about another sum, and the right answer
        right.replace("\n####", "\n1+1=2\n####"),  # padding lowers the share
        [{"role": "assistant", "content": right}],
        "no work at all",
        right,
        right,
    ]
    problems = ["76+65"] * 6 + ["3-9", None]  # a negative subtraction has no worked form
    assert worked_steps_reward([""] * 8, completions, problem=problems) == [
        1.0, 0.5, 0.0, 2 / 3, 1.0, 0.0, None, None
    ]
    assert resolve_reward_fn("worked_steps") is worked_steps_reward


def test_arithmetic_rows_carry_their_problem_for_step_rewards():
    from jaxpt.data import generate_examples
    from jaxpt.rewards import worked_steps_reward

    rows = generate_examples(20, seed=0, split="train", max_digits=3)
    solutions = [row["messages"][-1]["content"] for row in rows]
    scores = worked_steps_reward([r["prompt"] for r in rows], solutions,
                                 problem=[r["problem"] for r in rows])
    assert scores == [1.0] * 20


# --- failing reward functions stop a run ----------------------------------------------------


def _fails_unless_short(prompts, completions, **kwargs):
    if any(len(c) > 1 for c in completions):
        raise ValueError("cannot score a long completion")
    return [1.0] * len(completions)


def test_runner_raises_when_a_function_fails_on_most_items():
    from jaxpt.rewards import RewardError

    runner = RewardRunner([("ok", _constant(1.0), 1.0), ("picky", _fails_unless_short, 1.0)],
                          max_error_frac=0.5)
    # 2 of 4 fail: not more than half, so counted and scored 0 as before.
    batch = runner(prompts=["p"] * 4, completions=["a", "b", "long", "longer"])
    np.testing.assert_array_equal(batch.scores["picky"], [1.0, 1.0, np.nan, np.nan])
    assert batch.counters["picky"]["item_errors"] == 2
    # 3 of 4: the run stops, naming the function, with its first item's traceback.
    with pytest.raises(RewardError, match="'picky' failed on 3 of 4 completions") as info:
        runner(prompts=["p"] * 4, completions=["a", "long", "longer", "longest"])
    message = str(info.value)
    assert "Traceback" in message and "in _fails_unless_short" in message
    assert "ValueError: cannot score a long completion" in message
    # Without the per-item retry a batch-level exception fails every item.
    no_retry = RewardRunner([("broken", _raises, 1.0)], retry_per_item=False, max_error_frac=0.5)
    with pytest.raises(RewardError, match="'broken' failed on 2 of 2") as info:
        no_retry(prompts=["p"] * 2, completions=["x", "y"])
    assert "RuntimeError: broken reward" in str(info.value)
    # Wrong counts and non-numeric scores are failures too.
    for name, fn in (("short", lambda prompts, completions, **kw: [1.0]),
                     ("text", lambda prompts, completions, **kw: ["1"] * len(completions))):
        with pytest.raises(RewardError, match=f"'{name}' failed on 3 of 3"):
            RewardRunner([(name, fn, 1.0)], max_error_frac=0.5)(["p"] * 3, ["a", "b", "c"])


def test_rl_tasks_check_max_reward_error_frac():
    from jaxpt.config import ConfigError
    from jaxpt.tasks.grpo import GrpoConfig
    from jaxpt.tasks.ppo import PpoConfig

    assert GrpoConfig().max_reward_error_frac == PpoConfig().max_reward_error_frac == 0.5
    with pytest.raises(ConfigError, match="'grpo.max_reward_error_frac' must be in"):
        GrpoConfig(max_reward_error_frac=1.5)
    with pytest.raises(ConfigError, match="'ppo.max_reward_error_frac' must be in"):
        PpoConfig(max_reward_error_frac=-0.1)
