"""One path from prompts to samples and text (``jaxpt.sampling.PromptSampler``): RL rollouts,
rejection sampling, evals and judges stop at the same ids and draw the same tokens for the
same prompts, key and settings; padding rows never reach the outputs; a new batch in a
bucket reuses the compiled sampler."""

import json
import os
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import make_tiny_dir

from jaxpt.config import ModelSection, RlSection
from jaxpt.curation.rejection import RejectionConfig, RejectionSection, rejection_sampler
from jaxpt.data import eos_token_ids, load_tokenizer
from jaxpt.evals.runner import task_sampler
from jaxpt.evals.tasks import parse_task
from jaxpt.judges import ModelGenerator
from jaxpt.models import load_model
from jaxpt.sampling import PromptSampler, trace_count
from jaxpt.sharding import batch_shards
from jaxpt.tasks.base import RunContext
from jaxpt.tasks.rl.source import RolloutSource

EXTRA_EOS = 5  # an end-of-reply id only the model dir's generation config names
PROMPT_LEN, NEW_TOKENS, SAMPLES = 32, 8, 4  # "Say i" under the chat template: 24-25 tokens
ROWS = [{"prompt": f"Say {i}", "answer": str(i)} for i in range(4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = make_tiny_dir(str(tmp_path_factory.mktemp("prompt_sampling_model")))
    with open(os.path.join(path, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": [load_tokenizer().eos_token_id, EXTRA_EOS]}, f)
    return path


@pytest.fixture(scope="module")
def model(model_dir):
    return load_model(model_dir)


def rollout_source(model_dir, mesh, tmp_path) -> RolloutSource:
    config = SimpleNamespace(seed=0, train=SimpleNamespace(batch_size=2 * SAMPLES),
                             model=SimpleNamespace(path=model_dir, tokenizer=None),
                             rl=RlSection())
    ctx = RunContext(config, mesh, {}, str(tmp_path), tokenizer=load_tokenizer())
    return RolloutSource(
        ctx, ROWS, make_batch=None, samples_per_prompt=SAMPLES, max_prompt_length=PROMPT_LEN,
        max_completion_length=NEW_TOKENS, temperature=1.0, top_p=1.0, top_k=None,
        rewards=[{"name": "last_number"}],
    )


def test_rollouts_rejection_evals_and_judges_share_eos_ids_and_tokens(
    model_dir, model, mesh1, tmp_path
):
    tokenizer = load_tokenizer()
    expected_eos = tuple(eos_token_ids(tokenizer, model_dir))
    assert EXTRA_EOS in expected_eos

    source = rollout_source(model_dir, mesh1, tmp_path)
    rejection = rejection_sampler(
        RejectionConfig(output_dir=str(tmp_path), model=ModelSection(path=model_dir),
                        rejection=RejectionSection(
                            num_samples=SAMPLES, prompts_per_chunk=2,
                            max_prompt_length=PROMPT_LEN, max_completion_length=NEW_TOKENS)),
        tokenizer, mesh1,
    )
    task = parse_task({"name": "t", "data": "rows.jsonl", "num_samples": SAMPLES,
                       "temperature": 1.0, "max_new_tokens": NEW_TOKENS})
    evals = task_sampler(tokenizer, task, temperature=1.0, num_samples=SAMPLES,
                         model_path=model_dir)
    judge = ModelGenerator(model_dir, max_new_tokens=NEW_TOKENS)
    for sampler in (source.sampler, rejection, evals, judge.sampler):
        assert sampler.sampling.eos_token_ids == expected_eos

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    state = SimpleNamespace(graphdef=graphdef, params=params, rest=rest, step=jnp.int32(0),
                            rng=jax.random.key_data(jax.random.key(3)))
    rollout, metrics = source.sample(state, [0, 1])
    key = jax.random.fold_in(jax.random.key(3), 0)  # the rollout's key at step 0
    prompts = [r["prompt"] for r in ROWS[:2]]
    for sampler in (rejection, evals):
        samples = sampler.sample(model, [sampler.encode(p) for p in prompts], key)
        np.testing.assert_array_equal(samples.arrays.tokens_bn, rollout.tokens)
        np.testing.assert_array_equal(samples.arrays.lengths_b, rollout.lengths)
        assert samples.texts == rollout.texts
    assert rollout.tokens.shape == (2 * SAMPLES, NEW_TOKENS)
    assert rollout.prompt_ids.shape == (2 * SAMPLES, PROMPT_LEN)
    assert "reward" in metrics and "rewards/last_number/mean" in metrics


def test_padding_rows_never_reach_the_outputs(model, mesh8):
    """Three prompts on a mesh whose batch splits 4 ways: one launch pads them to a bucket
    of 4, another to a fixed batch of 16; the real rows come back alone and alike."""
    tokenizer = load_tokenizer()
    prompts = ["Say 1", "What is 2+3?", "Hi"]
    outputs = []
    for batch_size in (None, 16):
        sampler = PromptSampler(tokenizer, max_new_tokens=NEW_TOKENS, temperature=1.0,
                                batch_size=batch_size, mesh=mesh8)
        ids = [sampler.encode(p) for p in prompts]
        launched = sampler.launch(model, ids, jax.random.key(7))
        rows = launched.arrays.tokens_bn.shape[0]  # padding rows included
        assert rows == (batch_size or 4) and rows % batch_shards(mesh8) == 0
        samples = sampler.collect(launched)
        assert samples.arrays.tokens_bn.shape == (3, NEW_TOKENS)
        assert len(samples.texts) == 3 and samples.prompt_ids.shape[0] == 3
        for row, ids_t in zip(samples.prompt_ids, ids):
            assert row[-len(ids_t):].tolist() == ids_t
        outputs.append(samples)
    np.testing.assert_array_equal(outputs[0].arrays.tokens_bn, outputs[1].arrays.tokens_bn)
    assert outputs[0].texts == outputs[1].texts


def test_a_second_batch_in_the_same_bucket_does_not_recompile(model):
    tokenizer = load_tokenizer()
    sampler = PromptSampler(tokenizer, max_new_tokens=NEW_TOKENS, temperature=1.0,
                            num_samples=2, max_prompt_length=PROMPT_LEN, batch_size=4)
    first = [sampler.encode(p) for p in ("Say 1", "Say 22", "Say 3")]
    sampler.sample(model, first, jax.random.key(0))
    compiled = trace_count()
    second = [sampler.encode(p) for p in ("Hi", "Say 456")]  # fewer prompts, other lengths
    samples = sampler.sample(model, second, jax.random.key(1))
    assert trace_count() == compiled
    assert len(samples.texts) == 2 * 2


def test_encode_keeps_the_end_of_a_long_prompt_and_counts_it():
    tokenizer = load_tokenizer()
    sampler = PromptSampler(tokenizer, max_new_tokens=4, max_prompt_length=10)
    full = PromptSampler(tokenizer, max_new_tokens=4).encode("What is 3+4?")
    assert sampler.encode("What is 3+4?") == full[-10:]
    assert sampler.encode([{"role": "user", "content": "x"}])[-3:] == full[-3:]  # same tail
    assert sampler.truncated_prompts == 2
    plain = PromptSampler(tokenizer, max_new_tokens=4, chat=False).encode("What is 3+4?")
    assert plain == list(tokenizer("What is 3+4?")["input_ids"])
    with pytest.raises(ValueError, match="at least one prompt"):
        sampler.launch(None, [], jax.random.key(0))
