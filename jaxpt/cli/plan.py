"""``python -m jaxpt.plan --config X.yaml --topology v5e:2x4 [key=value ...]``: compile a
run's train step (and GRPO's rollout sampler) ahead of time for a TPU slice or an N-device
CPU mesh, without weights, and print the memory each device needs and whether it fits.

A split GRPO run (rl.train_devices / rl.rollout_devices) is planned per side: the train step
on the train devices, the sampler on the rollout devices with the policy as synced there,
and the bytes each policy version moves between them.

TPU topologies (v4/v5e/v5p/v6e:SHAPE, e.g. v5e:2x4 = 8 chips, v5p:2x2x2 = 8 chips = v5p-16)
need libtpu (``pip install 'jaxpt[tpu]'``) but no TPU. ``cpu:N`` compiles for N host
devices. The last line printed is one JSON object with every figure (bytes per device).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.plan", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  python -m jaxpt.plan --config configs/sft_tiny.yaml "
        "--topology v5e:2x4 model.path=qwen2.5-0.5b model.dtype=bfloat16",
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--topology", required=True,
                        help="v5e:2x4, v5p:2x2x2, v6e:4x4, ... or cpu:N")
    parser.add_argument("--hbm-gib", type=float, default=None,
                        help="memory per device in GiB (default: the chip's HBM; CPU: RAM / N)")
    parser.add_argument("--no-recheck", action="store_true",
                        help="when it does not fit, do not re-plan the first suggestion")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.batch_size=16")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


def _use_cpu_devices(topology: str) -> None:
    """Give this process the CPU devices a ``cpu:N`` topology needs (before jax starts)."""
    from jaxpt.planning.topology import cpu_device_flag

    flag = cpu_device_flag(topology)
    if flag and "jax" not in sys.modules:
        flags = os.environ.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
        os.environ["XLA_FLAGS"] = " ".join([*flags, flag])
        os.environ.setdefault("JAX_PLATFORMS", "cpu")


@command
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from jaxpt.planning.topology import TopologyError

    try:
        _use_cpu_devices(args.topology)
    except TopologyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from jaxpt.config import ConfigError, load_config
    from jaxpt.planning.memory import format_plan, gib, plan_memory, suggestions
    from jaxpt.planning.topology import get_topology

    try:
        config = load_config(args.config, args.overrides)
        topology = get_topology(args.topology, args.hbm_gib)
        plan = plan_memory(config, topology)
    except (ConfigError, TopologyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{config.task} {config.model.path} ({config.model.dtype} compute, "
          f"{config.model.param_dtype} params, remat={config.model.remat}), "
          f"batch {config.train.batch_size} x accum {config.train.grad_accum_steps}")
    print(format_plan(plan))
    result = {"config": args.config, "overrides": args.overrides, "task": config.task,
              "model": config.model.path, **plan.as_dict(), "total_gib": gib(plan.total),
              "hbm_gib": gib(plan.hbm), "suggestions": []}
    if not plan.fits:
        for why, overrides in suggestions(config, plan.train_devices, plan):
            print(f"  suggestion: {why}: {' '.join(overrides)}")
            result["suggestions"].append({"why": why, "overrides": overrides})
        if result["suggestions"] and not args.no_recheck:
            first = result["suggestions"][0]
            rechecked = plan_memory(load_config(args.config, args.overrides + first["overrides"]),
                                    topology)
            first.update(total=rechecked.total, fits=rechecked.fits)
            print(f"  re-checked {' '.join(first['overrides'])}: {gib(rechecked.total):.3f} GiB "
                  f"per device, fits: {'yes' if rechecked.fits else 'NO'}")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
