"""The sampler: greedy parity with transformers, exact logprobs, the filtered distribution,
mesh invariance, bucketing without recompiles, stop sequences and n samples per prompt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxpt.models import from_pretrained, init_model, save_pretrained
from jaxpt.sampling import SamplingConfig, generate, sample_arrays, trace_count
from jaxpt.sampling.processors import nucleus_mask

BASE = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.3,  # peaked logits: greedy never hinges on float noise
    "tie_word_embeddings": False,
}
ARCHS = {
    "llama": {"architectures": ["LlamaForCausalLM"], "model_type": "llama"},
    "qwen2": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"},
    "qwen3": {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "head_dim": 16},
    "mistral": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "sliding_window": 8,
    },
}
PROMPTS = [[5, 17, 99], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [42], [7, 7, 8, 120, 64, 2]]


def _models(arch, tmp_path_factory, seed=0):
    model = init_model({**BASE, **ARCHS[arch]}, seed=seed)
    path = tmp_path_factory.mktemp(arch)
    save_pretrained(model, str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    return model, hf.eval(), str(path)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _models("llama", tmp_path_factory)


def _hf_greedy(hf, prompt, max_new_tokens, **kwargs):
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(prompt) :].tolist()


def _cut_after(tokens, eos):
    return tokens[: tokens.index(eos) + 1] if eos in tokens else tokens


# Each family once across the two samplers (the engine's test takes qwen3 and mistral):
# their forwards' parity is test_models', their decode steps' test_decode's.
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_matches_transformers(arch, tmp_path_factory):
    model, hf, _ = _models(arch, tmp_path_factory)
    expected = [_hf_greedy(hf, p, 12) for p in PROMPTS]
    out = generate(model, PROMPTS, max_new_tokens=12)
    assert out.tokens == expected
    assert out.finish_reasons == ["length"] * len(PROMPTS)

    # An eos that occurs mid-way in one completion: that row stops there (eos kept).
    eos = expected[1][5]
    out = generate(model, PROMPTS, max_new_tokens=12, eos_token_id=eos)
    assert out.tokens == [_cut_after(t, eos) for t in expected]
    assert out.finish_reasons[1] == "stop"
    assert all(len(t) == len(lp) for t, lp in zip(out.tokens, out.logprobs))


def test_a_long_generation_decodes_in_stages_and_matches_transformers(tmp_path_factory):
    """Past DECODE_STAGE new tokens the loop runs in stages over a growing cache: still
    token-identical to transformers, through an eos and a limit that fall mid-stage."""
    from jaxpt.sampling.engine import decode_stages

    # Seed 19: every greedy step of these 70 keeps a top-2 logit margin above 0.02, far
    # from float noise, and never picks the eos id that transformers' min_new_tokens bans
    # (seed 1's path picks it after 14 tokens).
    model, hf, _ = _models("llama", tmp_path_factory, seed=19)
    stages = decode_stages(16, 128)  # the buckets of the call below
    assert [end for _, end in stages] == [32, 64, 96, 128]
    assert [slots for slots, _ in stages] == [48, 80, 112, 144]
    expected = [_hf_greedy(hf, p, 70) for p in PROMPTS[:2]]
    out = generate(model, PROMPTS[:2], max_new_tokens=70)  # stops inside the third stage
    assert out.tokens == expected

    eos = expected[0][40]  # ends row 0 in the second stage (at its first occurrence)
    out = generate(model, PROMPTS[:2], max_new_tokens=70, eos_token_id=eos)
    assert out.tokens == [_cut_after(t, eos) for t in expected]
    assert out.finish_reasons[0] == "stop"
    teacher = _forward_logprobs(model, [PROMPTS[0] + out.tokens[0]], length=64)[0]
    start = len(PROMPTS[0]) - 1
    np.testing.assert_allclose(
        out.model_logprobs[0],
        teacher[np.arange(start, start + len(out.tokens[0])), out.tokens[0]],
        atol=2e-5,
    )


def test_only_cpu_programs_decode_in_stages(llama):
    """Growing the cache holds two copies at once; programs for accelerators, where the
    cache bounds the batch, keep a single decode loop over the whole cache."""
    from jaxpt.models.layers import attention_platform
    from jaxpt.sampling.engine import _sample

    graphdef, state = nnx.split(llama[0])
    ids_bt, mask_bt = np.ones((2, 8), np.int32), np.ones((2, 8), np.int32)
    config = SamplingConfig(max_new_tokens=128, temperature=0.0)

    def loops(platform):
        with attention_platform(platform):
            jaxpr = jax.make_jaxpr(
                lambda s: _sample(_Static(graphdef), s, ids_bt, mask_bt, jax.random.key(0),
                                  jnp.int32(128), np.full(4, -1, np.int32), config)
            )(state)
        return sum(eqn.primitive.name == "while" for eqn in jaxpr.jaxpr.eqns)

    assert loops("cpu") == 4
    assert loops("tpu") == 1


class _Static:
    def __init__(self, graphdef):
        self.graphdef = graphdef


def test_repetition_penalty_matches_transformers(llama):
    model, hf, _ = llama
    expected = [_hf_greedy(hf, p, 10, repetition_penalty=1.5) for p in PROMPTS[:2]]
    out = generate(model, PROMPTS[:2], max_new_tokens=10, repetition_penalty=1.5)
    assert out.tokens == expected


@jax.jit
def _log_softmax_forward(graphdef, state, ids_bt):
    return jax.nn.log_softmax(nnx.merge(graphdef, state)(ids_bt), axis=-1)


def _forward_logprobs(model, sequences, length=32):
    """log_softmax of a plain (no cache) forward pass, right-padded to one jitted shape."""
    ids_bt = np.zeros((len(sequences), length), np.int32)
    for row, seq in enumerate(sequences):
        ids_bt[row, : len(seq)] = seq
    graphdef, state = nnx.split(model)
    return np.asarray(_log_softmax_forward(graphdef, state, ids_bt))


def test_sampled_logprobs_equal_teacher_forced_forward(llama):
    model = llama[0]
    out = generate(model, PROMPTS[:3], max_new_tokens=10, temperature=1.0, seed=3, num_samples=2)
    assert len(out.tokens) == 6
    prompts = [PROMPTS[row // 2] for row in range(6)]
    logprobs_btv = _forward_logprobs(model, [p + t for p, t in zip(prompts, out.tokens)])
    for row, (prompt, tokens) in enumerate(zip(prompts, out.tokens)):
        positions = np.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
        reference = logprobs_btv[row, positions, np.asarray(tokens)]
        np.testing.assert_allclose(out.logprobs[row], reference, atol=1e-4)
        np.testing.assert_allclose(out.model_logprobs[row], reference, atol=1e-4)


def test_policy_logprobs_are_the_unfiltered_tempered_forward_whatever_the_filters(llama):
    """``policy_logprobs_bn``: ``log_softmax(logits / T)`` of the raw logits (no penalty, no
    top-k/top-p/min-p), the policy an RL loss computes, while ``logprobs`` keep the filtered
    distribution's."""
    model, temperature = llama[0], 0.7
    out = generate(model, PROMPTS[:2], max_new_tokens=6, temperature=temperature, top_k=4,
                   top_p=0.8, min_p=0.1, repetition_penalty=2.0, seed=5)
    tokens_scored = [p + t for p, t in zip(PROMPTS[:2], out.tokens)]
    graphdef, state = nnx.split(model)
    width = max(map(len, tokens_scored))
    ids_bt = np.zeros((2, width), np.int32)
    for row, seq in enumerate(tokens_scored):
        ids_bt[row, : len(seq)] = seq
    logits_btv = np.asarray(nnx.merge(graphdef, state)(ids_bt), np.float32)
    for row, (prompt, tokens) in enumerate(zip(PROMPTS[:2], out.tokens)):
        positions = np.arange(len(prompt) - 1, len(prompt) + len(tokens) - 1)
        logprobs_tv = jax.nn.log_softmax(logits_btv[row, positions] / temperature, axis=-1)
        reference = np.asarray(logprobs_tv)[np.arange(len(tokens)), tokens]
        policy = out.arrays.policy_logprobs_bn[row, : len(tokens)]
        np.testing.assert_allclose(policy, reference, atol=1e-5)
        # The filters renormalise: the sampled distribution puts more mass on each token.
        assert (np.asarray(out.logprobs[row]) > policy + 1e-3).all()


