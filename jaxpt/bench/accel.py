"""Accelerator check: the accelerator paths against their references, then their speed.

``python -m jaxpt.bench accel`` (``make accel-check``) runs ``PHASES`` in order in one
process, each under its own time budget. A phase that fails or outruns its budget is
recorded with its error and the next one runs; the results are rewritten after every
phase, so a check cut short keeps what it measured: ``accel.json`` and ``accel.md`` (a
Markdown table for BENCHMARKS.md) in ``--out``. The command exits 1 when a phase failed.

Checks (each compares an accelerator path with the reference path jaxpt tests on CPU):
``attention`` (every implementation the platform runs against the einsum path, outputs and
gradients, float32 and bfloat16), ``bf16_loss`` (a bf16 train step against float32),
``paged_kernel`` (the engine's paged attention kernel against its jnp reference, and the
engine's greedy tokens against the static sampler's), ``sharded_step`` (a train step over
every local device against one device). Benchmarks: ``sft`` (MFU against the chip's named
bf16 peak), ``grpo`` (step wall time, generate/update split), ``heavy_tail`` (the engine's
heavy-tail workload beside the static sampler and transformers' generate).

``--size full`` (the default on GPU and TPU) is the Qwen2.5-0.5B shape in bf16 for the
benchmarks and ``bench-tiny`` for the checks, sized for 8 minutes on one H100; ``--size
tiny`` (the default on CPU, and what the test suite runs) runs every phase at tiny sizes.
A budget interrupts a phase when control returns to Python (a signal), so one long
compiled call can overrun it; ``--total-budget`` skips the phases that no longer fit.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import os
import signal
import threading
import time
import traceback
import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Size:
    model: str  # the benchmarks' model
    check_model: str  # the checks' model: compiles in seconds
    dtype: str  # the benchmarks' compute dtype
    attention: tuple[int, int, int, int, int]  # B, T, N, K, H of the attention check
    sft: tuple[str, ...]  # jaxpt.bench.sft arguments
    grpo: tuple[str, ...]  # jaxpt.bench.grpo arguments
    heavy_tail: tuple[str, ...]  # jaxpt.bench.generate arguments
    budgets: dict[str, float]  # seconds per phase


SIZES = {
    "full": Size(
        model="qwen2.5-0.5b", check_model="bench-tiny", dtype="bfloat16",
        attention=(2, 1024, 8, 2, 128),
        sft=("--batch-size", "8", "--seq-len", "2048", "--steps", "10", "--warmup", "2",
             "--logits-chunk-size", "1024"),
        grpo=("--prompts", "16", "--generations", "8", "--prompt-len", "64",
              "--new-tokens", "256", "--steps", "3", "--warmup", "1"),
        heavy_tail=("--requests", "128", "--batch-size", "32", "--prompt-len", "64",
                    "--mean-tokens", "100", "--max-tokens", "512", "--rounds", "1"),
        budgets={"attention": 30, "bf16_loss": 40, "paged_kernel": 40, "sharded_step": 40,
                 "sft": 70, "grpo": 100, "heavy_tail": 140},
    ),
    "tiny": Size(  # bf16 only where the checks compare it: XLA:CPU runs it slowly
        model="bench-tiny", check_model="bench-tiny", dtype="float32",
        attention=(2, 128, 4, 2, 16),
        sft=("--batch-size", "8", "--seq-len", "32", "--steps", "1", "--warmup", "1"),
        grpo=("--prompts", "4", "--generations", "2", "--prompt-len", "48",
              "--new-tokens", "8", "--steps", "2", "--warmup", "1"),
        heavy_tail=("--requests", "10", "--batch-size", "4", "--prompt-len", "6",
                    "--mean-tokens", "6", "--max-tokens", "24", "--rounds", "1",
                    "--page-size", "8"),
        budgets={name: 180 for name in ("attention", "bf16_loss", "paged_kernel",
                                        "sharded_step", "sft", "grpo", "heavy_tail")},
    ),
}


def on_accelerator() -> bool:
    return jax.default_backend() in ("gpu", "tpu")


def add_arguments(parser) -> None:
    parser.add_argument("--size", choices=("auto", *SIZES), default="auto",
                        help="full on GPU and TPU, tiny on CPU (auto)")
    parser.add_argument("--model", default=None,
                        help="one model for every phase (default: the size's)")
    parser.add_argument("--phases", default=None,
                        help="comma-separated subset of the phases (default: all)")
    parser.add_argument("--out", default="runs/accel", help="folder for accel.json, accel.md")
    parser.add_argument("--total-budget", type=float, default=480.0,
                        help="seconds for the whole check; phases that no longer fit skip")
    parser.add_argument("--no-transformers", action="store_true",
                        help="heavy_tail without transformers' generate")


# -- tolerances ---------------------------------------------------------------------------------


def tolerance(dtype: str) -> float:
    """Largest error allowed, relative to the reference's largest magnitude: float32 runs
    TF32 (GPU) or one bf16 pass (TPU) at XLA's default matmul precision on accelerators."""
    if dtype == "bfloat16":
        return 3e-2
    return 1e-2 if on_accelerator() else 1e-4


