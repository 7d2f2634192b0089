"""Benchmarks: ``python -m jaxpt.bench <name> ...`` prints one JSON line per run.

Each benchmark is a module ``jaxpt.bench.<name>`` with ``add_arguments(parser)`` and
``run(args) -> dict``; the shared helpers here measure the machine and the process. The
command itself is ``jaxpt.cli.bench``.
"""

from __future__ import annotations

import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

BENCHMARKS = ("sft", "generate", "grpo", "ppo", "rm", "memory")


def peak_rss_mb() -> float:
    """Peak resident memory in MiB of this process plus its largest finished child (data
    workers, reward sandboxes); ``ru_maxrss`` of the children is their largest peak."""
    scale = 1024 if sys.platform != "darwin" else 1024**2  # KiB on Linux, bytes on macOS
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / scale


def compiled_memory(compiled) -> dict:
    """XLA's memory analysis of a compiled program (``jitted.lower(...).compile()``), read
    without running it: ``compiled_peak_bytes`` = temporaries + arguments + outputs -
    donated (aliased) buffers, and those parts. Empty where the backend does not report."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return {}
    temp, argument = analysis.temp_size_in_bytes, analysis.argument_size_in_bytes
    output, alias = analysis.output_size_in_bytes, analysis.alias_size_in_bytes
    return {
        "compiled_peak_bytes": int(temp + argument + output - alias),
        "compiled_temp_bytes": int(temp),
        "compiled_argument_bytes": int(argument),
        "compiled_output_bytes": int(output),
        "compiled_alias_bytes": int(alias),
    }


def measure_matmul_peak(n: int = 1024, dtype=jnp.float32, repeats: int = 10) -> float:
    """Measured matmul throughput of device 0 in FLOP/s (best of ``repeats``)."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (n, n), dtype)
    b = jax.random.normal(jax.random.fold_in(key, 1), (n, n), dtype)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def median(values) -> float:
    return float(np.median(np.asarray(values, dtype=np.float64)))


def decoder_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs per token of the decoder (matmuls and attention scores)."""
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    per_layer = 2 * d * (n * h + 2 * k * h) + 2 * n * h * d + 3 * 2 * d * f
    attention = 2 * 2 * n * h * seq_len / 2  # causal: half the scores on average
    return config.num_layers * (per_layer + attention) + 2 * d * v
