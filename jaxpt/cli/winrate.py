"""``python -m jaxpt.winrate --model-a DIR --model-b DIR --prompts FILE --reward-model DIR``:
how often model A's answer beats model B's.

Both models answer every prompt (greedy by default); a reward model (``--reward-model``: A
wins when its score is higher, a tie within ``--tie-tolerance``) or an LLM judge
(``--judge``: ``jaxpt.judges.PairwiseJudge``, asked in both orders, ties allowed) decides
each prompt. Ties count half. The length-controlled win rate is AlpacaEval 2.0's (the win
rate predicted at equal answer lengths, in characters); CIs are paired percentile bootstrap.

``--prompts`` is a .jsonl/.json/.parquet file of rows with ``prompt`` (text or chat
messages), or ``arithmetic`` for the shipped task's test split. The last stdout line is one
JSON object (``win_rate``, ``win_rate_ci``, ``lc_win_rate``, ``lc_win_rate_ci``, ``wins``,
``ties``, ``losses``, ``n``, mean lengths). ``--output-dir`` also writes ``results.json`` and
one row per prompt to ``samples.jsonl`` (which ``python -m jaxpt.human export --pairs``
reads as is).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.winrate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model-a", required=True, help="HF model dir, hub name or preset")
    parser.add_argument("--model-b", required=True, help="the baseline")
    parser.add_argument("--prompts", required=True, help="rows with 'prompt', or 'arithmetic'")
    judged = parser.add_mutually_exclusive_group(required=True)
    judged.add_argument("--reward-model", help="exported reward-model dir")
    judged.add_argument("--judge", help="judge model (dir, hub name or preset), or an "
                        "OpenAI-compatible server's URL (http://host:8000/v1)")
    parser.add_argument("--split", default="train", help="split of a hub dataset")
    parser.add_argument("--min-digits", type=int, default=1, help="arithmetic operands")
    parser.add_argument("--max-digits", type=int, default=3, help="arithmetic operands")
    parser.add_argument("--num-prompts", type=int, default=100, help="-1: all")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--judge-max-new-tokens", type=int, default=256)
    parser.add_argument("--tie-tolerance", type=float, default=1e-4,
                        help="reward-model scores closer than this tie")
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap replicates")
    parser.add_argument("--confidence", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0, help="sampling, bootstrap, prompts")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--output-dir", help="write results.json and samples.jsonl here")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


def _prompts(args) -> list[dict]:
    from jaxpt.data import arithmetic_eval_rows, load_examples

    limit = None if args.num_prompts < 0 else args.num_prompts
    if args.prompts == "arithmetic":
        return arithmetic_eval_rows(
            200 if limit is None else limit, args.seed, min_digits=args.min_digits,
            max_digits=args.max_digits,
        )
    rows = load_examples(args.prompts, "prompt", args.split).rows[:limit]
    if not rows:
        raise ValueError(f"{args.prompts}: no prompts")
    return rows


def _answers(path: str, prompts: list, args):
    from jaxpt.data import tokenizer_for_model
    from jaxpt.evals.winrate import generate_responses
    from jaxpt.models import load_model

    tokenizer = tokenizer_for_model(path)
    model = load_model(path, dtype=args.dtype)
    responses = generate_responses(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, model_path=path,
        temperature=args.temperature, seed=args.seed,
    )
    del model
    gc.collect()  # one policy in memory at a time
    return responses


def _judge_rows(args, prompts, a, b):
    """Outcomes and the per-prompt judging details for samples.jsonl."""
    from jaxpt.evals.winrate import judge_outcomes, reward_model_outcomes

    if args.reward_model:
        from jaxpt.rewards import load_reward_model

        rm = load_reward_model(args.reward_model, batch_size=args.batch_size)
        outcomes, scores_a, scores_b = reward_model_outcomes(
            rm, prompts, a.texts, b.texts, tolerance=args.tie_tolerance
        )
        details = [{"reward_a": float(x), "reward_b": float(y)} for x, y in zip(scores_a, scores_b)]
        return outcomes, details
    from jaxpt.judges import PairwiseJudge

    judge = PairwiseJudge(
        args.judge, max_new_tokens=args.judge_max_new_tokens, batch_size=2 * args.batch_size,
        load_kwargs={"dtype": args.dtype},
    )
    outcomes, verdicts = judge_outcomes(judge, prompts, a.texts, b.texts)
    details = [
        {"verdict": v.winner, "judge_ab": v.raw_ab, "judge_ba": v.raw_ba,
         "consistent": v.consistent}
        for v in verdicts
    ]
    return outcomes, details


def _write(output_dir: str, result: dict, rows: list[dict]) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "results.json"), "w") as f:
        json.dump(result, f, indent=2)
    with open(os.path.join(output_dir, "samples.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxpt.data import DataError
    from jaxpt.evals.stats import compare_outcomes

    start = time.perf_counter()
    try:
        rows = _prompts(args)
    except (DataError, ValueError, OSError) as error:
        print(f"winrate: --prompts: {error}", file=sys.stderr)
        return 2
    prompts = [r["prompt"] for r in rows]
    a = _answers(args.model_a, prompts, args)
    b = _answers(args.model_b, prompts, args)
    outcomes, details = _judge_rows(args, prompts, a, b)
    len_a = [len(t) for t in a.texts]
    len_b = [len(t) for t in b.texts]
    stats = compare_outcomes(
        outcomes, len_a, len_b, n_boot=args.bootstrap, confidence=args.confidence,
        seed=args.seed,
    )
    result = {
        "model_a": args.model_a,
        "model_b": args.model_b,
        "judged_by": args.reward_model or args.judge,
        "judge_kind": "reward_model" if args.reward_model else "llm_judge",
        "prompts": args.prompts,
        **stats,
        "mean_tokens_a": sum(a.num_tokens) / len(rows),
        "mean_tokens_b": sum(b.num_tokens) / len(rows),
        "eval_s": round(time.perf_counter() - start, 3),
    }
    if args.output_dir:
        # Distinct names even for a model against itself: ratings need two players.
        same = args.model_a == args.model_b
        name_a, name_b = (f"{args.model_a} (A)", f"{args.model_b} (B)") if same else (
            args.model_a, args.model_b)
        samples = [
            {
                "id": str(row.get("id", index)), "prompt": row["prompt"],
                "response_a": a.texts[index], "response_b": b.texts[index],
                "model_a": name_a, "model_b": name_b,
                "tokens_a": a.num_tokens[index], "tokens_b": b.num_tokens[index],
                "score_a": float(outcomes[index]), **details[index],
            }
            for index, row in enumerate(rows)
        ]
        _write(args.output_dir, result, samples)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
