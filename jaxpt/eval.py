"""``python -m jaxpt.eval --model DIR --task arithmetic``: held-out accuracy as a JSON line.

The last output line is one JSON object with at least ``accuracy`` and ``n``.
Tasks: ``arithmetic`` (the shipped task's test split, disjoint from training) or
``--data FILE`` (rows with ``prompt`` and ``answer``; .jsonl/.json/.parquet or a hub name).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _load_tokenizer(model_path: str, tokenizer: str | None):
    from jaxpt.data import load_tokenizer

    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    if os.path.isdir(model_path) and any(
        os.path.exists(os.path.join(model_path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
    ):
        return load_tokenizer(model_path)
    return load_tokenizer(None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxpt.eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF model dir, hub name or preset")
    parser.add_argument("--task", default="arithmetic", choices=["arithmetic"])
    parser.add_argument("--data", help="rows with 'prompt' and 'answer' (overrides --task)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--tokenizer", help="default: the model dir's, else the shipped one")
    parser.add_argument("-n", "--num-examples", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="arithmetic problem seed")
    parser.add_argument("--min-digits", type=int, default=1)
    parser.add_argument("--max-digits", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)

    from jaxpt.evaluation import arithmetic_eval_rows, verifiable_accuracy
    from jaxpt.models import load_model

    tokenizer = _load_tokenizer(args.model, args.tokenizer)
    model = load_model(args.model, dtype=args.dtype)
    if args.data:
        from jaxpt.data import load_examples

        rows = load_examples(args.data, "prompt", args.split).rows[: args.num_examples]
        missing = [i for i, r in enumerate(rows) if "answer" not in r]
        if missing:
            raise SystemExit(f"{args.data}: row {missing[0]} has no 'answer' column")
        task = args.data
    else:
        rows = arithmetic_eval_rows(
            args.num_examples, args.seed, min_digits=args.min_digits, max_digits=args.max_digits
        )
        task = args.task
    result = verifiable_accuracy(
        model, tokenizer, rows, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size
    )
    for example in result.pop("examples"):
        print(json.dumps(example), file=sys.stderr)
    print(json.dumps({"task": task, "model": args.model, **result}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
