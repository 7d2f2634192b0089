"""reasoning-gym in jaxpt: prompt rows (checked by hand and against the expressions they
ask about), the ``reasoning_gym`` reward and scorer (the task's own checker through JSON
rows), ``ReasoningGymEnv`` episodes with scripted turns (single turn, retries, tools), the
``data.train: reasoning_gym`` source with its held-out split, and ``jaxpt.eval`` on the
tiny model with pass@k."""

import json
import os

import pytest

from jaxpt.config import ConfigError, load_config
from jaxpt.data.reasoning_gym import (
    DEFAULT_INSTRUCTION,
    HELD_OUT_SEED,
    reasoning_gym_rows,
)
from jaxpt.envs import AssistantTurn, ReasoningGymEnv, ToolCall
from jaxpt.evals import runner
from jaxpt.evals.tasks import TaskConfigError, load_task_examples, parse_task
from jaxpt.rewards import RewardRunner, build_reward_fns
from jaxpt.rewards.reasoning_gym import reasoning_gym_reward, score_reply

pytest.importorskip("reasoning_gym", reason="pip install reasoning-gym (the test extra)")
pytestmark = pytest.mark.usefixtures("one_device_runs")

GRPO_ARITH = os.path.join(os.path.dirname(__file__), "..", "configs", "grpo_arith.yaml")


def tagged(answer: str) -> str:
    return f"Let me work it out. <answer>{answer}</answer>"


def turn(text: str, calls=()) -> AssistantTurn:
    return AssistantTurn(text=text, content=text, tool_calls=list(calls))


@pytest.fixture(scope="module")
def chain_sum():
    return reasoning_gym_rows("chain_sum", size=3, seed=0)


# -- rows --------------------------------------------------------------------------------------


def test_rows_hold_the_question_answer_and_entry(chain_sum):
    # Seed 0's problems, checked by hand: 4 - 1 - 7 = -4 and 1 + 5 = 6.
    assert chain_sum[1]["entry"]["metadata"]["expression"] == "4 - 1 - 7"
    assert [row["answer"] for row in chain_sum[1:]] == ["-4", "6"]
    row = chain_sum[2]
    assert row["id"] == "chain_sum-0-2" and row["task"] == "chain_sum"
    assert row["prompt"] == [{"role": "user", "content": (
        "State the final answer to the following arithmetic problem: 1 + 5 =\n\n"
        + DEFAULT_INSTRUCTION)}]
    assert json.loads(json.dumps(chain_sum)) == chain_sum  # JSON data (tuples became lists)
    # Every answer is the value of the expression it asks about.
    for row in reasoning_gym_rows("basic_arithmetic", size=6, seed=3):
        expression = row["entry"]["metadata"]["expression"]
        assert int(row["answer"]) == int(eval(expression.replace("/", "//")))  # exact divisions
    hand = reasoning_gym_rows("basic_arithmetic", size=3, seed=0, instruction="",
                              system="Be brief.")
    assert hand[1]["prompt"] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Calculate 5 - 3 - 6."}]
    assert [row["answer"] for row in hand[1:]] == ["-4", "3"]  # 5-3-6, 2 - -1


def test_held_out_rows_need_a_disjoint_seed_range():
    # Problem i of seed s is the one drawn from s + i: seeds 0 and 1 share all but one.
    shifted = reasoning_gym_rows("chain_sum", size=2, seed=1)[0]
    assert shifted["prompt"] == reasoning_gym_rows("chain_sum", size=2, seed=0)[1]["prompt"]
    with pytest.raises(ConfigError, match="overlap"):
        load_config(GRPO_ARITH, ["output_dir=/tmp/x", "data.reasoning_gym.task=chain_sum",
                                 "data.reasoning_gym.size=50", "data.reasoning_gym.eval_seed=30"])


