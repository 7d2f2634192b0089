"""``python -m jaxpt.plot RUN_DIR... [--out FILE.png] [--metrics loss,reward,...]``: training
curves of one or more runs as a PNG grid (one panel per metric, one line per run), read from
each run's ``metrics.jsonl``. By default: loss, reward, KL, accuracy and eval metrics,
completion length and tokens/s, as far as the runs logged them; ``--metrics`` takes names
or globs (``eval_*``). Each line is smoothed as TensorBoard does (a debiased exponential
moving average, ``--smoothing``, 0: off) over its raw values, drawn faint.

``--eval FILE...`` draws a bar chart comparing ``results.json`` files (``python -m
jaxpt.eval --output-dir``, ``python -m jaxpt.winrate --output-dir``) instead. The last
stdout line is one JSON object naming the PNG and the metrics drawn.
"""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.plot",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("runs", nargs="*", help="run dirs (or metrics.jsonl files)")
    parser.add_argument("--eval", nargs="+", metavar="FILE", help="results.json files to compare")
    parser.add_argument("--out", default="curves.png", help="PNG to write")
    parser.add_argument("--metrics", help="comma-separated names or globs")
    parser.add_argument("--smoothing", type=float,
                        help="EMA weight of the smoothed line, in [0, 1) (default 0.6; 0: raw "
                        "line only)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.runs) == bool(args.eval):
        parser.error("give run dirs or --eval FILE..., not both and not neither")
    if args.smoothing is not None and not 0 <= args.smoothing < 1:
        parser.error(f"--smoothing must be in [0, 1), got {args.smoothing}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxpt.evals.plots import plot_results, plot_runs

    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    try:
        if args.eval:
            drawn = plot_results(args.eval, args.out, metrics)
        else:
            smoothing = {} if args.smoothing is None else {"smoothing": args.smoothing}
            drawn = plot_runs(args.runs, args.out, metrics, **smoothing)
    except (OSError, ValueError, TypeError) as error:
        print(f"plot: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"out": args.out, "metrics": drawn}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
