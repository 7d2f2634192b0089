"""What the trainer tests share: the tiny model (fast to compile, real architecture), the
overrides of a seconds-long SFT run, and the metrics rows a run writes."""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from jaxpt.data import load_tokenizer
from jaxpt.models import init_model, save_pretrained

TINY = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "max_position_embeddings": 256, "tie_word_embeddings": True,
}
# The same model with a mixture-of-experts MLP: 4 experts, 2 per token.
QWEN3_MOE_TINY = {
    **TINY, "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
    "moe_intermediate_size": 16, "num_experts": 4, "num_experts_per_tok": 2,
}


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = os.path.join(ROOT, "configs", "sft_tiny.yaml")


def sft_overrides(output_dir, model_path, **extra) -> list[str]:
    """``key=value`` overrides of ``configs/sft_tiny.yaml`` for a run of a few seconds on
    ``model_path``; ``extra`` adds or replaces keys."""
    values = {
        "output_dir": output_dir, "model.path": model_path, "data.seq_len": 64,
        "train.batch_size": 8, "data.arithmetic.num_train": 64,
        "logging.progress": "false", "logging.tensorboard": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_device_env(**extra: str) -> dict[str, str]:
    """The environment of a ``python -m jaxpt...`` subprocess on one CPU device: this
    process's, with the suite's compile settings (``tests/conftest.py``) but not its 8
    emulated devices; ``extra`` adds or replaces variables."""
    flags = [flag for flag in os.environ.get("XLA_FLAGS", "").split()
             if not flag.startswith("--xla_force_host_platform_device_count")]
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(flags), **extra}


def train_rows(output_dir: str) -> list[dict]:
    """The train-step rows (those with a ``loss``) of a run's ``metrics.jsonl``."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def make_tiny_dir(path: str, seed: int = 0, config: dict | None = None) -> str:
    """A tiny random causal-LM HF checkpoint (``TINY``, or ``config``) with the shipped
    tokenizer."""
    save_pretrained(init_model(config or TINY, seed=seed), path)
    load_tokenizer().save_pretrained(path)
    return path


def assert_no_reference_saved(checkpoint_dir: str, step: int) -> None:
    """Checkpoint ``step`` stores no copy of the frozen reference (no ``ref_params`` in its
    state's Orbax metadata), only a fingerprint of it."""
    with open(os.path.join(checkpoint_dir, str(step), "state", "_METADATA")) as f:
        metadata = f.read()
    assert "params" in metadata and "ref_params" not in metadata
    with open(os.path.join(checkpoint_dir, str(step), "frozen", "metadata")) as f:
        assert len(json.load(f)["fingerprint"]) == 32


def sft_batch(rows=2, seq_len=16):
    """A fixed SFT batch of random tokens for TINY: one document per row, every target
    trained."""
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 128, (rows, seq_len + 1)).astype(np.int32)
    return {
        "input_ids": ids[:, :-1], "target_ids": ids[:, 1:],
        "loss_mask": np.ones((rows, seq_len), np.float32),
        "positions": np.tile(np.arange(seq_len, dtype=np.int32), (rows, 1)),
        "segment_ids": np.ones((rows, seq_len), np.int32),
    }


def start_processes(argv: list[str], env: dict, logs: list, cwd: str) -> list[subprocess.Popen]:
    """One process of ``argv`` per log path in ``logs`` (JAXPT_PROCESS_ID 0, 1, ... when
    there are several), each writing its output there."""
    started = []
    for i, log in enumerate(logs):
        with open(log, "w") as out:
            started.append(subprocess.Popen(
                argv, env={**env, "JAXPT_PROCESS_ID": str(i)} if len(logs) > 1 else env,
                stdout=out, stderr=subprocess.STDOUT, cwd=cwd))
    return started


def wait_processes(started: list[subprocess.Popen], logs: list, timeout_s: float,
                   what: str = "a process", tail: int = 6000) -> list[str]:
    """Each process's output once all exited with 0; killed after ``timeout_s`` in all, and
    a failure shows every log's end."""
    import pytest

    deadline = time.monotonic() + timeout_s
    for p in started:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in started:
                q.kill()
                q.wait()
    texts = [Path(log).read_text() for log in logs]
    if any(p.returncode != 0 for p in started):
        pytest.fail(f"{what} failed\n" + "\n".join(
            f"--- process {i} (exit {p.returncode}) ---\n{t[-tail:]}"
            for i, (p, t) in enumerate(zip(started, texts))))
    return texts
