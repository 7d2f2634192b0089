"""GRPO step time: one full step (generation, reward, update) through the real trainer.

Runs the ``grpo`` task end to end (``jaxpt.loop.run``) on the shipped arithmetic prompts
with a preset or HF model, then reports the median step and its split from the run's
own per-step timings. Compile steps are excluded (``--warmup``).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile

from jaxpt.bench import median, peak_rss_mb


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="bench-tiny", help="preset name or HF model dir")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32")


def run(args) -> dict:
    import logging

    from jaxpt.config import load_config
    from jaxpt.loop import run as run_training

    logging.getLogger("absl").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as out:
        values = {
            "task": "grpo", "output_dir": out, "model.path": args.model,
            "model.dtype": args.dtype, "data.train": "arithmetic", "data.eval": "null",
            "data.arithmetic.num_train": 2000, "data.arithmetic.max_digits": 3,
            "train.max_steps": args.warmup + args.steps,
            "train.batch_size": args.prompts * args.generations, "train.log_every": 1,
            "train.eval_at_start": "false", "grpo.num_generations": args.generations,
            "grpo.max_prompt_length": args.prompt_len,
            "grpo.max_completion_length": args.new_tokens, "grpo.beta": args.beta,
            "grpo.log_completions": 0, "checkpoint.every": 0, "checkpoint.async_save": "false",
            "export.hf": "false", "logging.progress": "false", "logging.tensorboard": "false",
        }
        config = load_config(None, [f"{k}={v}" for k, v in values.items()])
        run_training(config)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [r for r in map(json.loads, f) if "time/generate_s" in r]
    # A step's update is timed when the next step starts, so pair step i with row i + 1.
    steps = []
    for row, following in itertools.pairwise(rows):
        if row["step"] > args.warmup:
            steps.append((row["time/generate_s"], row["time/reward_s"],
                          following["time/update_s"]))
    if not steps:
        raise SystemExit("grpo bench: not enough steps after warmup; raise --steps")
    totals = [sum(s) for s in steps]
    generated = [r["completion_length/mean"] * args.prompts * args.generations for r in rows]
    return {
        "model": args.model,
        "prompts": args.prompts,
        "generations": args.generations,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "beta": args.beta,
        "step_time_s": round(median(totals), 4),
        "generate_s": round(median([s[0] for s in steps]), 4),
        "reward_s": round(median([s[1] for s in steps]), 4),
        "update_s": round(median([s[2] for s in steps]), 4),
        "generated_tokens_per_step": round(median(generated), 1),
        "steps_timed": len(steps),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
