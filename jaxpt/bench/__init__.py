"""Benchmarks: ``python -m jaxpt.bench <name> ...`` prints one JSON line per run.

Each benchmark is a module ``jaxpt.bench.<name>`` with ``add_arguments(parser)`` and
``run(args) -> dict``; the shared helpers here measure the machine and the process. The
command itself is ``jaxpt.cli.bench``.
"""

from __future__ import annotations

import itertools
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

BENCHMARKS = ("sft", "generate", "serve", "grpo", "ppo", "rm", "memory", "accel")


def _max_rss_mb(who: int) -> float:
    """``ru_maxrss`` of ``resource.RUSAGE_SELF`` or ``RUSAGE_CHILDREN`` in MiB."""
    scale = 1024 if sys.platform != "darwin" else 1024**2  # KiB on Linux, bytes on macOS
    return resource.getrusage(who).ru_maxrss / scale


def peak_rss_mb() -> float:
    """Peak resident memory in MiB of this process plus its largest finished child (data
    workers, reward sandboxes); ``ru_maxrss`` of the children is their largest peak."""
    return _max_rss_mb(resource.RUSAGE_SELF) + _max_rss_mb(resource.RUSAGE_CHILDREN)


def _own_peak_rss_mb() -> float | None:
    """This process's peak resident memory since start or the last ``RssPhases.end``
    (Linux ``VmHWM``), in MiB; None where /proc does not report it."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class RssPhases:
    """Peak resident memory of each phase of a benchmark (setup, compile, steps), in MiB.

    ``end(phase)`` records the peak since the previous ``end`` and restarts the count
    (Linux: ``VmHWM``, reset by writing 5 to ``/proc/self/clear_refs``). Where the peak
    cannot be reset, each phase reports the peak so far. ``peak_mb`` is the largest phase
    peak, or ``peak_rss_mb()`` where larger (the reset also lowers ``ru_maxrss``).
    """

    def __init__(self):
        self.peaks: dict[str, float] = {}

    def end(self, phase: str) -> float | None:
        peak = _own_peak_rss_mb()
        if peak is not None:
            self.peaks[phase] = peak
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        return peak

    def peak_mb(self) -> float:
        children = _max_rss_mb(resource.RUSAGE_CHILDREN)
        return max([peak_rss_mb(), *(p + children for p in self.peaks.values())])

    def report(self) -> dict:
        """``<phase>_peak_rss_mb`` of every recorded phase."""
        return {f"{phase}_peak_rss_mb": p for phase, p in self.peaks.items()}


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


def step_wall_times(rows, warmup: int) -> list[float]:
    """Wall time of each train step after ``warmup``: the ``walltime`` of its
    ``metrics.jsonl`` row minus the previous step's. The writer stamps a train row once the
    step's metrics are fetched (the step has ended), so this is the time between consecutive
    step ends, host work between the phases included: what the peers' benchmarks report
    (TRL's ``on_step_end`` marks). Needs a row per step (``train.log_every=1``)."""
    train = [r for r in rows if "loss" in r and "walltime" in r]
    return [
        b["walltime"] - a["walltime"]
        for a, b in itertools.pairwise(train)
        if b["step"] > warmup and b["step"] == a["step"] + 1
    ]


def step_time_figures(rows, warmup: int, phase_sums) -> dict:
    """The RL benches' step figures: ``step_time_s`` (median wall time between consecutive
    step ends, see ``step_wall_times``), its mean and each step's, and ``phase_sum_s``: the
    median of the timed phases' sum (what ``step_time_s`` was before it was wall time)."""
    walls = step_wall_times(rows, warmup)
    if not walls:
        raise SystemExit("bench: not enough steps after warmup; raise --steps")
    return {
        "step_time_s": round(median(walls), 4),
        "step_time_mean_s": round(float(np.mean(walls)), 4),
        "step_times_s": [round(w, 4) for w in walls],
        "phase_sum_s": round(median(phase_sums), 4),
    }


def _projection_shapes(config, router: bool = True) -> list[tuple[int, int]]:
    """(in, out) of the projections one token goes through in one layer: q, k, v, o, gate,
    up, down; in a mixture-of-experts layer the router and each of the token's experts'
    gate, up and down (the experts it is not routed to do no work for it); ``router=False``
    leaves the router out (LoRA does not adapt it)."""
    d, f = config.hidden_size, config.intermediate_size
    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    attention = [(d, n * h), (d, k * h), (d, k * h), (n * h, d)]
    if getattr(config, "num_experts", 0):
        f = config.moe_intermediate_size
        routed = config.experts_per_token * [(d, f), (d, f), (f, d)]
        return attention + ([(d, config.num_experts)] if router else []) + routed
    return attention + [(d, f), (d, f), (f, d)]


def _attention_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs per token of the attention scores and their weighted sum (no weights)."""
    n, h = config.num_heads, config.head_dim
    return config.num_layers * 2 * 2 * n * h * seq_len / 2  # causal: half on average


def _matmul_params(config) -> int:
    """Weights that multiply every token: the layers' projections and the LM head."""
    per_layer = sum(i * o for i, o in _projection_shapes(config))
    return config.num_layers * per_layer + config.hidden_size * config.vocab_size


def decoder_flops_per_token(config, seq_len: int) -> float:
    """Forward FLOPs per token of the decoder (matmuls and attention scores)."""
    return 2 * _matmul_params(config) + _attention_flops_per_token(config, seq_len)


def lora_adapter_params(config, rank: int) -> int:
    """Parameters of rank-``rank`` adapters on every attention and MLP projection (A: in x r,
    B: r x out), as ``jaxpt.bench.sft.LORA`` trains them."""
    shapes = _projection_shapes(config, router=False)
    return config.num_layers * sum(rank * (i + o) for i, o in shapes)


def train_flops_per_token(config, seq_len: int, adapter_params: int = 0) -> float:
    """FLOPs per token of one train step (forward + backward) that the step actually does.

    Full fine-tuning: 3x the forward (``decoder_flops_per_token``): 2 per weight forward, 2
    for the activation gradient, 2 for the weight gradient, so 6 per matmul weight.
    With LoRA (``adapter_params`` > 0) the base weights are frozen: their weight gradients
    are not computed, but activation gradients still flow through them to the adapters
    below, so 4 per frozen weight (LM head included); the adapters themselves cost 6 per
    parameter (x @ A @ B forward is 2 per parameter); the attention scores have no weights
    and keep 3x their forward (gradients to q, k and v)::

        lora = 4 * frozen_matmul_params + 6 * adapter_params + 3 * attention_forward

    (The first layer's q/k/v input gradient is not needed either: an overcount of at most
    2 * d * (q + k + v width) per token, under 1/num_layers of the projections' share.)
    """
    attention = _attention_flops_per_token(config, seq_len)
    if not adapter_params:
        return 3 * decoder_flops_per_token(config, seq_len)
    return 4 * _matmul_params(config) + 6 * adapter_params + 3 * attention


# Dense (no sparsity) matmul peaks per device as JAX counts devices, by ``device_kind``
# substring (lower case, first match wins: specific names before general ones). float32
# matmuls run at XLA's default precision: one bf16 pass on TPU, TF32 tensor cores on
# NVIDIA Ampere and later, so those are their float32 peaks.
# Sources: cloud.google.com/tpu/docs/<version> (bf16 per chip; v2/v3 JAX devices are
# TensorCores, half a chip), NVIDIA's A100 / H100 / H200 datasheets (dense, SXM unless named).
PEAK_FLOPS: tuple[tuple[str, float, float, str], ...] = (
    # (device_kind substring, bfloat16 FLOP/s, float32 FLOP/s, source)
    ("tpu v2", 22.5e12, 22.5e12, "Google Cloud TPU v2: 45 TFLOP/s bf16 per chip, 2 cores"),
    ("tpu v3", 61.5e12, 61.5e12, "Google Cloud TPU v3: 123 TFLOP/s bf16 per chip, 2 cores"),
    ("tpu v4", 275e12, 275e12, "Google Cloud TPU v4: 275 TFLOP/s bf16 per chip"),
    ("tpu v5 lite", 197e12, 197e12, "Google Cloud TPU v5e: 197 TFLOP/s bf16 per chip"),
    ("tpu v5e", 197e12, 197e12, "Google Cloud TPU v5e: 197 TFLOP/s bf16 per chip"),
    ("tpu v5", 459e12, 459e12, "Google Cloud TPU v5p: 459 TFLOP/s bf16 per chip"),
    ("tpu v6 lite", 918e12, 918e12, "Google Cloud TPU v6e: 918 TFLOP/s bf16 per chip"),
    ("tpu v6e", 918e12, 918e12, "Google Cloud TPU v6e: 918 TFLOP/s bf16 per chip"),
    ("h100 pcie", 756e12, 378e12, "NVIDIA H100 PCIe datasheet: 756 bf16 / 378 TF32 TFLOP/s dense"),
    ("h100 nvl", 835e12, 418e12, "NVIDIA H100 NVL datasheet: 835 bf16 / 418 TF32 TFLOP/s dense"),
    ("h100", 989e12, 495e12, "NVIDIA H100 SXM datasheet: 989 bf16 / 495 TF32 TFLOP/s dense"),
    ("h200 nvl", 835e12, 418e12, "NVIDIA H200 NVL datasheet: 835 bf16 / 418 TF32 TFLOP/s dense"),
    ("h200", 989e12, 495e12, "NVIDIA H200 SXM datasheet: 989 bf16 / 495 TF32 TFLOP/s dense"),
    ("a100", 312e12, 156e12, "NVIDIA A100 datasheet: 312 bf16 / 156 TF32 TFLOP/s dense"),
)


def named_peak_flops(device_kind: str, dtype: str) -> tuple[float, str] | None:
    """(peak matmul FLOP/s of one device, its source) for a ``jax.Device.device_kind`` and a
    compute dtype name (``float32``; ``bfloat16`` and ``float16`` use the 16-bit peak), or
    None where the table names no peak (CPUs, unknown accelerators)."""
    kind = device_kind.lower()
    for pattern, bf16, fp32, source in PEAK_FLOPS:
        if pattern in kind:
            return (fp32 if dtype == "float32" else bf16), source
    return None