def test_bad_tasks_and_options_are_named():
    with pytest.raises(ValueError, match="did you mean 'chain_sum'"):
        reasoning_gym_rows("chain_sums", size=1, seed=0)
    with pytest.raises(ValueError, match="min_terms"):
        reasoning_gym_rows("chain_sum", size=1, seed=0, options={"min_terms": 0})
    with pytest.raises(ValueError, match="jaxpt's own keys"):
        reasoning_gym_rows("chain_sum", size=1, seed=0, options={"seed": 3})


def test_without_the_package_the_error_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "reasoning_gym", None)  # as if not installed
    with pytest.raises(ImportError, match=r"jaxpt\[examples\]"):
        reasoning_gym_rows("chain_sum", size=1, seed=0)


# -- the reward and the scorer -----------------------------------------------------------------


def test_the_reward_scores_the_tagged_answer_with_the_tasks_checker(chain_sum):
    entry = chain_sum[1]["entry"]  # 4 - 1 - 7 = -4
    completions = [
        tagged("-4"), tagged(" -4 "), "<answer>1</answer> no, <answer>-4</answer>",
        "-4",  # no tag: no answer
        tagged("4"), "<answer>-4",  # cut off before the tag closes
        [{"role": "assistant", "content": tagged("-4")}],  # conversational
    ]
    n = len(completions)
    scores = reasoning_gym_reward([None] * n, completions, task=["chain_sum"] * n,
                                  entry=[entry] * n, task_options=[{}] * n)
    assert scores == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]
    # A row of another dataset abstains; an entry kept as JSON text still scores.
    assert reasoning_gym_reward([None] * 2, [tagged("-4")] * 2, task=[None, "chain_sum"],
                                entry=[None, json.dumps(entry)]) == [None, 1.0]
    # Some checkers give partial credit: the right words in the wrong order.
    words = reasoning_gym_rows("word_sorting", size=1, seed=0)[0]
    shuffled = ", ".join(reversed(words["entry"]["metadata"]["sorted_words"]))
    partial = score_reply(tagged(shuffled), "word_sorting", words["entry"])
    assert 0.0 < partial < 1.0


@pytest.mark.parametrize("task", ["chain_sum", "basic_arithmetic", "word_sorting",
                                  "decimal_arithmetic", "spell_backward"])
def test_reference_answers_score_one_through_json_rows(task):
    for row in reasoning_gym_rows(task, size=3, seed=11):
        assert score_reply(tagged(row["answer"]), task, row["entry"], row["task_options"]) == 1.0


def test_the_reward_by_its_builtin_name(chain_sum):
    runner_ = RewardRunner(build_reward_fns(["reasoning_gym"]))
    columns = {key: [row[key] for row in chain_sum] for key in ("task", "entry", "task_options")}
    batch = runner_([row["prompt"] for row in chain_sum],
                    [tagged(row["answer"]) for row in chain_sum[:2]] + [tagged("0")], **columns)
    assert batch.scores["reasoning_gym"].tolist() == [1.0, 1.0, 0.0]


# -- the environment ---------------------------------------------------------------------------


def test_a_single_turn_episode(chain_sum):
    env = ReasoningGymEnv()
    assert env.reset(chain_sum[2], seed=0) == chain_sum[2]["prompt"]
    right = env.step(turn(tagged("6")))
    assert (right.reward, right.done, right.messages) == (1.0, True, [])
    assert right.info["metrics"] == {"attempts": 1.0, "correct": 1.0}
    env.reset(chain_sum[2], seed=0)
    wrong = env.step(turn(tagged("7")))
    assert (wrong.reward, wrong.done, wrong.info["metrics"]["correct"]) == (0.0, True, 0.0)


def test_retries_until_right_or_out_of_attempts(chain_sum):
    env = ReasoningGymEnv(max_attempts=3)
    env.reset(chain_sum[1], seed=0)
    first = env.step(turn(tagged("4")))
    assert first.messages == [{"role": "user", "content": "That is not correct, try again."}]
    assert (first.reward, first.done) == (0.0, False)
    assert not env.step(turn("I give up")).done
    last = env.step(turn(tagged("-4")))
    assert (last.reward, last.done, last.info["metrics"]["attempts"]) == (1.0, True, 3.0)

    env = ReasoningGymEnv(max_attempts=2, retry_message="Nope.")
    env.reset(chain_sum[1], seed=0)
    assert env.step(turn(tagged("1"))).messages[0]["content"] == "Nope."
    out = env.step(turn(tagged("2")))
    assert (out.reward, out.done) == (0.0, True)
    with pytest.raises(ValueError, match="max_attempts"):
        ReasoningGymEnv(max_attempts=0)
    with pytest.raises(ValueError, match="reasoning_gym"):
        ReasoningGymEnv().reset({"prompt": "hi"}, seed=0)


