"""SFT, DPO and GRPO step a tiny Gemma 3 whose tokenizer carries Gemma 3's chat template
(replies end with ``<end_of_turn>``, not the eos): one step each through the loop's own
setup, as ``python -m jaxpt.train`` runs it."""

import json

import numpy as np
import pytest
from test_gemma import gemma_tokenizer

from jaxpt.config import load_config
from jaxpt.loop import setup
from jaxpt.models import init_model, save_pretrained

pytestmark = pytest.mark.usefixtures("one_device_runs")

GEMMA3_TINY = {
    "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "vocab_size": 160,
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 8,
    "layer_types": ["sliding_attention", "full_attention"], "query_pre_attn_scalar": 16,
    "max_position_embeddings": 256, "pad_token_id": 0,
}


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("gemma3_tiny"))
    save_pretrained(init_model(GEMMA3_TINY, seed=0), path)
    gemma_tokenizer().save_pretrained(path)
    return path


COMMON = {
    "model.dtype": "float32", "data.eval": "null", "train.max_steps": 1,
    "train.batch_size": 4, "logging.progress": "false", "logging.tensorboard": "false",
    "export.hf": "false",
}


def _one_step(values: dict) -> dict:
    config = load_config(None, [f"{k}={v}" for k, v in {**COMMON, **values}.items()])
    with setup(config) as prepared:
        state = prepared.state
        batch, _ = prepared.source.next(state)
        state, metrics = prepared.jit_step(batch)(state, prepared.put_batch(batch))
        assert int(state.step) == 1
    return {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0}


def test_sft_steps(gemma_dir, tmp_path):
    metrics = _one_step({
        "task": "sft", "output_dir": str(tmp_path), "model.path": gemma_dir,
        "data.train": "arithmetic", "data.seq_len": 96, "data.arithmetic.num_train": 16,
    })
    assert np.isfinite(metrics["loss"]) and metrics["loss"] > 1.0


def test_dpo_steps(gemma_dir, tmp_path):
    metrics = _one_step({
        "task": "dpo", "output_dir": str(tmp_path), "model.path": gemma_dir,
        "data.train": "arithmetic", "data.seq_len": 96, "data.arithmetic.num_train": 16,
        "dpo.precompute_ref": "false",
    })
    # The policy starts as its reference: every margin is 0.
    np.testing.assert_allclose(metrics["loss"], np.log(2.0), rtol=1e-5)


def test_grpo_steps(gemma_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say {i}", "answer": str(i)}) + "\n"
                               for i in range(8)))
    metrics = _one_step({
        "task": "grpo", "output_dir": str(tmp_path / "run"), "model.path": gemma_dir,
        "data.train": str(prompts), "grpo.num_generations": 4, "grpo.max_prompt_length": 32,
        "grpo.max_completion_length": 8, "grpo.rewards": "[{name: math}]",
    })
    assert np.isfinite(metrics["loss"])
