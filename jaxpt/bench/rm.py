"""Reward-model throughput: scoring preference pairs (forward only), and a train step.

Prints ``pairs_per_s`` for scoring (chosen and rejected in one [2B, S] forward pass, steady
state, compile excluded and reported as ``compile_s``), ``train_pairs_per_s`` for a full
Bradley-Terry train step (forward + backward + AdamW), and ``peak_rss_mb``.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxpt.bench import median, peak_rss_mb


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="bench-tiny", help="preset name or HF model dir")
    parser.add_argument("--batch-size", type=int, default=16, help="pairs per batch")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warmup")
    parser.add_argument("--no-train", action="store_true", help="skip the train-step timing")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)


def random_pairs(rng, batch_size: int, seq_len: int, vocab: int) -> dict:
    """A preference batch of random tokens: each side fills 60-100% of its row."""
    batch = {
        "margin": np.zeros(batch_size, np.float32),
        "pair_mask": np.ones(batch_size, np.float32),
    }
    for side in ("chosen", "rejected"):
        lengths = rng.integers(int(0.6 * seq_len), seq_len + 1, batch_size)
        real = (np.arange(seq_len)[None, :] < lengths[:, None]).astype(np.int32)
        ids = rng.integers(4, vocab, (batch_size, seq_len)).astype(np.int32) * real
        batch.update(
            {
                f"{side}_input_ids": ids,
                f"{side}_target_ids": np.roll(ids, -1, axis=1),
                f"{side}_loss_mask": real.astype(np.float32),
                f"{side}_positions": (np.arange(seq_len)[None, :] * real).astype(np.int32),
                f"{side}_segment_ids": real,
            }
        )
    return batch


def _timed(fn, repeats: int) -> tuple[float, float]:
    """(compile + first run seconds, median steady-state seconds)."""
    start = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return first, median(times)


def bench_config(args, output_dir: str):
    """An in-memory RM config for the benchmark: ``setup`` builds the classifier, its train
    state and step (its batch source reads a few shipped arithmetic pairs; the timed calls
    use random pairs). AdamW at a constant 1e-5, no clipping."""
    from jaxpt.config import load_config

    return load_config(None, values={
        "task": "rm", "output_dir": output_dir, "seed": args.seed,
        "model": {"path": args.model, "dtype": args.dtype},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
        "data": {"train": "arithmetic", "eval": None, "seq_len": args.seq_len,
                 "arithmetic": {"num_train": 64}},
        "rm": {"center_coef": 0.0, "use_margin": True},
        "train": {"max_steps": 10**6, "batch_size": args.batch_size},
        "optim": {"lr": 1e-5, "schedule": "constant", "weight_decay": 1e-4,
                  "max_grad_norm": 0.0},
    })


def run(args) -> dict:
    import tempfile

    from jaxpt.loop import setup
    from jaxpt.tasks.rm import pair_rewards

    with tempfile.TemporaryDirectory() as out, setup(bench_config(args, out)) as prepared:
        state = prepared.state
        host_batch = random_pairs(
            np.random.default_rng(args.seed), args.batch_size, args.seq_len,
            state.model().config.vocab_size,
        )
        batch = prepared.put_batch(host_batch)
        score = jax.jit(lambda params, b: pair_rewards(state.model(params), b))
        compile_s, score_s = _timed(lambda: score(state.params, batch), args.repeats)
        result = {
            "model": args.model,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "devices": jax.device_count(),
            "pairs_per_s": args.batch_size / score_s,
            "compile_s": compile_s - score_s,
        }
        if not args.no_train:
            step = prepared.jit_step(host_batch)
            holder = {"state": state}

            def train_once():
                holder["state"], metrics = step(holder["state"], batch)
                return metrics

            train_compile_s, train_s = _timed(train_once, args.repeats)
            result["train_pairs_per_s"] = args.batch_size / train_s
            result["train_compile_s"] = train_compile_s - train_s
    result["peak_rss_mb"] = peak_rss_mb()
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}
