"""``python -m jaxpt.quickstart``: the whole pipeline on CPU in a few minutes, no downloads.

Stages run in order and share one ``results`` dict; each returns lines for the summary.
Stage ``sft`` trains the shipped tiny model (random init) with the shipped tokenizer on the
generated arithmetic task (``configs/sft_tiny.yaml``), whose worked solutions come from a
sloppy teacher that often forgets a carry, and reports held-out loss before and after.
Stage ``grpo`` then runs GRPO from the SFT export with the math reward, which checks the
true answer (``configs/grpo_arith.yaml``), and reports held-out greedy accuracy before and
after; the last line printed is one JSON object ``{"sft_accuracy", "grpo_accuracy", "n",
"reward_first_20", "reward_last_20", "sft_model", "grpo_model"}`` (the rewards are the
mean training reward of the first and last 20 GRPO steps). ``--max-steps`` and
``key=value`` overrides apply to every stage (a quick smoke run: ``--max-steps 2``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from importlib import resources

from jaxpt.cli import command

# The repo's configs/, two levels above this file (jaxpt/cli/).
CONFIG_DIR = os.path.normpath(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs")
)


def config_path(name: str) -> str:
    """A config from the repo's ``configs/`` (or the installed package's copy)."""
    path = os.path.join(CONFIG_DIR, name)
    if os.path.exists(path):
        return path
    return str(resources.files("jaxpt") / "configs" / name)


def _overrides(args, output_dir: str, *stage: str) -> list[str]:
    """A stage's overrides: its output dir and its own keys, then the user's."""
    steps = [f"train.max_steps={args.max_steps}"] if args.max_steps else []
    return [f"output_dir={output_dir}", *stage, *steps, *args.overrides]


def stage_sft(args, results: dict) -> list[str]:
    from jaxpt.config import load_config
    from jaxpt.loop import run

    output_dir = os.path.join(args.output_dir, "sft")
    config = load_config(config_path("sft_tiny.yaml"), _overrides(args, output_dir))
    start = time.perf_counter()
    result = run(config)
    wall = time.perf_counter() - start
    evals = [e for e in result.evals if "eval_loss" in e]
    results["sft"] = {"result": result, "config": config, "wall_s": wall}
    lines = [f"SFT ({config.model.path} on arithmetic, {result.step} steps, {wall:.0f} s)"]
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(
            f"  held-out loss     {first['eval_loss']:.3f} (step {first['step']}) -> "
            f"{last['eval_loss']:.3f} (step {last['step']})"
        )
        if "eval_token_accuracy" in last:
            lines.append(
                f"  token accuracy    {first['eval_token_accuracy']:.3f} -> "
                f"{last['eval_token_accuracy']:.3f}"
            )
    lines += [
        f"  metrics           {os.path.join(result.output_dir, 'metrics.jsonl')}",
        f"  tensorboard       {os.path.join(result.output_dir, 'tb')}",
        f"  checkpoints       {result.checkpoint_dir}",
        f"  HF export         {result.hf_dir}",
    ]
    return lines


def stage_grpo(args, results: dict) -> list[str]:
    """GRPO from the SFT export with the math reward; held-out greedy accuracy before/after."""
    import json

    from jaxpt.config import load_config
    from jaxpt.loop import run

    sft = results.get("sft")
    sft_model = sft["result"].hf_dir if sft else os.path.join(args.output_dir, "sft", "hf")
    if not sft_model or not os.path.isdir(sft_model):
        raise SystemExit(f"the GRPO stage needs the SFT model at {sft_model}: run the sft stage")
    output_dir = os.path.join(args.output_dir, "grpo")
    config = load_config(
        config_path("grpo_arith.yaml"), _overrides(args, output_dir, f"model.path={sft_model}")
    )
    start = time.perf_counter()
    result = run(config)
    wall = time.perf_counter() - start
    evals = [e for e in result.evals if "eval_accuracy" in e]
    before, after = evals[0], evals[-1]
    a = config.data.arithmetic
    first, last = reward_windows(os.path.join(result.output_dir, "metrics.jsonl"))
    line = {
        "sft_accuracy": before["eval_accuracy"],
        "grpo_accuracy": after["eval_accuracy"],
        "n": int(after["eval_n"]),
        "reward_first_20": first,
        "reward_last_20": last,
        "sft_model": os.path.abspath(sft_model),
        "grpo_model": result.hf_dir,
    }
    results["grpo"] = {"result": result, "config": config, "wall_s": wall, "line": line}
    eval_cmd = (
        f"python -m jaxpt.eval --model DIR --task arithmetic -n {a.num_test} "
        f"--seed {a.seed} --min-digits {a.min_digits} --max-digits {a.max_digits}"
    )
    return [
        f"GRPO (math reward, {result.step} steps, {wall:.0f} s)",
        (
            f"  held-out accuracy {line['sft_accuracy']:.3f} (SFT) -> "
            f"{line['grpo_accuracy']:.3f} (GRPO), greedy, {line['n']} problems disjoint from "
            "training"
        ),
        f"  training reward   {first:.3f} (mean of the first 20 steps) -> {last:.3f} (last 20)",
        f"  same numbers via  {eval_cmd}",
        f"  completions       {os.path.join(result.output_dir, 'completions.jsonl')}",
        f"  HF export         {result.hf_dir}",
        json.dumps(line),
    ]


def reward_windows(metrics_path: str, window: int = 20) -> tuple[float, float]:
    """Mean training reward over the first and the last ``window`` logged steps."""
    import json

    with open(metrics_path) as f:
        rewards = [row["reward"] for row in map(json.loads, f) if "reward" in row]
    if not rewards:
        return float("nan"), float("nan")
    mean = lambda xs: round(sum(xs) / len(xs), 4)
    return mean(rewards[:window]), mean(rewards[-window:])


STAGES = [("sft", stage_sft), ("grpo", stage_grpo)]


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(prog="python -m jaxpt.quickstart", description=__doc__)
    parser.add_argument("--output-dir", default="runs/quickstart")
    parser.add_argument(
        "--max-steps", type=int, default=0, help="train.max_steps of every stage (0: the configs')"
    )
    parser.add_argument("--stages", default=",".join(name for name, _ in STAGES))
    parser.add_argument("overrides", nargs="*", help="config overrides for every stage")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = set(args.stages.split(",")) - {name for name, _ in STAGES}
    if unknown:
        parser.error(f"unknown stage(s) {sorted(unknown)}; stages: sft,grpo")
    return args


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)
    wanted = args.stages.split(",")
    results: dict = {}
    summary: list[str] = []
    for name, stage in STAGES:
        if name in wanted:
            summary += stage(args, results)
    total = sum(r.get("wall_s", 0.0) for r in results.values())
    summary.insert(0, f"total training wall time {total:.0f} s")
    last = summary.pop() if "grpo" in results else None
    print("\n".join(["", "== jaxpt quickstart ==", *summary]), flush=True)
    if last is not None:  # the result line comes last
        print(last, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