def test_tool_calls_run_and_use_no_attempt(chain_sum):
    """With tools, a turn's calls run (the calculator here) and come back as tool messages
    without using an attempt; a bad call is a counted error; a turn without calls is the
    reply that is scored."""
    call = ToolCall("calculator", {"expression": "4 - 1 - 7"})
    env = ReasoningGymEnv(tools=["calculator"], max_attempts=1)
    env.reset(chain_sum[1], seed=0)
    result = env.step(turn('{"name": "calculator"}', [call]))
    assert result.messages == [{"role": "tool", "name": "calculator", "content": "-4"}]
    assert (result.done, result.info["tool_calls"], result.info["tool_errors"]) == (
        False, {"calculator": 1}, 0)
    bad = env.step(turn("", [ToolCall("calculator", {"expression": "open('x')"})]))
    assert bad.info["tool_errors"] == 1 and bad.messages[0]["content"].startswith("error")
    assert env.step(turn(tagged("-4"))).reward == 1.0  # the tool turns used no attempt


# -- the data source ---------------------------------------------------------------------------


def test_data_train_reasoning_gym_with_a_held_out_eval(tmp_path):
    from jaxpt.tasks import common
    from jaxpt.tasks.base import RunContext

    overrides = [f"output_dir={tmp_path}", "data.train=reasoning_gym", "data.eval=reasoning_gym",
                 "data.reasoning_gym.task=chain_sum", "data.reasoning_gym.size=6",
                 "data.reasoning_gym.eval_size=3", "data.reasoning_gym.seed=0",
                 "data.reasoning_gym.options.max_terms=3"]
    config = load_config(GRPO_ARITH, overrides)
    ctx = RunContext(config=config, mesh=None, rules={}, output_dir=str(tmp_path))
    train, held_out = common.data_sources(ctx, "prompt")
    train_rows = common.load_rows(ctx, train, "prompt", "train")  # validated as prompt rows
    assert len(train_rows) == 6 and len(held_out) == 3
    assert held_out[0]["id"] == f"chain_sum-{HELD_OUT_SEED}-0"
    for row in train_rows + held_out:  # the task's own option reached the generator
        assert row["task_options"] == {"max_terms": 3}
        assert row["entry"]["metadata"]["num_terms"] <= 3
        assert int(row["answer"]) == eval(row["entry"]["metadata"]["expression"])
    assert (tmp_path / "data" / "reasoning_gym_test.jsonl").read_text().count("\n") == 3
    with pytest.raises(ConfigError, match="data.reasoning_gym.task"):
        load_config(GRPO_ARITH, [f"output_dir={tmp_path}", "data.train=reasoning_gym"])
    sft = load_config(GRPO_ARITH, overrides + ["task=sft"])
    with pytest.raises(ConfigError, match="prompt rows"):
        common.data_sources(RunContext(sft, None, {}, str(tmp_path)), "sft")


# -- evals -------------------------------------------------------------------------------------


