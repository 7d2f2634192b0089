"""``python -m jaxpt.rejection_sample --config configs/rejection_X.yaml [key=value ...]``:
sample n responses per prompt, score them, write the best (SFT rows) or best vs worst
(preference pairs) to ``<output_dir>/rows.jsonl``; see ``jaxpt.curation.rejection``.

A rerun with the same config continues after the last complete chunk; the last output line
is a JSON summary (prompts, samples, rows written, mean best score, mean score).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.rejection_sample",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m jaxpt.rejection_sample --config configs/rejection_arith.yaml "
        "rejection.mode=preference output_dir=runs/rejection_pref",
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rejection.num_samples=4")
    parser.add_argument(
        "--max-chunks", type=int, help="stop after this many chunks (a rerun continues)"
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from jaxpt.config import ConfigError
    from jaxpt.curation.rejection import load_rejection_config, run_rejection_sampling
    from jaxpt.data import DataError

    try:
        config = load_rejection_config(args.config, args.overrides)
        summary = run_rejection_sampling(config, max_chunks=args.max_chunks)
    except (ConfigError, DataError) as error:
        print(f"rejection_sample: {error}", file=sys.stderr)
        return 2
    import jax

    if jax.process_index() == 0:
        print(json.dumps({"output_dir": config.output_dir, **summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
