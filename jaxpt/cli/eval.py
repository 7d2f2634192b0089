"""``python -m jaxpt.eval --model DIR --task arithmetic``: held-out accuracy as a JSON line.

The last output line is one JSON object with at least ``accuracy`` and ``n``; a few
examples go to stderr. Tasks: ``arithmetic`` (the shipped task's test split, disjoint from
training) or ``--data FILE`` (rows with ``prompt`` and ``answer``; .jsonl/.json/.parquet or
a hub name).
"""

from __future__ import annotations

import argparse
import json
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.eval",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, help="HF model dir, hub name or preset")
    parser.add_argument("--task", default="arithmetic", choices=["arithmetic"])
    parser.add_argument("--data", help="rows with 'prompt' and 'answer' (overrides --task)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tokenizer", help="default: the model dir's, else the shipped one")
    parser.add_argument(
        "-n", "--num-examples", type=int, default=200, help="-1: all (operand-range tasks)"
    )
    parser.add_argument("--seed", type=int, default=0, help="arithmetic problem seed")
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
        "--scorer", default="math",
        help="reward that marks a completion correct: math (final answer) or last_number",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    return parser


def _data_rows(path: str, split: str, limit: int) -> list[dict]:
    """The first ``limit`` rows of ``path``; each needs ``prompt`` and ``answer``."""
    from jaxpt.data import DataError, load_examples

    rows = load_examples(path, "prompt", split).rows[:limit]
    for index, row in enumerate(rows):
        if "answer" not in row:
            raise DataError(
                f"{path}: row {index} has no 'answer' (eval rows need 'prompt' and 'answer')"
            )
    return rows


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from jaxpt.data import DataError, arithmetic_eval_rows, eos_token_ids, tokenizer_for_model
    from jaxpt.evals import verifiable_accuracy
    from jaxpt.models import load_model
    from jaxpt.rewards import resolve_reward_fn

    try:
        scorer = resolve_reward_fn(args.scorer)
    except (ValueError, ImportError, AttributeError, TypeError) as error:
        print(f"eval: --scorer: {error}", file=sys.stderr)
        return 2

    if args.data:
        try:
            rows = _data_rows(args.data, args.split, args.num_examples)
        except DataError as error:
            print(f"eval: {error}", file=sys.stderr)
            return 2
        task = args.data
    else:
        try:
            rows = arithmetic_eval_rows(
                args.num_examples, args.seed, min_digits=args.min_digits,
                max_digits=args.max_digits, min_operand=args.min_operand,
                max_operand=args.max_operand, negative_answers=args.negative_answers,
                question=args.question, system=args.system, style=args.style,
                test_fraction=args.test_fraction,
            )
        except ValueError as error:
            print(f"eval: {error}", file=sys.stderr)
            return 2
        task = args.task
    tokenizer = tokenizer_for_model(args.model, args.tokenizer)
    model = load_model(args.model, dtype=args.dtype)
    result = verifiable_accuracy(
        model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        eos_token_id=eos_token_ids(tokenizer, args.model), scorer=scorer,
    )
    for example in result.pop("examples"):
        print(json.dumps(example), file=sys.stderr)
    print(json.dumps({"task": task, "model": args.model, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