def test_the_eval_task_scores_samples_with_pass_at_k(monkeypatch):
    task = parse_task({"name": "reasoning_gym", "reasoning_gym": {"task": "chain_sum", "size": 2,
                       "seed": 0}, "num_samples": 2, "temperature": 1.0, "greedy": False})
    examples = load_task_examples(task)
    assert [e.answer for e in examples] == ["-14282", "-4"]

    def generate(model, tokenizer, prompts, task, *, temperature, num_samples, **_):
        texts = [tagged("-14282"), tagged("0"), tagged("1"), "no tag"]  # prompt-major
        return texts, [3] * len(texts)

    monkeypatch.setattr(runner, "_generate_texts", generate)
    metrics = runner.evaluate_task(None, None, task, examples).metrics
    assert metrics["pass@1"] == pytest.approx(0.25) and metrics["pass@2"] == 0.5
    assert metrics["maj@2"] == 0.5 and metrics["n"] == 2  # votes: the tagged answers
    for bad, message in [({"task": "chain_sum", "sizes": 2}, "did you mean 'size'"),
                         ({"size": 2}, "reasoning_gym.task")]:
        with pytest.raises(TaskConfigError, match=message):
            parse_task({"name": "reasoning_gym", "reasoning_gym": bad})


def test_jaxpt_eval_runs_a_reasoning_gym_task_on_the_tiny_model(tiny_dir, tmp_path, capsys):
    from jaxpt.cli import eval as eval_cli

    config = tmp_path / "eval.yaml"
    config.write_text(
        f"model: {tiny_dir}\ntasks:\n  - {{name: chain, preset: reasoning_gym, max_new_tokens: 3,"
        " num_samples: 2, temperature: 1.0, reasoning_gym: {task: chain_sum, size: 2}}\n")
    assert eval_cli.main(["--config", str(config), "--output-dir", str(tmp_path / "out")]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["task"] == "chain" and result["n"] == 2
    assert {"accuracy", "pass@1", "pass@2", "maj@2", "mean@2"} <= set(result)
    samples = (tmp_path / "out" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 + 2 * 2  # greedy + 2 samples per problem



def test_rl_held_out_accuracy_scores_with_the_reasoning_gym_reward(tiny_dir, chain_sum):
    # GRPO's eval_accuracy (grpo.eval_reward: reasoning_gym) hands the scorer every column.
    from jaxpt.data import load_tokenizer
    from jaxpt.evals import verifiable_accuracy
    from jaxpt.models import load_model

    seen = {}

    def scorer(prompts, completions, **columns):
        seen.update(columns)
        return reasoning_gym_reward(prompts, completions, **columns)

    result = verifiable_accuracy(load_model(tiny_dir), load_tokenizer(tiny_dir), chain_sum,
                                 max_new_tokens=2, scorer=scorer)
    assert result["n"] == 3 and result["accuracy"] == 0.0  # two random tokens: no tag
    assert {"answer", "task", "entry", "task_options"} <= set(seen)


def test_a_grpo_rollout_and_eval_on_reasoning_gym_rows(tiny_dir, tmp_path, mesh1):
    # The rows' columns (task, entry) reach the reward through a real rollout and the
    # held-out eval: data.train / data.eval: reasoning_gym with grpo's reasoning_gym reward.
    from jaxpt.loop import setup

    overrides = {
        "output_dir": str(tmp_path), "model.path": tiny_dir, "data.train": "reasoning_gym",
        "data.eval": "reasoning_gym", "data.reasoning_gym.task": "chain_sum",
        "data.reasoning_gym.size": 8, "data.reasoning_gym.eval_size": 2,
        "train.batch_size": 4, "grpo.num_generations": 2, "grpo.max_prompt_length": 96,
        "grpo.max_completion_length": 4, "grpo.eval_prompts": 2,
        "grpo.eval_reward": "reasoning_gym", "logging.progress": "false",
        "logging.tensorboard": "false",
    }
    config = load_config(GRPO_ARITH, [f"{k}={v}" for k, v in overrides.items()],
                         values={"grpo": {"rewards": [{"name": "reasoning_gym"}]}})
    with setup(config, mesh=mesh1) as run:
        _, metrics = run.source.sample(run.state, [0, 1])
        evaluated = run.evaluate(run.state)
    assert metrics["rewards/reasoning_gym/mean"] == 0.0  # 4 random tokens: no <answer> tag
    assert metrics["rewards/reasoning_gym/errors"] == 0.0
    assert evaluated["eval_accuracy"] == 0.0 and evaluated["eval_n"] == 2.0
