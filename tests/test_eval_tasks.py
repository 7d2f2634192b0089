"""Eval tasks as data: YAML tasks over local files, the scorers, HumanEval in the sandbox,
the eval CLI's outputs, eval tasks during training, and config errors."""

import json
import os

import pytest
from tiny import sft_overrides

from jaxpt.cli import eval as eval_cli
from jaxpt.config import ConfigError, load_config
from jaxpt.evals import runner
from jaxpt.evals.scorers import get_scorer, humaneval_program
from jaxpt.evals.tasks import (
    TaskConfigError,
    humaneval_rows,
    load_task_examples,
    parse_task,
    parse_tasks,
)

pytestmark = pytest.mark.usefixtures("one_device_runs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = os.path.join(ROOT, "configs", "sft_tiny.yaml")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def fake_generation(monkeypatch, completions_by_pass):
    """Replace generation with fixed completions: ``completions_by_pass[temperature > 0]``
    lists the texts in the order the runner asks for them (prompt-major)."""

    def generate_texts(model, tokenizer, prompts, task, *, temperature, num_samples, **kw):
        texts = completions_by_pass[temperature > 0]
        assert len(texts) == len(prompts) * num_samples
        return list(texts), [len(t) for t in texts]

    monkeypatch.setattr(runner, "_generate_texts", generate_texts)


class _Tokenizer:
    """Enough of a tokenizer for encode_prompt on plain text."""

    eos_token_id, pad_token_id, chat_template = 1, 0, None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 100 + 2 for c in text] or [2]}


# -- tasks from YAML over local files, each scorer ----------------------------------------------


def test_yaml_tasks_over_a_local_jsonl_with_each_scorer(tmp_path, monkeypatch):
    math_rows = write_jsonl(tmp_path / "m.jsonl", [
        {"q": "1+1", "sol": "2"}, {"q": "2+3", "sol": "5"}])
    text_rows = write_jsonl(tmp_path / "t.jsonl", [
        {"id": "a", "question": "Capital of France?", "answer": "Paris"},
        {"id": "b", "question": "Opposite of hot?", "answer": "cold"}])
    mc_rows = write_jsonl(tmp_path / "c.jsonl", [
        {"question": "Pick B", "label": "B"}, {"question": "Pick 0", "label": 0}])
    yaml = tmp_path / "eval.yaml"
    yaml.write_text(f"""
model: unused
tasks:
  - {{name: sums, data: {math_rows}, prompt_template: "What is {{q}}?", answer_field: sol,
     chat: false, num_samples: 4, temperature: 1.0, k: [1, 2, 4]}}
  - {{name: words, data: {text_rows}, scorer: exact_match, id_field: id,
     prompt_template: "{{question}}", chat: false}}
  - {{name: choice, data: {mc_rows}, scorer: multiple_choice, answer_field: label,
     prompt_template: "{{question}}", chat: false}}
""")
    config = eval_cli.load_eval_config(str(yaml))
    sums, words, choice = parse_tasks(config.tasks)
    tokenizer = _Tokenizer()

    # math: greedy right on the first problem only; samples 2/4 and 0/4 correct.
    fake_generation(monkeypatch, {
        False: ["#### 2", "#### 6"],
        True: ["#### 2", "#### 3", "The answer is 2.", "no idea",
               "#### 4", "#### 4", "#### 6", "#### 6"],
    })
    result = runner.evaluate_task(None, tokenizer, sums)
    m = result.metrics
    assert m["n"] == 2 and m["accuracy"] == 0.5
    assert m["pass@1"] == pytest.approx((2 / 4 + 0) / 2)
    assert m["pass@2"] == pytest.approx((1 - 1 / 6) / 2)  # 1 - C(2,2)/C(4,2)
    assert m["pass@4"] == pytest.approx(0.5)
    assert m["maj@4"] == pytest.approx(0.5)  # "2" wins 2-1; "4"/"6" tie goes to "4" (wrong)
    assert m["mean@4"] == pytest.approx(0.25)
    sampled = [s for s in result.samples if not s["greedy"]]
    assert [s["scored"] for s in sampled[:4]] == ["2", "3", "2", None]
    assert [s["sample"] for s in sampled[:4]] == [0, 1, 2, 3]
    assert sampled[0]["prompt"] == "What is 1+1?" and sampled[0]["answer"] == "2"

    fake_generation(monkeypatch, {False: ["Answer: paris.", "COLD  "]})
    result = runner.evaluate_task(None, tokenizer, words)
    assert result.metrics["accuracy"] == 1.0 and [s["id"] for s in result.samples] == ["a", "b"]
    assert result.samples[0]["scored"] == "paris"

    fake_generation(monkeypatch, {False: ["The answer is (B).", "C) because"]})
    result = runner.evaluate_task(None, tokenizer, choice)
    assert result.metrics["accuracy"] == 0.5  # index 0 is A, not C
    assert [s["scored"] for s in result.samples] == ["B", "C"]


