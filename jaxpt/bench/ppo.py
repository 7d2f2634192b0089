"""PPO step time: one full step (rollout, reward, reference + critic pass, update) through
the real trainer, on the GRPO bench's workload.

Runs the ``ppo`` task end to end (``jaxpt.loop.run``) on the shipped arithmetic prompts:
``--prompts`` x ``--generations`` completions of ``--new-tokens`` per rollout, the KL to
the reference in the reward (``--kl-coef``, GRPO's ``--beta``), one epoch of one minibatch,
so every step samples; the critic is a value head on its own copy of the backbone
(``--critic shared``: on the policy's). Reports ``step_time_s``, the median wall time
between consecutive step ends, and the median of each phase beside it, as ``bench grpo``
does; compile steps are excluded (``--warmup``).
"""

from __future__ import annotations

import itertools
import json
import os
import tempfile

from jaxpt.bench import median, peak_rss_mb, step_time_figures
from jaxpt.bench.grpo import add_rollout_arguments


def add_arguments(parser) -> None:
    add_rollout_arguments(parser)
    parser.add_argument("--kl-coef", type=float, default=0.04)
    parser.add_argument("--critic", default="separate", choices=["separate", "shared"])


def run(args) -> dict:
    import logging

    from jaxpt.config import load_config
    from jaxpt.loop import run as run_training

    logging.getLogger("absl").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as out:
        values = {
            "task": "ppo", "output_dir": out, "model.path": args.model,
            "model.dtype": args.dtype, "data.train": "arithmetic", "data.eval": "null",
            "data.arithmetic.num_train": 2000, "data.arithmetic.max_digits": 3,
            "train.max_steps": args.warmup + args.steps,
            "train.batch_size": args.prompts * args.generations, "train.log_every": 1,
            "train.eval_at_start": "false", "ppo.samples_per_prompt": args.generations,
            "ppo.num_ppo_epochs": 1, "ppo.num_mini_batches": 1,
            "ppo.max_prompt_length": args.prompt_len,
            "ppo.max_completion_length": args.new_tokens, "ppo.kl_coef": args.kl_coef,
            "ppo.critic": args.critic, "ppo.rewards": "[{name: math}]",
            "ppo.log_completions": 0, "ppo.eval_prompts": 0, "checkpoint.every": 0,
            "checkpoint.async_save": "false", "export.hf": "false",
            "logging.progress": "false", "logging.tensorboard": "false",
        }
        config = load_config(None, [f"{k}={v}" for k, v in values.items()])
        result = run_training(config)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            all_rows = list(map(json.loads, f))
    rows = [r for r in all_rows if "time/generate_s" in r]
    parts = ("time/generate_s", "time/reward_s", "time/finish_s")
    # A step's update is timed when the next step starts, so pair step i with row i + 1.
    steps = [
        [row[p] for p in parts] + [following["time/update_s"]]
        for row, following in itertools.pairwise(rows) if row["step"] > args.warmup
    ]
    if not steps:
        raise SystemExit("ppo bench: not enough steps after warmup; raise --steps")
    split = dict(zip(("generate_s", "reward_s", "finish_s", "update_s"),
                     (round(median(list(column)), 4) for column in zip(*steps))))
    figures = step_time_figures(all_rows, args.warmup, [sum(s) for s in steps])
    generated = [r["completion_length/mean"] * args.prompts * args.generations for r in rows]
    return {
        "model": args.model,
        "prompts": args.prompts,
        "generations": args.generations,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "kl_coef": args.kl_coef,
        "critic": args.critic,
        "params": result.summary.get("params"),
        **figures,
        **split,
        "generated_tokens_per_step": round(median(generated), 1),
        "steps_timed": len(figures["step_times_s"]),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
