"""SFT train-step throughput: tokens/s, step time and MFU on synthetic packed batches.

``mfu``: the FLOPs the step does (``train_flops_per_token``: under ``--lora`` no weight
gradients for the frozen base) per second over the devices' named peak (``peak_flops``,
``peak_flops_source``: ``jaxpt.bench.PEAK_FLOPS`` by ``device_kind`` and ``--dtype``); null
where none is named (CPUs). ``matmul_peak_fraction`` divides by a matmul measured here
instead (``measured_matmul_flops``). ``compile_s`` is lowering + compiling the step (AOT),
no step run.

Mixture-of-experts models: ``grouped_matmul_share`` is the share of the step spent in the
experts' grouped matmuls, ``grouped_matmul_s`` / ``step_time_s``, where
``grouped_matmul_s`` times the experts' FFN compiled alone (``grouped_matmul_seconds``);
null for dense models.
"""

from __future__ import annotations

import time

import jax
import numpy as np

from jaxpt.bench import (
    RssPhases,
    compiled_memory,
    lora_adapter_params,
    measure_matmul_peak,
    median,
    named_peak_flops,
    train_flops_per_token,
)
from jaxpt.sharding import batch_shards, make_mesh, use_rules

# The LoRA variant (--lora): adapters on every attention and MLP projection.
LORA = {"rank": 16, "alpha": 32}


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="bench-tiny", help="preset name or HF model dir")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--dtype", default="float32", help="compute dtype")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--fsdp", type=int, default=-1)
    parser.add_argument("--expert", type=int, default=1,
                        help="mesh.expert: expert parallelism of MoE models")
    parser.add_argument("--logits-chunk-size", type=int, default=0,
                        help="LM-head positions per chunk (0: all at once)")
    parser.add_argument("--lora", action="store_true",
                        help="train LoRA adapters (rank 16, alpha 32, every projection)")


def synthetic_batch(rng, batch_size: int, seq_len: int, vocab: int) -> dict:
    """Random tokens, every token trained, one document per row (no padding)."""
    ids = rng.integers(1, vocab, (batch_size, seq_len + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1],
        "target_ids": ids[:, 1:],
        "loss_mask": np.ones((batch_size, seq_len), np.float32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)),
        "segment_ids": np.ones((batch_size, seq_len), np.int32),
    }


