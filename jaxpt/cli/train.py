"""``python -m jaxpt.train --config configs/X.yaml [key.sub=value ...]``: run a training job.

The config's ``task`` picks the job; every key can be overridden on the command line. The
modules the config lists under ``imports`` are imported first, so ``--help`` after a
``--config`` also lists the tasks they register.
"""

from __future__ import annotations

import argparse
import logging
import sys

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    from jaxpt.tasks import available_tasks, get_task

    tasks = "\n".join(f"  {name:6s} {get_task(name).description}" for name in available_tasks())
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"tasks (config key 'task'):\n{tasks}\n\nexample:\n"
        "  python -m jaxpt.train --config configs/sft_tiny.yaml train.max_steps=100 "
        "output_dir=runs/x",
    )
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


def import_user_modules(argv: list[str] | None = None) -> None:
    """Import the modules the config lists under ``imports`` (its own tasks), so that
    ``--help`` lists them; a failing import is reported when the config loads."""
    from jaxpt.config import ConfigError, import_config_modules

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, rest = pre.parse_known_args(argv)
    try:
        import_config_modules(known.config, [a for a in rest if "=" in a])
    except ConfigError:
        pass


@command
def main(argv: list[str] | None = None) -> int:
    import_user_modules(argv)
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax is chatty at INFO
    # A library imported first may have configured the root logger at WARNING already (then
    # basicConfig does nothing): jaxpt's own progress lines must still show.
    logging.getLogger("jaxpt").setLevel(logging.INFO)
    from jaxpt.config import ConfigError, load_config

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from jaxpt.distributed import initialize_distributed

    try:  # before any other JAX call: jax.devices() then spans every process
        initialize_distributed(config)
    except ValueError as error:
        print(f"config error: {error}", file=sys.stderr)
        return 2
    from jaxpt.checkpoint import CheckpointError
    from jaxpt.loop import NonFiniteError, run

    try:
        result = run(config)
    except (NonFiniteError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    status = "preempted" if result.preempted else "finished"
    print(f"{status} at step {result.step}; outputs in {result.output_dir}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
