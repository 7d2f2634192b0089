"""GRPO step time: one full step (generation, reward, update) through the real trainer.

Runs the ``grpo`` task end to end (``jaxpt.loop.run``) on the shipped arithmetic prompts
with a preset or HF model, then reports ``step_time_s``: the median wall time between
consecutive step ends (each ``metrics.jsonl`` train row's ``walltime``, as the peers' benches
measure), host work between the phases included; beside it the median of each phase
(``generate_s``, ``reward_s``, ``update_s``) and of their sum (``phase_sum_s``) from the
run's own per-step timings. Compile steps are excluded (``--warmup``). The train step's
compiled memory (``compiled_peak_bytes``) comes from compiling it once more on abstract
inputs of the same shapes (``jaxpt.bench.memory``), after ``peak_rss_mb`` is read.
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile

import jax

from jaxpt.bench import median, peak_rss_mb, step_time_figures
from jaxpt.bench.sft import LORA


def add_rollout_arguments(parser) -> None:
    """The RL benches' shared workload: model, rollout shape, timed and warmup steps."""
    parser.add_argument("--model", default="bench-tiny", help="preset name or HF model dir")
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--generations", type=int, default=4, help="completions per prompt")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--dtype", default="float32")


def add_arguments(parser) -> None:
    add_rollout_arguments(parser)
    parser.add_argument("--beta", type=float, default=0.04)
    parser.add_argument("--remat", default="none")
    parser.add_argument("--logits-chunk-size", type=int, default=0,
                        help="LM-head positions per chunk (0: all at once)")
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA adapters (rank 16, alpha 32, every projection)")
    parser.add_argument("--max-staleness", type=int, default=0,
                        help="rl.max_staleness: sample up to this many versions ahead")
    parser.add_argument("--train-devices", default=None,
                        help="rl.train_devices (a count or [ids]); with --rollout-devices "
                        "a split run")
    parser.add_argument("--rollout-devices", default=None, help="rl.rollout_devices")


def run(args) -> dict:
    import logging

    from jaxpt.config import load_config
    from jaxpt.loop import run as run_training

    logging.getLogger("absl").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as out:
        values = {
            "task": "grpo", "output_dir": out, "model.path": args.model,
            "model.dtype": args.dtype, "model.remat": args.remat,
            "train.logits_chunk_size": args.logits_chunk_size,
            "data.train": "arithmetic", "data.eval": "null",
            "data.arithmetic.num_train": 2000, "data.arithmetic.max_digits": 3,
            "train.max_steps": args.warmup + args.steps,
            "train.batch_size": args.prompts * args.generations, "train.log_every": 1,
            "train.eval_at_start": "false", "grpo.num_generations": args.generations,
            "grpo.max_prompt_length": args.prompt_len,
            "grpo.max_completion_length": args.new_tokens, "grpo.beta": args.beta,
            "grpo.log_completions": 0, "checkpoint.every": 0, "checkpoint.async_save": "false",
            "export.hf": "false", "logging.progress": "false", "logging.tensorboard": "false",
        }
        if args.lora:
            values.update({f"lora.{k}": v for k, v in LORA.items()})
        values["rl.max_staleness"] = args.max_staleness
        for key in ("train_devices", "rollout_devices"):
            if getattr(args, key) is not None:
                values[f"rl.{key}"] = getattr(args, key)
        config = load_config(None, [f"{k}={v}" for k, v in values.items()])
        run_training(config)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            all_rows = list(map(json.loads, f))
        rows = [r for r in all_rows if "time/generate_s" in r]
        peak_rss = peak_rss_mb()
        memory = train_step_memory(args, config)
    # A step's update is timed when the next step starts, so pair step i with row i + 1.
    steps = []
    for row, following in itertools.pairwise(rows):
        if row["step"] > args.warmup:
            steps.append((row["time/generate_s"], row["time/reward_s"],
                          following["time/update_s"]))
    if not steps:
        raise SystemExit("grpo bench: not enough steps after warmup; raise --steps")
    figures = step_time_figures(all_rows, args.warmup, [sum(s) for s in steps])
    generated = [r["completion_length/mean"] * args.prompts * args.generations for r in rows]
    timed = [r for r in rows if r["step"] > args.warmup]
    asynchronous = {}
    if "staleness" in rows[0]:  # a pipelined run: each side's waiting and the weight moves
        asynchronous = {
            "staleness": round(median([r["staleness"] for r in timed]), 2),
            "trainer_wait_s": round(median([r["time/trainer_wait_s"] for r in timed]), 4),
            "sampler_idle_s": round(median([r["time/sampler_idle_s"] for r in timed]), 4),
            "weight_sync_s": round(median([r["weight_sync/seconds"] for r in timed]), 4),
            "weight_sync_bytes": int(median([r["weight_sync/bytes"] for r in timed])),
        }
    return {
        "model": args.model,
        "prompts": args.prompts,
        "generations": args.generations,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "beta": args.beta,
        **figures,
        "generate_s": round(median([s[0] for s in steps]), 4),
        "reward_s": round(median([s[1] for s in steps]), 4),
        "update_s": round(median([s[2] for s in steps]), 4),
        "generated_tokens_per_step": round(median(generated), 1),
        "steps_timed": len(figures["step_times_s"]),
        "peak_rss_mb": round(peak_rss, 1),
        "remat": args.remat,
        "logits_chunk_size": args.logits_chunk_size,
        "lora": args.lora,
        "max_staleness": args.max_staleness,
        "train_devices": args.train_devices,
        "rollout_devices": args.rollout_devices,
        "devices": jax.device_count(),
        **asynchronous,
        **memory,
    }


def train_step_memory(args, config) -> dict:
    """``compiled_memory`` of the run's GRPO train step, compiled on abstract inputs of the
    run's own description (its mesh, state and batch spec: prompts are left-padded to the
    full budget, so every step has those shapes)."""
    from jaxpt.bench import compiled_memory
    from jaxpt.bench.memory import compile_train_step

    compiled, _ = compile_train_step(config)
    return compiled_memory(compiled)