def _reference_distribution(logits_v, temperature, top_k=None, top_p=None, min_p=None):
    """The truncated, renormalized distribution, computed directly (HF's definitions)."""
    scores = logits_v.astype(np.float64) / temperature
    keep = np.ones_like(scores, bool)
    if top_k is not None:
        keep &= scores >= np.sort(scores)[-top_k]
    if top_p is not None:
        probs = np.exp(scores - scores.max()) * keep
        probs /= probs.sum()
        order = np.argsort(probs)  # ascending, as transformers does
        cumulative = np.cumsum(probs[order])
        keep[order[cumulative <= 1 - top_p]] = False
    if min_p is not None:
        probs = np.exp(scores - scores.max()) * keep
        keep &= probs >= min_p * probs.max()
    probs = np.exp(scores - scores.max()) * keep
    return probs / probs.sum()


@pytest.mark.parametrize(
    "filters",
    [
        {"temperature": 0.7, "top_k": 12, "top_p": 0.9},
        {"temperature": 0.8, "top_p": 0.9},
        {"temperature": 1.5, "min_p": 0.05},
    ],
)
def test_filtered_sampling_distribution(llama, filters):
    model = llama[0]
    prompt = PROMPTS[0]
    # log_softmax differs from the logits by a constant, which every filter ignores.
    logits_v = _forward_logprobs(model, [prompt])[0, len(prompt) - 1]
    expected = _reference_distribution(logits_v, **filters)
    samples = 4096
    out = generate(model, [prompt], max_new_tokens=1, num_samples=samples, seed=1, **filters)
    first = np.array([t[0] for t in out.tokens])
    assert expected[first].min() > 0  # never outside the support
    # Each reported logprob is the token's log-probability under that distribution.
    np.testing.assert_allclose(
        np.array([lp[0] for lp in out.logprobs]), np.log(expected[first]), atol=1e-4
    )
    empirical = np.bincount(first, minlength=len(expected)) / samples
    total_variation = 0.5 * np.abs(empirical - expected).sum()
    support = int((expected > 0).sum())
    # E[TV] <= 0.5 * sqrt(support / samples); allow a wide margin over it.
    assert total_variation < 0.5 * np.sqrt(support / samples) + 0.02, total_variation


