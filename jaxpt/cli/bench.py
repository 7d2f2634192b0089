"""``python -m jaxpt.bench {sft,generate,serve,grpo,ppo,rm,memory,accel} ...``: one JSON line per
benchmark.

Each benchmark is a library module ``jaxpt.bench.<name>`` with ``add_arguments(parser)``
and ``run(args) -> dict``; this command picks one, runs it and prints its dict.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser, a subcommand per benchmark; building it runs nothing
    (it imports the benchmark modules)."""
    from jaxpt.bench import BENCHMARKS

    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name in BENCHMARKS:
        try:
            module = importlib.import_module(f"jaxpt.bench.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"jaxpt.bench.{name}":
                raise
            continue
        module.add_arguments(sub.add_parser(name, help=module.__doc__.splitlines()[0]))
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    result = importlib.import_module(f"jaxpt.bench.{args.benchmark}").run(args)
    print(json.dumps({"benchmark": args.benchmark, **result}), flush=True)
    return 1 if result.get("failed") else 0  # the accelerator check's failed phases


if __name__ == "__main__":
    sys.exit(main())
