"""Generation throughput: batched greedy decoding with the jitted KV-cached sampler."""

from __future__ import annotations

import os
import tempfile
import time

import jax
import numpy as np

from jaxpt.bench import decoder_flops_per_token, median, peak_rss_mb


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="bench-tiny", help="preset name or HF model dir")
    parser.add_argument("--batch-size", type=int, default=32)
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


def _transformers_runner(model, prompts_bt: np.ndarray, new_tokens: int, threads: int):
    """A callable running transformers' greedy generate on the same weights and batch."""
    import torch
    import transformers

    from jaxpt.models import save_pretrained

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()
    ids = torch.as_tensor(prompts_bt, dtype=torch.long)
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
    from flax import nnx

    from jaxpt.models import load_model
    from jaxpt.sampling import generate, trace_count
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