def test_nucleus_mask_matches_the_sorted_prefix_rule():
    rng = np.random.default_rng(0)
    # Flat, peaked and heavy-tailed rows over a 50k vocabulary.
    rows = [
        rng.normal(size=50_000),
        rng.normal(size=50_000) * 8,
        np.concatenate([[12.0, 11.5], rng.normal(size=49_998)]),
    ]
    for logits in rows:
        for top_p in (0.1, 0.5, 0.9, 0.95, 0.99):
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            order = np.argsort(-probs, kind="stable")
            mass_before = np.cumsum(probs[order]) - probs[order]
            expected = np.zeros(len(logits), bool)
            expected[order[mass_before < top_p]] = True
            got = np.asarray(nucleus_mask(jnp.asarray(logits[None], jnp.float32), top_p))[0]
            # Float32 sums may move a token that sits exactly on the boundary; nothing else.
            differ = np.flatnonzero(got != expected)
            assert len(differ) <= 1, (top_p, differ)
            for i in differ:
                boundary = abs(mass_before[np.flatnonzero(order == i)[0]] - top_p)
                assert boundary < 1e-5, (top_p, i, boundary)
            assert got[np.argmax(probs)]  # the top token always stays
    # Tokens tied on the boundary stay or go together, whatever order a sort gives them.
    tied = jnp.asarray([[0.0, 0.0, 3.0]])
    assert np.asarray(nucleus_mask(tied, 0.95)).tolist() == [[True, True, True]]
    assert np.asarray(nucleus_mask(tied, 0.5)).tolist() == [[False, False, True]]


