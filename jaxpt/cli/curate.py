"""``python -m jaxpt.curate --config configs/curate_X.yaml [key=value ...]``: curate a dataset.

Reads ``input`` (a .jsonl/.json/.parquet file or hub dataset), runs the config's ``steps`` in
order, writes the kept rows, unchanged, to ``output`` and a report (counts, removal reasons,
sample removed rows per step) to ``report`` (default ``<output>.report.json``). Prints a
table of the steps; the last line is one JSON object: input rows, output rows, removed per
step.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    from jaxpt.curation import STEP_TYPES

    types = "\n".join(f"  {name:15s} {path}" for name, path in STEP_TYPES.items())
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.curate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"step types (steps[i].type):\n{types}\n\nexample:\n"
        "  python -m jaxpt.curate --config configs/curate_arith.yaml "
        "output=data/clean.jsonl steps.1.threshold=0.9",
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. max_samples=10")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


def format_table(report: dict, width: int = 100) -> str:
    """The steps as a readable table, each followed by its top reasons and a sample."""
    header = f"{'step':<20} {'rows in':>9} {'rows out':>9} {'removed':>9} {'seconds':>8}"
    lines = [header, "-" * len(header)]
    for step in report["steps"]:
        lines.append(
            f"{step['name']:<20} {step['rows_in']:>9} {step['rows_out']:>9} "
            f"{step['removed']:>9} {step['seconds']:>8.2f}"
        )
        for reason, count in list(step["reasons"].items())[:3]:
            lines.append(_clip(f"    {count:>7} x {reason}", width))
        if step["samples"]:
            sample = step["samples"][0]
            row = json.dumps(sample["row"], ensure_ascii=False, default=str)
            lines.append(_clip(f"    e.g. row {sample['index']}: {row}", width))
    summary = report["summary"]
    lines.append("-" * len(header))
    lines.append(f"{summary['input_rows']} rows in, {summary['output_rows']} rows out -> "
                 f"{summary['output']} (report: {summary['report']})")
    return "\n".join(lines)


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", "\\n")
    return text if len(text) <= width else text[: width - 3] + "..."


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from jaxpt.config import ConfigError
    from jaxpt.curation import build_steps, curate, load_curation_config
    from jaxpt.data import DataError

    try:
        config = load_curation_config(args.config, args.overrides)
        steps = build_steps(config.steps)  # before reading: a bad step fails fast
        report = curate(config, steps)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    except DataError as error:
        print(f"data error: {error}", file=sys.stderr)
        return 2
    print(format_table(report), flush=True)
    print(json.dumps(report["summary"]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
