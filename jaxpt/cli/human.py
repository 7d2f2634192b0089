"""``python -m jaxpt.human``: human evaluation in the browser.

``export --pairs FILE.jsonl --out page.html [--seed S]`` writes one self-contained HTML page
(no network) showing each prompt with its two responses in a random, recorded order;
annotators choose A better / B better / tie / skip (buttons or keys 1 2 3 0), may add a
note, and "Save results" downloads their judgements as jsonl. Pairs rows: ``prompt``,
``response_a``, ``response_b``, optional ``id``, ``model_a``, ``model_b`` (the
``samples.jsonl`` of ``python -m jaxpt.winrate`` works as is).

``ratings FILE.jsonl... [--bootstrap N]`` reads saved files (any number, any annotators)
and prints Bradley-Terry and Elo ratings with bootstrap CIs per model, and annotator
agreement where items overlap; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.human",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    export = commands.add_parser("export", help="write the evaluation page")
    export.add_argument("--pairs", required=True, help="jsonl of prompt/response_a/response_b")
    export.add_argument("--out", required=True, help="the .html page to write")
    export.add_argument("--seed", type=int, default=0, help="left/right order of responses")
    export.add_argument("--title", help="page heading")
    ratings = commands.add_parser("ratings", help="ratings from saved judgements")
    ratings.add_argument("files", nargs="+", help="jsonl files saved by the page")
    ratings.add_argument("--bootstrap", type=int, default=200, help="replicates (0: no CIs)")
    ratings.add_argument("--confidence", type=float, default=0.95)
    ratings.add_argument("--seed", type=int, default=0)
    ratings.add_argument("--k", type=float, default=32.0, help="Elo K-factor")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


def _finite(value):
    """JSON-safe: NaN (an undefined kappa) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _ci(interval) -> str:
    return "" if interval is None else f"[{interval[0]:7.1f}, {interval[1]:7.1f}]"


def _print_table(summary: dict) -> None:
    models = sorted(summary["models"].items(), key=lambda kv: -kv[1]["bt"])
    print(f"{'model':<30} {'BT':>7} {'BT CI':>18} {'Elo':>7} {'Elo CI':>18}  W/T/L")
    for name, row in models:
        print(
            f"{name[-30:]:<30} {row['bt']:7.1f} {_ci(row['bt_ci']):>18} {row['elo']:7.1f} "
            f"{_ci(row['elo_ci']):>18}  {row['wins']}/{row['ties']}/{row['losses']}"
        )
    found = summary["agreement"]
    if found is None:
        print("agreement: no item was judged by two annotators")
    else:
        kappa = found.get("cohen_kappa", found["fleiss_kappa"])
        name = "Cohen's kappa" if "cohen_kappa" in found else "Fleiss' kappa"
        print(
            f"agreement over {found['overlapping_items']} shared items: "
            f"{100 * found['percent_agreement']:.1f}% raw, {name} {kappa:.3f}"
        )


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxpt.human import export_page, summarize

    if args.command == "export":
        try:
            count = export_page(args.pairs, args.out, seed=args.seed, title=args.title)
        except (OSError, ValueError, TypeError) as error:
            print(f"human export: {error}", file=sys.stderr)
            return 2
        print(json.dumps({"page": args.out, "items": count}), flush=True)
        return 0
    try:
        summary = summarize(
            args.files, n_boot=args.bootstrap, confidence=args.confidence, seed=args.seed,
            k=args.k,
        )
    except (OSError, ValueError, TypeError) as error:
        print(f"human ratings: {error}", file=sys.stderr)
        return 2
    _print_table(summary)
    print(json.dumps(_finite(summary)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
