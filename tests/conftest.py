"""Test setup: emulate 8 CPU devices before jax is imported, and share small fixtures."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def mesh8():
    """A (data=2, fsdp=2, tensor=2) mesh over the 8 emulated CPU devices."""
    from jaxpt.sharding import make_mesh

    return make_mesh({"data": 2, "fsdp": 2, "tensor": 2})


@pytest.fixture(scope="session")
def mesh1():
    """A single-device mesh with the same axis names."""
    from jaxpt.sharding import make_mesh

    return make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random HF checkpoint (Llama, 2 layers) with the shipped tokenizer."""
    from tiny import make_tiny_dir

    return make_tiny_dir(str(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def prompts_file(tmp_path_factory):
    """32 RL prompts "Say i" with answer i (.jsonl), for the toy-reward RL runs."""
    import json

    path = tmp_path_factory.mktemp("rl_prompts") / "prompts.jsonl"
    with open(path, "w") as f:
        f.writelines(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n" for i in range(32))
    return str(path)