def grouped_matmul_seconds(model, tokens: int, steps: int, mesh) -> float | None:
    """Seconds of one train step's MoE expert computation on one device, measured apart:
    one device's share of one layer's experts (``jaxpt.models.moe.expert_ffn``: the gate,
    up and down grouped matmuls and the activation), forward plus the gradients to their
    weights and inputs, compiled alone on one device, its median time over ``steps`` runs
    times the number of layers. The share: the batch rows of one (data, fsdp) shard, x
    top-k; under expert parallelism (``mesh``'s ``expert`` axis, S) its E/S experts on the
    dropless buffer of the S expert shards' picks, 1/S of them its own (in equal groups: a
    fresh router spreads tokens about evenly). Dispatch, combine and collectives are not
    in it; neither is tensor parallelism. None for a dense model. Call it under the run's
    rules."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxpt.models.moe import expert_ffn, expert_shards

    config = model.config
    if not getattr(config, "num_experts", 0):
        return None
    batch_ways = batch_shards(mesh)
    with jax.set_mesh(mesh):
        axis = expert_shards(config.num_experts, tokens)
    shards = mesh.shape[axis] if axis else 1
    experts = config.num_experts // shards
    rows = tokens * config.experts_per_token * shards // batch_ways  # the dropless buffer
    computed = rows // shards
    group_sizes = np.full((experts,), computed // experts, np.int32)
    group_sizes[: computed % experts] += 1
    graphdef, stacked = nnx.split(model.model.layers.mlp.experts)
    device = jax.devices()[0]
    # one layer's experts held by one shard [E/S, out, in], on one device
    state = jax.device_put(jax.tree.map(lambda w: np.asarray(w[0, :experts]), stacked), device)
    dtype = model.model.layers.mlp.experts.gate_proj.dtype
    keys = jax.random.split(jax.random.key(0))
    x_md = jax.device_put(jax.random.normal(keys[0], (rows, config.hidden_size), dtype), device)
    cotangent_md = jax.device_put(
        jax.random.normal(keys[1], (rows, config.hidden_size), dtype), device)

    def objective(state, x_md):
        y_md = expert_ffn(nnx.merge(graphdef, state), x_md, jnp.asarray(group_sizes))
        return jnp.sum((y_md * cotangent_md).astype(jnp.float32))

    grads = jax.jit(jax.grad(objective, argnums=(0, 1)))
    times = []
    with jax.set_mesh(make_mesh({}, devices=[device])):
        jax.block_until_ready(grads(state, x_md))  # compile and warm up
        for _ in range(steps):
            start = time.perf_counter()
            jax.block_until_ready(grads(state, x_md))
            times.append(time.perf_counter() - start)
    return median(times) * config.num_layers


def bench_config(args, output_dir: str):
    """An in-memory SFT config for the benchmark: ``setup`` builds the run from it (its batch
    source reads a few shipped arithmetic rows; the timed steps use synthetic batches)."""
    from jaxpt.config import load_config

    lora = {"lora": LORA} if args.lora else {}
    return load_config(None, values={
        **lora, "task": "sft", "output_dir": output_dir,
        "model": {"path": args.model, "dtype": args.dtype, "remat": args.remat},
        "mesh": {"data": 1, "fsdp": args.fsdp, "expert": args.expert, "tensor": 1},
        "data": {"train": "arithmetic", "eval": None, "seq_len": args.seq_len,
                 "arithmetic": {"num_train": 64}},
        "train": {"max_steps": 10**6, "batch_size": args.batch_size,
                  "grad_accum_steps": args.grad_accum,
                  "logits_chunk_size": args.logits_chunk_size},
        "optim": {"lr": 1e-4, "weight_decay": 0.01},
    })


def run(args) -> dict:
    import tempfile

    from jaxpt.loop import setup
    from jaxpt.state import num_params

    rss = RssPhases()  # peak RSS of setup (import, init), compile and the steps apart
    with tempfile.TemporaryDirectory() as out, setup(bench_config(args, out)) as prepared:
        rss.end("setup")
        config = prepared.state.model().config
        rng = np.random.default_rng(0)
        host_batches = [
            synthetic_batch(rng, args.batch_size, args.seq_len, config.vocab_size)
            for _ in range(2)
        ]
        batches = [prepared.put_batch(b) for b in host_batches]
        state = prepared.state
        start = time.perf_counter()
        # Compiled ahead of time, so its memory analysis is read from the program that runs.
        with prepared.activate():
            step = prepared.jit_step(host_batches[0]).lower(state, batches[0]).compile()
        compile_s = time.perf_counter() - start
        rss.end("compile")
        memory = compiled_memory(step)
        for i in range(args.warmup):
            state, metrics = step(state, batches[i % 2])
        jax.block_until_ready(metrics)
        times = []
        for i in range(args.steps):
            start = time.perf_counter()
            state, metrics = step(state, batches[i % 2])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        rss.end("step")
        params = num_params(state.params)
        with use_rules(prepared.ctx.rules):  # timed on one device, on a mesh of its own
            experts_s = grouped_matmul_seconds(state.model(), args.batch_size * args.seq_len,
                                               args.steps, prepared.mesh)
    step_time = median(times)
    tokens = args.batch_size * args.seq_len
    adapters = lora_adapter_params(config, LORA["rank"]) if args.lora else 0
    achieved = train_flops_per_token(config, args.seq_len, adapters) * tokens / step_time
    devices = len(jax.devices())
    kind = jax.devices()[0].device_kind
    named = named_peak_flops(kind, args.dtype)
    peak, peak_source = (named[0] * devices, named[1]) if named else (None, f"none for {kind!r}")
    measured = measure_matmul_peak(dtype=jax.numpy.dtype(args.dtype)) * devices
    return {
        "model": args.model,
        "params": params,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "devices": len(jax.devices()),
        "tokens_per_s": tokens / step_time,
        "step_time_s": step_time,
        "grouped_matmul_s": experts_s,
        "grouped_matmul_share": None if experts_s is None else experts_s / step_time,
        "mfu": achieved / peak if peak else None,
        "peak_flops": peak,
        "peak_flops_source": peak_source,
        "device_kind": kind,
        "achieved_flops": achieved,
        "matmul_peak_fraction": achieved / measured,
        "measured_matmul_flops": measured,
        "compile_s": compile_s,
        "loss": float(metrics["loss"]),
        "peak_rss_mb": rss.peak_mb(),
        **rss.report(),
        "remat": args.remat,
        "logits_chunk_size": args.logits_chunk_size,
        "lora": args.lora,
        **memory,
    }