def test_sharded_generation_matches_single_device(llama, mesh8):
    model, _, path = llama
    sharded = from_pretrained(path, mesh=mesh8)
    prompts = PROMPTS + [[9, 8, 7, 6, 5]]
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7}):
        single = generate(model, prompts, max_new_tokens=8, **kwargs)
        multi = generate(sharded, prompts, max_new_tokens=8, **kwargs)
        assert multi.tokens == single.tokens
        np.testing.assert_allclose(
            np.concatenate(multi.logprobs), np.concatenate(single.logprobs), atol=1e-4
        )


def test_one_device_weights_generate_over_a_data_mesh(llama, mesh8):
    """A mesh given for one device's weights splits the batch over its data axes (how a
    CPU host samples on every core) and draws what one device draws."""
    model, _, _ = llama
    prompts = PROMPTS + [[9, 8, 7, 6, 5]]
    for kwargs in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 7}):
        single = generate(model, prompts, max_new_tokens=8, **kwargs)
        split = generate(model, prompts, max_new_tokens=8, mesh=mesh8, **kwargs)
        assert split.tokens == single.tokens
        np.testing.assert_allclose(
            np.concatenate(split.logprobs), np.concatenate(single.logprobs), atol=1e-4
        )


def test_same_bucket_and_new_weights_do_not_recompile(tmp_path_factory):
    model = init_model({**BASE, **ARCHS["llama"], "num_hidden_layers": 1}, seed=5)
    for sampler in ("paged", "static"):
        before = trace_count()
        generate(model, [[1, 2, 3], [4, 5], [6]], max_new_tokens=10, sampler=sampler)
        compiled = trace_count()
        assert compiled > before
        # Different prompt lengths, batch size and max_new_tokens, all in the same buckets.
        generate(model, [[1] * 9, [2, 3], [4, 5, 6, 7], [8]], max_new_tokens=14, sampler=sampler)
        assert trace_count() == compiled

    # The RL path: new weights of the same structure reuse the programs.
    graphdef, state = nnx.split(model)
    config = SamplingConfig(max_new_tokens=16, temperature=0.0)
    ids_bt = np.ones((4, 16), np.int32)
    mask_bt = np.ones((4, 16), np.int32)
    first = sample_arrays(graphdef, state, ids_bt, mask_bt, jax.random.key(0), config)
    compiled = trace_count()
    new_state = jax.tree.map(lambda x: x * 1.5, state)
    second = sample_arrays(graphdef, new_state, ids_bt, mask_bt, jax.random.key(0), config)
    nnx.update(model, new_state)
    generate(model, [[1] * 9, [2, 3], [4, 5, 6, 7], [8]], max_new_tokens=14)
    assert trace_count() == compiled
    assert not np.array_equal(first.tokens_bn, second.tokens_bn)
    assert first.tokens_bn.shape == (4, 16) and bool(first.truncated_b.all())


def test_stop_sequences_and_samples_per_prompt(llama):
    model = llama[0]
    reference = generate(model, PROMPTS, max_new_tokens=12).tokens
    stop = reference[0][3:5]
    out = generate(model, PROMPTS, max_new_tokens=12, stop=[stop, [127, 127, 127]])
    for tokens, ref in zip(out.tokens, reference):
        ends = [i + 2 for i in range(len(ref) - 1) if ref[i : i + 2] == stop]
        assert tokens == (ref[: ends[0]] if ends else ref)
    assert out.finish_reasons[0] == "stop"

    # n samples per prompt, prompt-major; greedy samples all equal the single completion.
    greedy = generate(model, PROMPTS[:2], max_new_tokens=12, num_samples=3)
    assert greedy.tokens == [reference[0]] * 3 + [reference[1]] * 3
    sampled = generate(model, PROMPTS[:2], max_new_tokens=12, temperature=1.0, num_samples=3)
    arrays = sampled.arrays
    assert arrays.tokens_bn.shape == (6, 12)
    assert arrays.lengths_b.tolist() == [12] * 6
    assert len({tuple(t) for t in sampled.tokens[:3]}) > 1  # independent draws