def test_gsm8k_and_math_presets_read_local_copies(tmp_path):
    gsm = write_jsonl(tmp_path / "gsm8k.jsonl", [
        {"question": "Tom has 3 apples and buys 4.", "answer": "3 + 4 = 7\n#### 7"},
        {"question": "Big", "answer": "so\n#### 1,250"}])
    math = write_jsonl(tmp_path / "math.jsonl", [
        {"problem": "Half of 1?", "solution": "It is $\\boxed{\\frac{1}{2}}$.",
         "unique_id": "test/a.json"}])
    (gsm_task,) = parse_tasks([{"name": "gsm8k", "data": gsm}])
    examples = load_task_examples(gsm_task)
    assert [e.answer for e in examples] == ["7", "1250"]
    assert examples[0].prompt[-1]["content"].startswith("Tom has 3 apples")
    scored = get_scorer(gsm_task.scorer).score(
        ["3 + 4 = 7\n#### 7", "#### 1250"], [{"answer": e.answer} for e in examples])
    assert [s.score for s in scored] == [1.0, 1.0]
    (math_task,) = parse_tasks([{"name": "math500", "preset": "math", "data": math}])
    (example,) = load_task_examples(math_task)
    assert example.answer == "\\frac{1}{2}" and example.id == "test/a.json"
    assert "\\boxed{}" in example.prompt[-1]["content"]
    (score,) = get_scorer("math").score(["So $\\boxed{0.5}$"], [{"answer": example.answer}])
    assert score.score == 1.0  # math-verify: 0.5 == 1/2


# -- HumanEval ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def humaneval():
    return humaneval_rows()


def test_humaneval_loader_has_the_164_problems(humaneval):
    assert len(humaneval) == 164
    ids = [row["task_id"] for row in humaneval]
    assert ids[0] == "HumanEval/0" and ids[-1] == "HumanEval/163" and len(set(ids)) == 164
    (task,) = parse_tasks(["humaneval"])
    assert task.scorer == "code" and task.id_field == "task_id" and task.chat
    (plain,) = parse_tasks([{"name": "humaneval", "chat": False, "limit": 1}])
    (example,) = load_task_examples(plain)
    assert example.prompt == humaneval[0]["prompt"] and example.id == "HumanEval/0"
    assert runner._cut("    return 1\n\ndef other():\n", plain.stop) == "    return 1\n"