def relative_error(value, reference, where=None) -> float:
    value = np.asarray(value, np.float64)
    reference = np.asarray(reference, np.float64)
    if where is not None:
        value, reference = np.where(where, value, 0), np.where(where, reference, 0)
    scale = max(float(np.max(np.abs(reference))), 1e-30)
    return float(np.max(np.abs(value - reference)) / scale)


class CheckFailed(AssertionError):
    pass


def expect_close(name: str, error: float, limit: float, figures: dict) -> None:
    figures[name] = float(f"{error:.3g}")
    if not error <= limit:
        raise CheckFailed(f"{name} = {error:.3g} exceeds {limit:.3g}")


# -- checks -------------------------------------------------------------------------------------


def attention_implementations() -> list[str]:
    """The implementations ``jaxpt.models.layers.attend`` runs on this platform, beside the
    einsum reference (splash runs its interpreter off TPU)."""
    return {"gpu": ["xla", "cudnn"], "tpu": ["xla", "splash"]}.get(
        jax.default_backend(), ["xla", "splash"]
    )


def check_attention(size: Size, args) -> dict:
    """Every implementation against the einsum path in float32 (HIGHEST precision) on
    packed documents with padding: outputs and the gradients of q, k and v."""
    from jaxpt.models.layers import attend, attention_mask, splash_attention

    b, t, n, k, h = size.attention
    rng = np.random.default_rng(0)
    q, key, v = (jnp.asarray(rng.normal(size=(b, t, heads, h)), jnp.float32)
                 for heads in (n, k, k))
    segments = np.ones((b, t), np.int32)
    segments[0, t // 3:], segments[0, t - t // 8:] = 2, 0  # two documents, then padding
    positions = np.tile(np.arange(t), (b, 1))
    positions[0, t // 3:] -= t // 3
    slots = jnp.arange(t, dtype=jnp.int32)
    seg, pos = jnp.asarray(segments), jnp.asarray(positions, jnp.int32)
    mask = attention_mask(seg, slots, pos, seg, slots, pos, None)
    real = segments[:, :, None, None] != 0
    cotangent = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * jnp.asarray(real)

    def run(impl, dtype):
        def loss(q, key, v):
            inputs = (x.astype(dtype) for x in (q, key, v))
            if impl == "splash" and jax.default_backend() != "tpu":
                out = splash_attention(*inputs, mask, interpret=True)
            else:
                out = attend(*inputs, mask, impl)
            return jnp.sum(out.astype(jnp.float32) * cotangent), out

        grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, key, v)
        return jax.device_get((out, grads))

    with jax.default_matmul_precision("highest"):
        ref_out, ref_grads = run("einsum", jnp.float32)
    figures = {"implementations": attention_implementations(), "shape_btnkh": [b, t, n, k, h]}
    for impl in figures["implementations"]:
        for dtype in ("float32", "bfloat16"):
            if impl == "cudnn" and dtype == "float32":
                continue  # cuDNN's fused attention is half precision only
            out, grads = run(impl, jnp.dtype(dtype))
            limit = tolerance(dtype)
            expect_close(f"{impl}_{dtype}_out_error", relative_error(out, ref_out, real), limit,
                         figures)
            error = max(relative_error(g, r) for g, r in zip(grads, ref_grads))
            expect_close(f"{impl}_{dtype}_grad_error", error, 2 * limit, figures)
    return figures


def _bench_args(module, argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser.parse_args(list(argv))


def _sft_steps(args_argv, steps: int, mesh=None) -> list[dict]:
    """``steps`` SFT steps on the SFT bench's synthetic batches: each step's metrics (one
    run per arguments: ``bf16_loss`` and ``sharded_step`` share their float32 1-device
    run)."""
    key = (tuple(args_argv), steps, None if mesh is None else mesh.devices.size)
    if key not in _SFT_RUNS:
        _SFT_RUNS[key] = _run_sft_steps(args_argv, steps, mesh)
    return _SFT_RUNS[key]


_SFT_RUNS: dict = {}


def _run_sft_steps(args_argv, steps: int, mesh=None) -> list[dict]:
    import tempfile

    from jaxpt.bench import sft
    from jaxpt.loop import setup

    bench_args = _bench_args(sft, args_argv)
    with tempfile.TemporaryDirectory() as out, \
            setup(sft.bench_config(bench_args, out), mesh=mesh) as prepared:
        vocab = prepared.state.model().config.vocab_size
        rng = np.random.default_rng(0)
        batches = [sft.synthetic_batch(rng, bench_args.batch_size, bench_args.seq_len, vocab)
                   for _ in range(steps)]
        step = prepared.jit_step(batches[0])
        state, rows = prepared.state, []
        for batch in batches:
            state, metrics = step(state, prepared.put_batch(batch))
            rows.append({k: float(v) for k, v in jax.device_get(metrics).items()})
        return rows


def _check_sft_argv(size: Size, args, dtype: str, fsdp: int) -> list[str]:
    seq = "512" if size is SIZES["full"] else "32"
    devices = jax.local_device_count()
    rows = devices * -(-8 // devices)  # at least 8, a multiple of the devices
    return ["--model", args.model or size.check_model, "--dtype", dtype, "--batch-size",
            str(rows), "--seq-len", seq, "--fsdp", str(fsdp)]


def check_bf16_loss(size: Size, args) -> dict:
    """Two SFT steps with bf16 compute against float32 (the same float32 master weights and
    batches): the losses and gradient norms agree within bf16 rounding."""
    one = _one_device_mesh()
    runs = {d: _sft_steps(_check_sft_argv(size, args, d, 1), 2, one)
            for d in ("float32", "bfloat16")}
    figures = {"loss_float32": [r["loss"] for r in runs["float32"]],
               "loss_bfloat16": [r["loss"] for r in runs["bfloat16"]]}
    for i, (full, half) in enumerate(zip(runs["float32"], runs["bfloat16"])):
        expect_close(f"step{i + 1}_loss_error", abs(half["loss"] - full["loss"]) / full["loss"],
                     2e-2, figures)
        expect_close(f"step{i + 1}_grad_norm_error",
                     abs(half["grad_norm"] - full["grad_norm"]) / full["grad_norm"], 5e-2,
                     figures)
    return figures


def check_sharded_step(size: Size, args) -> dict:
    """Two float32 SFT steps with the state and batch sharded over every local device
    (fsdp) against one device: the same losses and gradient norms."""
    devices = jax.local_device_count()
    sharded = _sft_steps(_check_sft_argv(size, args, "float32", -1), 2)
    single = _sft_steps(_check_sft_argv(size, args, "float32", 1), 2, _one_device_mesh())
    figures = {"devices": devices, "loss": [r["loss"] for r in sharded]}
    limit = 1e-3 if on_accelerator() else 1e-5
    for i, (a, b) in enumerate(zip(sharded, single)):
        expect_close(f"step{i + 1}_loss_error", abs(a["loss"] - b["loss"]) / b["loss"], limit,
                     figures)
        expect_close(f"step{i + 1}_grad_norm_error",
                     abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"], 10 * limit, figures)
    return figures


def _one_device_mesh():
    from jaxpt.sharding import make_mesh

    return make_mesh({}, jax.local_devices()[:1])


def check_paged_kernel(size: Size, args) -> dict:
    """The engine's decode attention on this platform's page layout (the GPU or TPU kernel;
    on CPU the GPU kernel's interpreter) against the jnp path over the same pages, for rows
    of different lengths over scattered pages; then the engine's greedy tokens beside the
    static sampler's on the checks' model (reported: near-ties may differ)."""
    from jaxpt.models import paged
    from jaxpt.models.platform import attention_platform
    from jaxpt.sampling import generate

    backend = jax.default_backend()
    h = 128 if size is SIZES["full"] else 16
    b, n, kv, page, width = 4, 8, 2, 16, 8
    layout = paged.default_layout(backend, h) if backend != "cpu" else paged.HEAD_MAJOR
    shape = types.SimpleNamespace(num_layers=1, num_kv_heads=kv, head_dim=h)
    cache = paged.PagedKVCache.init(shape, b * width + 1, page, layout=layout)
    rng = np.random.default_rng(0)
    filled = [jnp.asarray(rng.normal(size=x.shape), jnp.float32) for x in
              jax.tree.leaves(cache.pages[0])]
    pages = jax.tree.unflatten(jax.tree.structure(cache.pages[0]), filled)
    table = rng.permutation(np.arange(1, b * width + 1)).reshape(b, width)
    layer = paged.LayerPages(pages, jnp.asarray(table, jnp.int32), page, layout)
    lengths = [1, page + 3, 3 * page, width * page]
    mask = paged.PagedMask(jnp.asarray([[x - 1] for x in lengths], jnp.int32),
                           jnp.ones((b, 1), bool))
    q = jnp.asarray(rng.normal(size=(b, 1, n, h)), jnp.float32)
    with attention_platform("cpu"):
        reference = paged.attend(q, layer, mask)
    if backend == "cpu":
        kernel = paged.decode_head_major(q, *layer.pages, layer.page_table_bp, mask,
                                         interpret=True)
    else:
        kernel = jax.jit(lambda q, layer: paged.attend(q, layer, mask))(q, layer)
    figures = {"layout": layout, "rows": lengths}
    expect_close("kernel_error", relative_error(kernel, reference), tolerance("float32"),
                 figures)

    from jaxpt.models import load_model

    model = load_model(args.model or size.check_model, seed=0)
    prompts = np.random.default_rng(1).integers(3, model.config.vocab_size, (8, 12)).tolist()
    runs = {s: generate(model, prompts, max_new_tokens=16, seed=0, sampler=s).tokens
            for s in ("paged", "static")}
    same = [a == b for a, b in zip(runs["paged"], runs["static"])]
    figures["engine_rows_equal_static"] = f"{sum(same)}/{len(same)}"
    figures["engine_first_tokens_equal_static"] = sum(
        a[:1] == b[:1] for a, b in zip(runs["paged"], runs["static"]))
    return figures


# -- benchmarks ---------------------------------------------------------------------------------


def bench_sft(size: Size, args) -> dict:
    from jaxpt.bench import sft

    argv = ["--model", args.model or size.model, "--dtype", size.dtype, *size.sft]
    return sft.run(_bench_args(sft, argv))


def bench_grpo(size: Size, args) -> dict:
    from jaxpt.bench import grpo

    argv = ["--model", args.model or size.model, "--dtype", size.dtype, *size.grpo]
    return grpo.run(_bench_args(grpo, argv))


def bench_heavy_tail(size: Size, args) -> dict:
    from jaxpt.bench import generate

    argv = ["--model", args.model or size.model, "--workload", "heavy-tail",
            "--dtype", size.dtype, *size.heavy_tail]
    missing = None
    if not args.no_transformers:
        if importlib.util.find_spec("torch") is None:
            missing = "torch is not installed: transformers' generate left out"
        else:
            argv.append("--compare-transformers")
    result = generate.run(_bench_args(generate, argv))
    if missing:
        result["transformers_error"] = missing
    return result


# The figures each benchmark phase shows in the Markdown table (the JSON keeps them all).
TABLE_KEYS = {
    "sft": ("model", "batch_size", "seq_len", "tokens_per_s", "step_time_s", "mfu",
            "peak_flops_source", "compile_s"),
    "grpo": ("model", "prompts", "generations", "new_tokens", "step_time_s", "generate_s",
             "update_s"),
    "heavy_tail": ("model", "requests", "slots", "tokens_per_s", "speedup_vs_static",
                   "speedup_vs_transformers", "transformers_device", "transformers_error",
                   "recompiles"),
}


PHASES: dict[str, Callable[[Size, argparse.Namespace], dict]] = {
    "attention": check_attention,
    "bf16_loss": check_bf16_loss,
    "paged_kernel": check_paged_kernel,
    "sharded_step": check_sharded_step,
    "sft": bench_sft,
    "grpo": bench_grpo,
    "heavy_tail": bench_heavy_tail,
}


# -- the run ------------------------------------------------------------------------------------


class PhaseTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise ``PhaseTimeout`` in the main thread after ``seconds`` (where signals exist)."""
    in_main_thread = threading.current_thread() is threading.main_thread()
    if not hasattr(signal, "setitimer") or not in_main_thread:
        yield
        return

    def expire(signum, frame):
        raise PhaseTimeout(f"over its budget of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def environment() -> dict:
    import platform

    device = jax.devices()[0]
    from jaxpt.bench import named_peak_flops

    named = named_peak_flops(device.device_kind, "bfloat16")
    return {
        "backend": jax.default_backend(),
        "device_kind": device.device_kind,
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "bf16_peak_flops": named[0] if named else None,
        "bf16_peak_source": named[1] if named else f"none for {device.device_kind!r}",
        "jax": jax.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
    }


def markdown_table(report: dict) -> str:
    """The report as a Markdown table: one row per phase with its key figures."""
    env = report["environment"]
    title = (f"Accelerator check on {env['device_kind']} x{env['devices']} ({env['backend']}, "
             f"jax {env['jax']}), size {report['size']}, {report['total_s']:.0f} s.")
    lines = [
        title,
        "",
        "| phase | status | seconds | figures |",
        "| --- | --- | --- | --- |",
    ]
    for name, phase in report["phases"].items():
        keys = TABLE_KEYS.get(name, [k for k in phase if k not in ("status", "seconds",
                                                                   "traceback")])
        shown = phase.get("error") or ", ".join(
            f"{k}={_short(phase[k])}" for k in keys if k in phase
        )
        lines.append(f"| {name} | {phase['status']} | {phase.get('seconds', '')} | "
                     f"{shown.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def _short(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(map(_short, value)) + "]"
    return str(value)


def run(args) -> dict:
    with contextlib.suppress(RuntimeError):  # CPU: two devices for the sharded step, where
        jax.config.update("jax_num_cpu_devices", 2)  # JAX has not started yet
    size_name = args.size if args.size != "auto" else ("full" if on_accelerator() else "tiny")
    size = SIZES[size_name]
    names = list(PHASES) if not args.phases else args.phases.split(",")
    unknown = [n for n in names if n not in PHASES]
    if unknown:
        raise SystemExit(f"accel: unknown phases {unknown}; choose from {list(PHASES)}")
    os.makedirs(args.out, exist_ok=True)
    _SFT_RUNS.clear()
    start = time.perf_counter()
    report = {"size": size_name, "environment": environment(), "phases": {}, "failed": []}
    for name in names:
        left = args.total_budget - (time.perf_counter() - start)
        budget = size.budgets[name]
        phase_start = time.perf_counter()
        if left < min(budget, 30):
            result = {"status": "skipped", "error": f"{left:.0f} s left of the total budget"}
        else:
            try:
                with time_limit(min(budget, left)):
                    result = {"status": "ok", **PHASES[name](size, args)}
            except Exception as e:  # noqa: BLE001 - recorded; the next phase runs
                result = {"status": "timeout" if isinstance(e, PhaseTimeout) else "failed",
                          "error": f"{type(e).__name__}: {e}"[:500],
                          "traceback": traceback.format_exc(limit=-4)}
                report["failed"].append(name)
        result["seconds"] = round(time.perf_counter() - phase_start, 1)
        report["phases"][name] = result
        report["total_s"] = round(time.perf_counter() - start, 1)
        _write(report, args.out)
    return report


def _write(report: dict, out: str) -> None:
    with open(os.path.join(out, "accel.json"), "w") as f:
        json.dump(report, f, indent=1)
    with open(os.path.join(out, "accel.md"), "w") as f:
        f.write(markdown_table(report))