def test_streaming_matches_batch_generation(llama):
    from jaxpt.sampling.stream import stream_tokens

    model = llama[0]
    expected = generate(model, PROMPTS[1:2], max_new_tokens=12).tokens[0]
    assert list(stream_tokens(model, PROMPTS[1], max_new_tokens=12)) == expected
    eos = expected[4]
    assert list(stream_tokens(model, PROMPTS[1], 12, eos_token_id=eos)) == expected[:5]


CHATS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "user", "content": "Hi"}],
]


def test_generate_accepts_tokenizer_output_and_arrays(llama):
    """Every prompt form a user may pass gives the same completions as plain id lists."""

    from jaxpt.data import encode_prompt, load_tokenizer

    model = llama[0]
    tokenizer = load_tokenizer(None)
    # transformers 5 returns a BatchEncoding (a mapping), not a list of ids.
    encodings = [tokenizer.apply_chat_template(m, add_generation_prompt=True) for m in CHATS]
    ids = [list(e["input_ids"]) for e in encodings]
    assert ids == [encode_prompt(tokenizer, m) for m in CHATS]
    expected = generate(model, ids, max_new_tokens=6).tokens

    left = tokenizer.pad(encodings, padding_side="left", return_tensors="np")
    right = tokenizer.apply_chat_template(CHATS, add_generation_prompt=True, padding=True)
    assert np.asarray(left["attention_mask"]).min() == 0  # both batches really are padded
    assert np.asarray(right["attention_mask"]).min() == 0
    batches = {
        "list of BatchEncoding": encodings,
        "list of dicts": [dict(e) for e in encodings],
        "list of 1-D arrays": [np.asarray(p) for p in ids],
        "tuple of tuples": tuple(tuple(p) for p in ids),
        "left-padded mapping": left,
        "right-padded mapping": right,
        "left-padded jax mapping": {k: jnp.asarray(v) for k, v in left.items()},
    }
    for form, prompts in batches.items():
        assert generate(model, prompts, max_new_tokens=6).tokens == expected, form
    for form, (ids_bt, mask_bt) in {
        "2-D numpy array + mask": (left["input_ids"], left["attention_mask"]),
        "2-D jax array + mask": (jnp.asarray(right["input_ids"]), right["attention_mask"]),
    }.items():
        out = generate(model, ids_bt, max_new_tokens=6, attention_mask=mask_bt)
        assert out.tokens == expected, form

    singles = {
        "one BatchEncoding": encodings[0],
        "one [1, T] numpy mapping": tokenizer.apply_chat_template(
            CHATS[0], add_generation_prompt=True, return_tensors="np"
        ),
        "flat list of ints": ids[0],
        "1-D numpy array": np.asarray(ids[0], np.int32),
        "1-D jax array": jnp.asarray(ids[0]),
        "list of numpy ints": list(np.asarray(ids[0])),
    }
    for form, prompt in singles.items():
        assert generate(model, prompt, max_new_tokens=6).tokens == expected[:1], form
    unpadded = np.asarray(ids[0])[None]
    assert generate(model, unpadded, max_new_tokens=6).tokens == expected[:1]


@pytest.mark.parametrize(
    "prompts",
    [
        "What is 2+3?",
        ["What is 2+3?", "Hi"],
        [1.0, 2.0],
        np.array([[1.5, 2.0]]),
        [[[1, 2]], [[3]]],
        [[1, 2], [3, [4]]],
        np.zeros((1, 2, 3), np.int32),
        [True, False],
        {"ids": [1, 2]},
        [{"input_ids": [[1, 2], [3, 4]]}],
        None,
    ],
    ids=[
        "text", "list of texts", "floats", "float array", "too deep", "ragged nesting",
        "3-D array", "bools", "mapping without input_ids", "two prompts in one element", "None",
    ],
)
def test_generate_rejects_other_prompt_forms(llama, prompts):
    with pytest.raises(TypeError, match="generate takes|each element is one prompt"):
        generate(llama[0], prompts, max_new_tokens=2)