def test_humaneval_canonical_passes_and_wrong_fails_in_the_sandbox(humaneval):
    rows = humaneval[:2]
    code = get_scorer("code")
    canonical = code.score([r["canonical_solution"] for r in rows], rows)
    assert [s.score for s in canonical] == [1.0, 1.0]
    assert canonical[0].scored == rows[0]["prompt"] + rows[0]["canonical_solution"]
    assert "def check" not in canonical[0].scored  # the tests are not part of the program
    wrong = code.score(["    return None\n", "    return []\n"], rows)
    assert [s.score for s in wrong] == [0.0, 0.0]
    # A chat reply that rewrites the whole function in a code block.
    rewritten = "Here:\n```python\n" + rows[0]["prompt"] + rows[0]["canonical_solution"] + "```"
    (scored,) = code.score([rewritten], rows[:1])
    assert scored.score == 1.0
    assert scored.scored == humaneval_program(rows[0]["prompt"], rewritten, "has_close_elements")


FORGERIES = [
    "    print('PASS')\n    return True\nprint('PASS')\nimport sys\nsys.exit(0)\n",
    "    return True\nimport os\nos._exit(0)\n",
    "    return True\ndef check(candidate):\n    pass\n",
    "    return True\nimport builtins\nbuiltins.AssertionError = type('E', (Exception,), {})\n",
    "    class Yes:\n        def __eq__(self, other):\n            return True\n    return Yes()\n",
]


def test_the_code_scorer_cannot_be_forged(humaneval):
    rows = [humaneval[0]] * len(FORGERIES)
    scores = [s.score for s in get_scorer("code").score(FORGERIES, rows)]
    assert scores == [0.0] * len(FORGERIES)


# -- the CLI on a tiny model --------------------------------------------------------------------


