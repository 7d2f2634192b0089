"""Serving throughput and latency: concurrent streaming clients against ``jaxpt.serve``.

The server runs in this process (uvicorn in a thread, the engine loop in another); each
client thread sends streamed ``/v1/completions`` requests of random token-id prompts over
HTTP and reads the server-sent events as they come. Reported: generated tokens per second
over the timed wall time, time to first token and inter-token latency percentiles (a
chunk of several tokens spreads its gap over them), all requests after a warmup round
(which compiles).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import urllib.request

import numpy as np

from jaxpt.bench import peak_rss_mb


def add_arguments(parser) -> None:
    parser.add_argument("--model", default="jaxpt-tiny", help="preset name or HF model dir")
    parser.add_argument("--clients", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--requests", type=int, default=128, help="timed requests in all")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--slots", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)


def _stream(base: str, prompt: list[int], max_tokens: int, temperature: float) -> dict:
    """One streamed request: when it was sent, when each token-carrying chunk arrived and
    how many tokens it carried."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                       "stream": True, "return_token_ids": True}).encode()
    request = urllib.request.Request(base + "/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
    sent = time.perf_counter()
    arrivals = []
    with urllib.request.urlopen(request, timeout=600) as reply:
        for line in reply:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(f"the server failed a request: {event['error']}")
            tokens = len(event["choices"][0].get("token_ids", []))
            if tokens:
                arrivals.append((time.perf_counter(), tokens))
    return {"sent": sent, "arrivals": arrivals}


def _percentiles(values, name: str) -> dict:
    """p50/p90/p99 in ms (None when there are no values: e.g. one-token replies)."""
    values = np.asarray(values, np.float64) * 1000
    return {f"{name}_p{q}_ms": round(float(np.percentile(values, q)), 2) if len(values) else None
            for q in (50, 90, 99)}


def run(args) -> dict:
    from jaxpt.cli.serve import build_parser, load_backend
    from jaxpt.serving.live import serve_in_thread

    backend = load_backend(build_parser().parse_args([
        "--model", args.model, "--slots", str(args.slots), "--seed", str(args.seed),
        "--max-tokens-limit", str(args.max_tokens), "--max-seq-len",
        str(args.prompt_len + args.max_tokens),
    ]))
    running = serve_in_thread(backend)
    base = running.base
    rng = np.random.default_rng(args.seed)
    vocab = backend.vocab_size

    def round_of(count: int) -> list[dict]:
        prompts = rng.integers(0, vocab, (count, args.prompt_len)).tolist()
        with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            return list(pool.map(
                lambda p: _stream(base, p, args.max_tokens, args.temperature), prompts))

    try:
        round_of(args.clients)  # warmup: every program compiles
        start = time.perf_counter()
        results = round_of(args.requests)
        wall = time.perf_counter() - start
    finally:
        running.close()
    tokens = sum(n for r in results for _, n in r["arrivals"])
    ttft = [r["arrivals"][0][0] - r["sent"] for r in results if r["arrivals"]]
    itl = []
    for r in results:
        for (before, _), (after, n) in zip(r["arrivals"], r["arrivals"][1:]):
            itl += [(after - before) / n] * n
    return {
        "model": args.model,
        "clients": args.clients,
        "requests": args.requests,
        "prompt_len": args.prompt_len,
        "max_tokens": args.max_tokens,
        "slots": args.slots,
        "temperature": args.temperature,
        "cpu_count": os.cpu_count(),
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(results) / wall, 2),
        "generated_tokens": tokens,
        "wall_s": round(wall, 3),
        **_percentiles(ttft, "ttft"),
        **_percentiles(itl, "itl"),
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }
