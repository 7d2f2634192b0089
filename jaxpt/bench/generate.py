"""Generation throughput.

``--workload uniform`` (default): one batch, every row the same length, through
``generate``. ``--workload heavy-tail``: many requests whose reply lengths are drawn from a
log-normal (as reasoning replies are), through the continuous-batching engine, the static
sampler (batches of ``--batch-size`` running until their longest row ends) and
transformers' ``generate`` on the same batches, alternating; throughput counts useful
tokens (each request's own length), and the bench reports the KV bytes each holds.
"""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np

from jaxpt.bench import decoder_flops_per_token, median, peak_rss_mb


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="bench-tiny", help="preset name or HF model dir")
    parser.add_argument("--workload", choices=("uniform", "heavy-tail"), default="uniform")
    parser.add_argument("--batch-size", type=int, default=32,
                        help="rows of a batch; the engine's decode slots for heavy-tail")
    parser.add_argument("--requests", type=int, default=256, help="heavy-tail: requests")
    parser.add_argument("--mean-tokens", type=float, default=100.0,
                        help="heavy-tail: mean reply length (log-normal, sigma 1)")
    parser.add_argument("--max-tokens", type=int, default=1024,
                        help="heavy-tail: cap on a reply's length")
    parser.add_argument("--rounds", type=int, default=3, help="heavy-tail: alternating rounds")
    parser.add_argument("--page-size", type=int, default=None, help="heavy-tail: KV page size")
    parser.add_argument("--kv-tokens", type=int, default=None,
                        help="heavy-tail: the engine's KV pool in tokens (default: slots x "
                        "(prompt + 3 x mean reply))")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs after the warmup")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--compare-transformers",
        "--compare",
        dest="compare_transformers",
        action="store_true",
        help="also time transformers' PyTorch generate on the same model and batch",
    )
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32",
                        help="heavy-tail: weights and compute dtype (transformers' too)")
    parser.add_argument("--sampler", choices=("auto", "paged", "static"), default="auto",
                        help="uniform: the decoding loop generate runs (see "
                        "jaxpt.sampling.generate)")
    parser.add_argument(
        "--cpu-devices",
        type=int,
        default=1,
        help="on CPU, split the batch over this many JAX devices, one per core "
        "(jax_num_cpu_devices); XLA:CPU runs a device's small decode products on one core",
    )


def _time_runs(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def transformers_device() -> str:
    """Where transformers runs beside jaxpt: the GPU when JAX runs on one and PyTorch sees
    it, else the CPU."""
    import torch

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def _transformers_runner(model, prompts_bt: np.ndarray, new_tokens: int, threads: int,
                         dtype: str = "float32"):
    """A callable running transformers' greedy generate on the same weights and batch."""
    import torch
    import transformers

    from jaxpt.models import save_pretrained

    torch.set_num_threads(threads)
    device = transformers_device()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=getattr(torch, dtype)).to(device).eval()
    ids = torch.as_tensor(prompts_bt, dtype=torch.long, device=device)
    kwargs = {
        "attention_mask": torch.ones_like(ids),
        "max_new_tokens": new_tokens,
        "min_new_tokens": new_tokens,
        "do_sample": False,
        "pad_token_id": 0,
    }

    def run_once():
        with torch.inference_mode():
            hf.generate(ids, **kwargs)
        if device == "cuda":
            torch.cuda.synchronize()

    return run_once


def _data_parallel_cpu(devices: int):
    """A data mesh over ``devices`` CPU devices, None for one. Asks JAX for that many CPU
    devices when it has not started yet; a process that already has them (tests) uses
    its first ``devices``."""
    if devices <= 1:
        return None
    from jaxpt.sharding import make_mesh

    try:
        jax.config.update("jax_num_cpu_devices", devices)
    except RuntimeError:  # JAX already started: use the devices it has
        pass
    if jax.default_backend() != "cpu" or jax.device_count() < devices:
        raise SystemExit(
            f"--cpu-devices {devices} needs the CPU backend with {devices} devices; got "
            f"{jax.device_count()} {jax.default_backend()} devices (JAX_PLATFORMS or "
            "XLA_FLAGS set otherwise?)"
        )
    return make_mesh({"data": devices}, jax.devices()[:devices])