def test_cli_output_dir_and_last_line_json(tiny_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "rows.jsonl", [
        {"prompt": f"What is {a}+{a}?", "answer": str(2 * a)} for a in range(2)])
    out = tmp_path / "out"
    argv = ["--model", tiny_dir, "--data", data, "--max-new-tokens", "3", "--num-samples", "2",
            "--temperature", "1.0", "--k", "1", "2", "--output-dir", str(out)]
    assert eval_cli.main(argv) == 0
    captured = capsys.readouterr()
    result = last_json(captured.out)
    assert result["task"] == data and result["n"] == 2
    assert {"accuracy", "pass@1", "pass@2", "maj@2", "mean@2"} <= set(result)
    assert "pass@2" in captured.err  # the table
    saved = json.loads((out / "results.json").read_text())
    assert saved == result
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 + 2 * 2  # greedy + 2 samples per problem
    assert [(r["id"], r["sample"]) for r in rows if not r["greedy"]] == [
        ("0", 0), ("0", 1), ("1", 0), ("1", 1)]
    assert all(set(r) >= {"prompt", "completion", "scored", "score"} for r in rows)
    assert rows[0]["prompt"] == [{"role": "user", "content": "What is 0+0?"}]

    # Two tasks from a YAML: metrics nested per task.
    yaml = tmp_path / "eval.yaml"
    yaml.write_text(f"model: {tiny_dir}\ntasks:\n"
                    f"  - {{name: rows, data: {data}, max_new_tokens: 2}}\n"
                    "  - {name: arithmetic, limit: 2, max_new_tokens: 2}\n")
    assert eval_cli.main(["--config", str(yaml)]) == 0
    both = last_json(capsys.readouterr().out)
    assert both["rows"]["n"] == 2 and both["arithmetic"]["n"] == 2
    assert both["model"] == tiny_dir and 0.0 <= both["arithmetic"]["accuracy"] <= 1.0
    assert eval_cli.main(["--config", str(yaml), "--task", "rows"]) == 0
    assert last_json(capsys.readouterr().out)["task"] == "rows"  # one task: flat
    # Flags given beside --config override it: no greedy pass, another batch size.
    sampled = tmp_path / "sampled.yaml"
    sampled.write_text(f"model: {tiny_dir}\nbatch_size: 64\ntasks:\n"
                       f"  - {{name: rows, data: {data}, max_new_tokens: 2, num_samples: 2, "
                       "temperature: 1.0}\n")
    out2 = tmp_path / "out2"
    argv = ["--config", str(sampled), "--no-greedy", "--batch-size", "2", "--output-dir",
            str(out2)]
    assert eval_cli.main(argv) == 0
    rows = [json.loads(line) for line in (out2 / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 2 and not any(r["greedy"] for r in rows)


# -- eval tasks during training -----------------------------------------------------------------


def test_eval_tasks_run_during_training(tiny_dir, tmp_path):
    from jaxpt.loop import run

    out = str(tmp_path / "run")
    overrides = sft_overrides(out, tiny_dir, **{
        "train.max_steps": 2, "train.eval_batches": 1, "data.arithmetic.num_test": 8,
        "checkpoint.every": 0, "export.hf": "false", "train.eval_tasks_every": 1,
        "train.eval_at_start": "false",
    })
    task = {"name": "arith", "preset": "arithmetic", "limit": 2, "max_new_tokens": 2,
            "num_samples": 2, "temperature": 1.0}
    config = load_config(SFT_TINY, overrides, values={"train": {"eval_tasks": [task]}})
    result = run(config)
    assert [e["step"] for e in result.evals if "eval/arith/accuracy" in e] == [1, 2]
    # The task's own eval keeps its cadence (train.eval_every=0: only at the end).
    assert [e["step"] for e in result.evals if "eval_loss" in e] == [2]
    with open(os.path.join(out, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    assert any("eval/arith/pass@2" in row for row in logged)


# -- config errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"name": "x", "data": "f.jsonl", "scorr": "math"}, "unknown key 'scorr'; did you mean 'scorer'"),
        ({"name": "mine"}, "key 'data' is required"),
        ({"name": "x", "data": "f.jsonl", "num_samples": 4}, "key 'num_samples' is 4 but 'temperature'"),
        ({"name": "x", "data": "f.jsonl", "num_samples": 2, "temperature": 1.0, "k": [4]},
         "key 'k' values must be in [1, num_samples=2]"),
        ({"name": "x", "data": "f.jsonl", "scorer": "nope"}, "key 'scorer': unknown scorer 'nope'"),
        ({"name": "x", "data": "f.jsonl", "answer_from": "boxd"}, "did you mean 'boxed'"),
        ({"name": "x", "data": "f.jsonl", "max_new_tokens": "many"}, "bad value for key 'max_new_tokens'"),
        ({"name": "x", "preset": "humaneva"}, "did you mean 'humaneval'"),
    ],
)
def test_bad_task_entries_name_the_key(entry, message):
    with pytest.raises(TaskConfigError) as error:
        parse_task(entry, "tasks[3]")
    assert "tasks[3]" in str(error.value) and message in str(error.value)


def test_bad_eval_tasks_in_configs_name_the_key(tmp_path, tiny_dir, capsys):
    bad = {"train": {"eval_tasks": [{"name": "a", "preset": "arithmetic", "tempreature": 1}]}}
    with pytest.raises(ConfigError, match=r"train\.eval_tasks\[0\]: .*'tempreature'.*'temperature'"):
        load_config(SFT_TINY, sft_overrides(str(tmp_path), tiny_dir), values=bad)
    yaml = tmp_path / "eval.yaml"
    yaml.write_text("model: m\nmodle: n\ntasks: [arithmetic]\n")
    assert eval_cli.main(["--config", str(yaml)]) == 2
    assert "'modle'" in capsys.readouterr().err
    yaml.write_text("model: m\ntasks: [arithmetic, arithmetic]\n")
    assert eval_cli.main(["--config", str(yaml)]) == 2
    assert "unique" in capsys.readouterr().err
    rows = write_jsonl(tmp_path / "r.jsonl", [{"question": "q", "answer": "1"}])
    yaml.write_text(f"model: m\ntasks: [{{name: r, data: {rows}}}]\n")
    assert eval_cli.main(["--config", str(yaml)]) == 2  # the template needs {prompt}
    assert "row 0 has no field 'prompt'" in capsys.readouterr().err