def test_generate_prompt_mask_must_match(llama):
    batch = {"input_ids": [[1, 2, 3]], "attention_mask": [[1, 1]]}
    with pytest.raises(ValueError, match="attention_mask has shape"):
        generate(llama[0], batch, max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        generate(llama[0], {"input_ids": [[1, 2]], "attention_mask": [[0, 0]]})


def test_token_choice_draws_exactly_what_jax_random_categorical_draws():
    """The sampler's Gumbel-max draw with its own argmax: same keys, same tokens."""
    from jaxpt.sampling.processors import choose_tokens

    keys = jax.random.split(jax.random.key(3), 64)
    logits = np.random.default_rng(0).normal(size=(64, 1000)) * 3
    logits[:, 500:] = -np.inf  # filtered tokens are never drawn
    logits = jnp.asarray(logits, jnp.float32)
    expected = jax.vmap(jax.random.categorical)(keys, logits)
    got, _ = choose_tokens(logits, keys, SamplingConfig(temperature=1.0))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
    assert np.asarray(got).max() < 500
    greedy, _ = choose_tokens(logits, keys, SamplingConfig(temperature=0.0))
    np.testing.assert_array_equal(np.asarray(greedy), np.argmax(np.asarray(logits), axis=-1))


def test_greedy_choice_is_the_first_argmax_and_its_log_softmax():
    from jaxpt.sampling.processors import first_argmax, greedy_choice, token_logprob

    logits_bv = np.random.default_rng(2).normal(size=(6, 50)).astype(np.float32)
    logits_bv[1, [7, 30]] = logits_bv[1].max() + 1.0  # a tie: the first index wins
    for axis, logits in ((-1, logits_bv), (0, logits_bv.T)):
        token_b, logprob_b = greedy_choice(jnp.asarray(logits), axis)
        np.testing.assert_array_equal(np.asarray(token_b), np.argmax(logits_bv, axis=-1))
        assert int(token_b[1]) == 7
        np.testing.assert_array_equal(np.asarray(token_b), first_argmax(jnp.asarray(logits), axis))
        np.testing.assert_allclose(
            np.asarray(logprob_b),
            np.asarray(token_logprob(jnp.asarray(logits), token_b, axis)),
            rtol=1e-6,
        )


@pytest.mark.parametrize(
    "config",
    [
        SamplingConfig(temperature=0.0),
        SamplingConfig(temperature=1.0),
        SamplingConfig(temperature=0.7, top_p=0.9),
        SamplingConfig(temperature=1.3, min_p=0.05),
        SamplingConfig(temperature=0.8, top_k=20, top_p=0.95),
    ],
    ids=["greedy", "plain", "top-p", "min-p", "top-k"],
)
def test_vocabulary_major_logits_draw_the_same_tokens(config):
    """The decode loop hands the token choice [V, B] logits (axis=0): same keys, same
    tokens and log-probs as the [B, V] layout."""
    from jaxpt.sampling.processors import choose_tokens, token_logprob

    keys = jax.random.split(jax.random.key(5), 16)
    logits_bv = jnp.asarray(np.random.default_rng(1).normal(size=(16, 300)) * 2, jnp.float32)
    tokens_b, logprobs_b = choose_tokens(logits_bv, keys, config)
    tokens_t, logprobs_t = choose_tokens(logits_bv.T, keys, config, axis=0)
    np.testing.assert_array_equal(np.asarray(tokens_t), np.asarray(tokens_b))
    np.testing.assert_allclose(np.asarray(logprobs_t), np.asarray(logprobs_b), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(token_logprob(logits_bv.T, tokens_b, axis=0)),
        np.asarray(token_logprob(logits_bv, tokens_b)),
        rtol=1e-6,
    )
