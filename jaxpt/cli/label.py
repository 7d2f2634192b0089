"""``python -m jaxpt.label --judge DIR --in pairs.jsonl --out prefs.jsonl``: AI preference
labels (RLAIF).

Each input row has a ``prompt`` (text or messages) and two responses (``response_a`` and
``response_b``; other names with ``--a-field``/``--b-field``). The judge model compares them
in both orders (``jaxpt.judges.PairwiseJudge``); every decisive verdict is written as a
``prompt``/``chosen``/``rejected`` row that ``task: rm`` and ``task: dpo`` read directly
(``data.train: prefs.jsonl``). Ties, and with ``--consistent-only`` pairs whose two orders
disagree, are dropped and counted. ``--in arithmetic`` judges pairs from the shipped
arithmetic task (a right and a wrong worked answer) whose ground truth is known; with
``--truth-field`` (set for ``arithmetic``) the labels' accuracy is reported. The last
output line is one JSON object: counts, the two orders' agreement, position bias and label
accuracy.
"""

from __future__ import annotations

import argparse
import json
import sys

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.label", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--judge", required=True,
                        help="judge model: HF dir, GGUF file, pkg:... path, preset or hub name, "
                        "or an OpenAI-compatible server's URL (http://host:8000/v1)")
    parser.add_argument("--in", dest="source", required=True,
                        help="pairs (.jsonl/.json/.parquet or hub dataset) or 'arithmetic'")
    parser.add_argument("--out", required=True, help="preference rows (.jsonl)")
    parser.add_argument("--verdicts", help="also write every pair's verdict and both raw "
                        "judge replies here (.jsonl), ties included")
    parser.add_argument("--split", default="train", help="dataset split of a hub source")
    parser.add_argument("--a-field", default="response_a")
    parser.add_argument("--b-field", default="response_b")
    parser.add_argument("--truth-field", help="a column naming the better response ('a'/'b')")
    parser.add_argument("--consistent-only", action="store_true",
                        help="keep only pairs whose two orders name the same answer")
    parser.add_argument("--template", help="a file with the judge prompt ({question}, "
                        "{answer_a}, {answer_b}); default: jaxpt.judges.PAIRWISE_TEMPLATE")
    parser.add_argument("--system", help="a system turn for the judge")
    parser.add_argument("--tokenizer", help="default: the judge's own")
    parser.add_argument("-n", "--num-pairs", type=int, default=-1, help="-1: every row")
    parser.add_argument("--seed", type=int, default=0, help="arithmetic pairs' seed")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32, help="judge prompts per call")
    parser.add_argument("--dtype", default="float32")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


def _read_pairs(args) -> list[dict]:
    from jaxpt.data import DataError
    from jaxpt.data.sources import read_rows
    from jaxpt.judges.labeling import arithmetic_answer_pairs, check_pair_rows

    if args.source == "arithmetic":
        count = 200 if args.num_pairs < 0 else args.num_pairs
        return arithmetic_answer_pairs(count, args.seed)
    rows = []
    for index, where, row in read_rows(args.source, args.split):
        if isinstance(row, Exception):
            raise DataError(f"{args.source}{where}: row {index}: {row}")
        rows.append(row)
        if 0 <= args.num_pairs == len(rows):
            break
    if not rows:
        raise DataError(f"{args.source}: no rows")
    check_pair_rows(rows, args.source, args.a_field, args.b_field, args.truth_field)
    return rows


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.source == "arithmetic" and args.truth_field is None:
        args.truth_field = "better"
    from jaxpt.data import DataError, write_jsonl
    from jaxpt.judges import PairwiseJudge
    from jaxpt.judges.labeling import label_summary, preference_rows
    from jaxpt.judges.templates import TemplateError

    try:
        rows = _read_pairs(args)
    except (DataError, ValueError, OSError) as error:
        print(f"label: {error}", file=sys.stderr)
        return 2
    template = None
    if args.template:
        with open(args.template, encoding="utf-8") as f:
            template = f.read()
    try:
        judge = PairwiseJudge(
            args.judge, args.tokenizer, template, max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size, system_prompt=args.system,
            load_kwargs={"dtype": args.dtype},
        )
    except (TemplateError, ValueError) as error:
        print(f"label: {error}", file=sys.stderr)
        return 2
    verdicts = judge([r["prompt"] for r in rows], [r[args.a_field] for r in rows],
                     [r[args.b_field] for r in rows])
    labels = preference_rows(rows, verdicts, a_field=args.a_field, b_field=args.b_field,
                             consistent_only=args.consistent_only)
    write_jsonl(args.out, labels)
    if args.verdicts:
        write_jsonl(args.verdicts, (
            {"id": row.get("id", index), "winner": v.winner, "score_a": v.score_a,
             "consistent": v.consistent, "reply_ab": v.raw_ab, "reply_ba": v.raw_ba,
             **({args.truth_field: row[args.truth_field]} if args.truth_field else {})}
            for index, (row, v) in enumerate(zip(rows, verdicts))
        ))
    summary = label_summary(rows, verdicts, len(labels), args.truth_field)
    for key, value in summary.items():
        print(f"{key:>26}: {value}", file=sys.stderr)
    print(json.dumps({**summary, "out": args.out}))
    return 0