def run(args) -> dict:
    if args.workload == "heavy-tail":
        return run_heavy_tail(args)
    return run_uniform(args)


def heavy_tail_lengths(requests: int, mean: float, cap: int, seed: int) -> list[int]:
    """Reply lengths from a log-normal with sigma 1 and the given mean, in [1, cap]."""
    rng = np.random.default_rng(seed)
    draws = rng.lognormal(np.log(mean) - 0.5, 1.0, requests)
    return np.clip(draws.astype(int), 1, cap).tolist()


def _static_kv_bytes(config, rows: int, prompt_len: int, new_tokens: int,
                     itemsize: int = 4) -> int:
    """The static sampler's KV cache for one batch: every row at the full length."""
    from jaxpt.sampling.api import bucket
    from jaxpt.sampling.engine import cache_length

    slots = cache_length(bucket(prompt_len) + bucket(new_tokens))
    return rows * slots * config.num_layers * 2 * config.num_kv_heads * config.head_dim * itemsize


def run_heavy_tail(args) -> dict:
    from jaxpt.models import load_model
    from jaxpt.sampling import SamplingConfig, generate
    from jaxpt.sampling.continuous import Engine
    from jaxpt.sampling.continuous import trace_count as engine_traces

    model = load_model(args.model, seed=args.seed, dtype=args.dtype, param_dtype=args.dtype)
    config = model.config
    slots, prompt_len = args.batch_size, args.prompt_len
    lengths = heavy_tail_lengths(args.requests, args.mean_tokens, args.max_tokens, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    prompts_rt = rng.integers(0, config.vocab_size, (args.requests, prompt_len))
    prompts = prompts_rt.tolist()
    batches = [range(i, min(i + slots, args.requests)) for i in range(0, args.requests, slots)]
    useful = sum(lengths)
    kv_tokens = args.kv_tokens or int(slots * (prompt_len + 3 * args.mean_tokens))
    sampling = SamplingConfig.make(temperature=args.temperature)
    page = args.page_size or Engine.default_page_size()
    engine_kwargs = {"slots": slots, "max_seq_len": prompt_len + args.max_tokens,
                     "page_size": page, "kv_tokens": kv_tokens}
    stats = {}

    def engine_once():
        engine = Engine(model, sampling, **engine_kwargs)
        key = jax.random.key(args.seed)
        for prompt, n in zip(prompts, lengths):
            engine.add(prompt, n, key)
        done = engine.run()
        assert [len(c.tokens) for c in done] == lengths
        stats.update(engine.kv_bytes(), preemptions=engine.stats.preemptions,
                     decode_steps=engine.stats.decode_steps)

    def static_once():
        for rows in batches:  # no eos: each batch runs until its longest reply is done
            out = generate(model, [prompts[i] for i in rows],
                           max_new_tokens=max(lengths[i] for i in rows),
                           temperature=args.temperature, seed=args.seed, sampler="static")
            assert all(len(t) >= lengths[i] for t, i in zip(out.tokens, rows))

    runners = {"engine": engine_once, "static": static_once}
    if args.compare_transformers:
        hf_batches = [
            _transformers_runner(model, prompts_rt[list(rows)], max(lengths[i] for i in rows),
                                 args.torch_threads, args.dtype)
            for rows in batches
        ]
        runners["transformers"] = lambda: [run_batch() for run_batch in hf_batches]
    for run_once in runners.values():  # warmup: compiles, caches
        run_once()
    traces = engine_traces()
    times = {name: [] for name in runners}
    for _ in range(args.rounds):  # alternating, so each sees the same machine load
        for name, run_once in runners.items():
            times[name] += _time_runs(run_once, 1)
    rates = {name: [round(useful / t, 1) for t in ts] for name, ts in times.items()}
    result = {
        "workload": "heavy-tail",
        "model": args.model,
        "requests": args.requests,
        "slots": slots,
        "prompt_len": prompt_len,
        "mean_tokens": args.mean_tokens,
        "max_tokens": args.max_tokens,
        "useful_tokens": useful,
        "longest": max(lengths),
        "temperature": args.temperature,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "page_size": page,
        "tokens_per_s": round(median(rates["engine"]), 1),
        "engine_tokens_per_s": rates["engine"],
        "static_tokens_per_s": rates["static"],
        "speedup_vs_static": round(median(times["static"]) / median(times["engine"]), 2),
        "recompiles": engine_traces() - traces,
        **stats,
        "static_kv_bytes": max(
            _static_kv_bytes(config, len(rows), prompt_len, max(lengths[i] for i in rows),
                             jax.numpy.dtype(args.dtype).itemsize)
            for rows in batches
        ),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    result["kv_peak_fraction"] = round(result["kv_peak_bytes"] / result["static_kv_bytes"], 3)
    result["kv_pool_fraction"] = round(result["kv_pool_bytes"] / result["static_kv_bytes"], 3)
    if "transformers" in times:
        result["transformers_tokens_per_s"] = rates["transformers"]
        result["speedup_vs_transformers"] = round(
            median(times["transformers"]) / median(times["engine"]), 2
        )
        result["torch_threads"] = args.torch_threads
        result["transformers_device"] = transformers_device()
    return result


def run_uniform(args) -> dict:
    from flax import nnx

    from jaxpt.models import load_model
    from jaxpt.sampling import SamplingConfig, generate, trace_count
    from jaxpt.sampling.api import choose_sampler
    from jaxpt.sharding import replicated

    mesh = _data_parallel_cpu(args.cpu_devices)
    model = load_model(args.model, seed=args.seed)
    if mesh is not None:  # weights on every device, rows split over them
        nnx.update(model, jax.device_put(nnx.state(model), replicated(mesh)))
    config = model.config
    rng = np.random.default_rng(args.seed)
    prompts_bt = rng.integers(0, config.vocab_size, (args.batch_size, args.prompt_len))
    prompts = prompts_bt.tolist()

    def run_once():
        # No eos: every row produces exactly new_tokens tokens, like min_new_tokens in HF.
        out = generate(
            model,
            prompts,
            max_new_tokens=args.new_tokens,
            temperature=args.temperature,
            seed=args.seed,
            mesh=mesh,
            sampler=args.sampler,
        )
        assert all(len(t) == args.new_tokens for t in out.tokens)

    start = time.perf_counter()
    run_once()
    first_s = time.perf_counter() - start
    traces = trace_count()
    hf_run, hf_times = None, []
    if args.compare_transformers:
        try:
            hf_run = _transformers_runner(model, prompts_bt, args.new_tokens, args.torch_threads)
            hf_run()  # warmup
        except ImportError as e:
            hf_run, hf_error = None, str(e)
    times = []
    # Interleaved, so that both see the same machine load.
    for _ in range(args.repeats):
        times += _time_runs(run_once, 1)
        if hf_run is not None:
            hf_times += _time_runs(hf_run, 1)
    step_s = median(times)
    generated = args.batch_size * args.new_tokens
    seq_len = args.prompt_len + args.new_tokens
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens,
        "temperature": args.temperature,
        "sampler": choose_sampler(args.sampler, SamplingConfig(), mesh),
        "backend": jax.default_backend(),
        "devices": 1 if mesh is None else mesh.size,
        "cpu_count": os.cpu_count(),
        "tokens_per_s": round(generated / step_s, 1),
        "run_s": round(step_s, 4),
        "compile_s": round(max(first_s - step_s, 0.0), 3),
        "recompiles": trace_count() - traces,
        "gflops_per_s": round(
            generated * decoder_flops_per_token(config, seq_len) / step_s / 1e9, 2
        ),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    if hf_run is not None:
        hf_tps = generated / median(hf_times)
        result["transformers_tokens_per_s"] = round(hf_tps, 1)
        result["speedup"] = round(result["tokens_per_s"] / hf_tps, 2)
        result["best_speedup"] = round(min(hf_times) / min(times), 2)
        result["torch_threads"] = args.torch_threads
    elif args.compare_transformers:
        result["transformers_error"] = hf_error
    return result
