"""The continuous-batching engine: greedy parity with transformers while requests join and
leave, the static sampler's exact tokens and log-probs (sampling, n samples, stop
sequences, preemption), prompt pages prefilled once and shared, the page pool's
bookkeeping, both paged KV layouts, and errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_sampling import ARCHS, BASE, _cut_after, _hf_greedy, _models

from jaxpt.models import init_model
from jaxpt.models.paged import (
    COMBINED,
    HEAD_MAJOR,
    SPLIT,
    LayerPages,
    PagedKVCache,
    PagedMask,
    attend,
    decode_head_major,
    write,
)
from jaxpt.sampling import Engine, SamplingConfig, sample_arrays, trace_count
from jaxpt.sampling.api import left_pad
from jaxpt.sampling.page_pool import PagePool

RNG = np.random.default_rng(7)
PROMPTS = [RNG.integers(1, 128, int(n)).tolist() for n in (3, 11, 1, 6, 9, 2, 14)]
BUDGETS = [12, 3, 9, 1, 12, 6, 10]


@pytest.fixture(scope="module")
def tiny():
    return init_model({**BASE, **ARCHS["llama"]}, seed=3)


# The static sampler's test takes llama and qwen2: each family once across the two.
@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_greedy_matches_transformers_as_requests_join_and_leave(arch, tmp_path_factory):
    """Two slots, seven requests of different budgets and an eos: rows leave mid-call and
    waiting ones join the running batch; every reply is transformers' greedy one."""
    model, hf, _ = _models(arch, tmp_path_factory)
    expected = [_hf_greedy(hf, p, n) for p, n in zip(PROMPTS, BUDGETS)]
    eos = expected[4][4]
    engine = Engine(model, SamplingConfig.make(temperature=0.0, eos_token_id=eos), slots=2,
                    max_seq_len=32, page_size=4, steps_per_call=4)
    for prompt, budget in zip(PROMPTS, BUDGETS):
        engine.add(prompt, budget, jax.random.key(0))
    done = engine.run()
    assert [c.tokens for c in done] == [_cut_after(t, eos) for t in expected]
    assert done[4].finish_reason == "stop" and done[0].finish_reason in ("stop", "length")
    assert engine.stats.decode_calls > len(PROMPTS) // 2  # it really ran as a stream
    assert engine.pool.used == 0  # every page came back


@pytest.mark.parametrize("pages", [None, 9], ids=["roomy-pool", "preempting-pool"])
def test_same_tokens_and_logprobs_as_the_static_sampler(tiny, pages):
    """Sampling (temperature, top-k), 3 samples per prompt, an eos and a stop sequence;
    with a pool too small for every row at once, rows are preempted and resumed, and the
    draws are still the static sampler's."""
    graphdef, state = nnx.split(tiny)
    config = SamplingConfig.make(temperature=0.8, top_k=20, eos_token_id=[5], stop=[[9, 9]],
                                 max_new_tokens=16, num_samples=3)
    engine = Engine(tiny, config, slots=4, max_seq_len=32, page_size=4, num_pages=pages,
                    steps_per_call=4)
    key = jax.random.key(11)
    for i, prompt in enumerate(PROMPTS[:4]):
        engine.add(prompt, 16, jax.random.fold_in(key, i), n=3)
    done = engine.run()
    if pages is not None:
        assert engine.stats.preemptions > 0
    for i, prompt in enumerate(PROMPTS[:4]):
        ids, mask = left_pad([prompt], 1, 16)
        static = sample_arrays(graphdef, state, ids, mask, jax.random.fold_in(key, i), config)
        for j in range(3):
            completion, n = done[3 * i + j], int(static.lengths_b[j])
            assert completion.tokens == np.asarray(static.tokens_bn[j, :n]).tolist()
            assert (completion.finish_reason == "stop") == bool(static.finished_b[j])
            for got, want in ((completion.logprobs, static.logprobs_bn),
                              (completion.model_logprobs, static.model_logprobs_bn),
                              (completion.policy_logprobs, static.policy_logprobs_bn)):
                np.testing.assert_allclose(got, np.asarray(want[j, :n]), atol=2e-5)


def test_a_group_prefills_its_prompt_once_and_shares_a_system_prompt(tiny):
    config = SamplingConfig.make(temperature=1.0)
    engine = Engine(tiny, config, slots=8, max_seq_len=64, page_size=4)
    prompt = list(range(1, 19))  # 4 full pages and a partial one
    engine.add(prompt, 5, jax.random.key(0), n=8)
    done = engine.run()
    assert engine.stats.prefill_tokens == len(prompt)  # once for the 8 samples
    assert len({tuple(c.tokens) for c in done}) > 1  # yet 8 different draws
    # A second request that starts with the same 16 tokens finds their pages.
    engine.add(prompt[:16] + [77, 78], 5, jax.random.key(1))
    engine.run()
    assert engine.stats.prefix_hit_tokens == 16
    assert engine.stats.prefill_tokens == len(prompt) + 2
    # New weights make the cached keys stale: nothing is reused after set_weights.
    engine.set_weights(nnx.state(tiny))
    engine.add(prompt, 5, jax.random.key(1))
    engine.run()
    assert engine.stats.prefix_hit_tokens == 16


def test_page_pool_counts_shares_and_evicts():
    pool = PagePool(num_pages=5, page_size=2)  # 4 usable pages
    a = pool.allocate(2)
    pool.register([1, 2, 3, 4], a)
    assert pool.allocate(3) is None and pool.used == 2  # nothing taken on failure
    shared = pool.match_prefix([1, 2, 3, 4, 5])  # both pages match, one token left over
    assert shared == a and pool.used == 2
    assert pool.match_prefix([1, 2, 3, 4]) == a[:1]  # the last token always recomputed
    pool.release(a[:1])
    pool.release(a)
    pool.release(shared)
    assert pool.used == 0 and pool.available() == 4
    assert pool.match_prefix([1, 2, 3, 4, 5]) == a  # still cached after release
    pool.release(a)
    b = pool.allocate(4)  # takes the free pages first, then evicts the cached ones
    assert sorted(b) == [1, 2, 3, 4] and pool.match_prefix([1, 2, 3, 4, 5]) == []
    assert pool.peak_used == 4


def _forward(model, ids, positions, valid, cache):
    return model(ids, positions, valid, cache=cache)


# Compiled, as the engine runs it (op by op, a layout's ~230 operations compiled one at a
# time cost ~10 s of CPU); the combined layout's kernel reference off TPU loops in Python,
# eager calls only (``paged._attend_combined``).
_FORWARDS = {SPLIT: nnx.jit(_forward), HEAD_MAJOR: nnx.jit(_forward), COMBINED: _forward}


@pytest.mark.parametrize("layout", [SPLIT, COMBINED, HEAD_MAJOR])
def test_paged_forward_matches_the_cache_free_forward(tiny, layout):
    """A prompt prefilled in chunks (the last one padded) then decoded one token at a
    time through pages in either layout gives the logits of one plain forward."""
    ids = np.asarray([PROMPTS[6] + PROMPTS[4]])  # 23 tokens
    expected = np.asarray(nnx.jit(lambda model, ids: model(ids))(tiny, jnp.asarray(ids)))
    forward = _FORWARDS[layout]
    cache = PagedKVCache.init(tiny.config, 10, 4, layout=layout)
    cache = cache.with_table(np.array([[3, 1, 7, 2, 9, 4, 5, 0]]))
    logits = []
    for start, count in ((0, 8), (8, 5)):  # chunks of 8, the second with 3 padding tokens
        chunk = np.zeros((1, 8), np.int32)
        chunk[0, :count] = ids[0, start : start + count]
        positions = start + np.arange(8)[None]
        valid = (np.arange(8) < count)[None].astype(np.int32)
        out, cache = forward(tiny, jnp.asarray(chunk), jnp.asarray(positions),
                             jnp.asarray(valid), cache)
        logits.append(np.asarray(out[:, :count]))
    for p in range(13, 23):
        out, cache = forward(tiny, jnp.asarray(ids[:, p : p + 1]), jnp.asarray([[p]]),
                             jnp.ones((1, 1), jnp.int32), cache)
        logits.append(np.asarray(out))
    np.testing.assert_allclose(np.concatenate(logits, axis=1), expected, atol=2e-5)


def test_the_gpu_kernel_reads_head_major_pages_as_the_jnp_path_does():
    """The GPU Pallas paged attention kernel (run by its interpreter here) gives the jnp
    path's decode attention for rows of different lengths over scattered pages."""
    rng = np.random.default_rng(0)
    b, n, kv, h, page, width = 3, 4, 2, 16, 4, 8
    pages = LayerPages(
        (jnp.asarray(rng.normal(size=(kv, 30, page, h)), jnp.float32),
         jnp.asarray(rng.normal(size=(kv, 30, page, h)), jnp.float32)),
        jnp.asarray(rng.permutation(np.arange(1, 30))[: b * width].reshape(b, width), jnp.int32),
        page, HEAD_MAJOR,
    )
    q = jnp.asarray(rng.normal(size=(b, 1, n, h)), jnp.float32)
    mask = PagedMask(jnp.asarray([[2], [13], [30]], jnp.int32), jnp.ones((b, 1), bool))
    kernel = decode_head_major(q, *pages.pages, pages.page_table_bp, mask, interpret=True)
    np.testing.assert_allclose(np.asarray(kernel), np.asarray(attend(q, pages, mask)),
                               atol=1e-5)
    # A write lands where the table says: row 1's position 13 is page table[1, 3], slot 1.
    k_new = jnp.ones((b, 1, kv, h))
    written = write(pages, k_new, -k_new, mask)
    page_13 = int(pages.page_table_bp[1, 3])
    np.testing.assert_array_equal(np.asarray(written.pages[0][:, page_13, 1]), 1.0)
    np.testing.assert_array_equal(np.asarray(written.pages[1][:, page_13, 1]), -1.0)


def test_steady_state_does_not_recompile(tiny):
    engine = Engine(tiny, SamplingConfig.make(temperature=0.0), slots=4, max_seq_len=32,
                    page_size=4, steps_per_call=4)

    def serve(seed):
        rng = np.random.default_rng(seed)
        for _ in range(9):
            prompt = rng.integers(1, 128, int(rng.integers(1, 12))).tolist()
            engine.add(prompt, int(rng.integers(1, 16)), jax.random.key(0))
        return engine.run()

    serve(0)
    serve(1)
    compiled = trace_count()
    serve(2)
    assert trace_count() == compiled


def test_bad_requests_are_refused_with_the_reason(tiny):
    engine = Engine(tiny, SamplingConfig.make(temperature=0.0), slots=2, max_seq_len=16)
    with pytest.raises(ValueError, match="over the engine's max_seq_len 16"):
        engine.add(list(range(1, 12)), 8, jax.random.key(0))
    with pytest.raises(ValueError, match="n=3 samples need 3 slots"):
        engine.add([1, 2], 4, jax.random.key(0), n=3)
    with pytest.raises(ValueError, match="at least one token"):
        engine.add([], 4, jax.random.key(0))
    with pytest.raises(ValueError, match="repetition penalty"):
        Engine(tiny, SamplingConfig.make(repetition_penalty=1.2))
    small = Engine(tiny, SamplingConfig.make(temperature=0.0), slots=2, max_seq_len=16,
                   page_size=4, num_pages=3)
    small.add(list(range(1, 10)), 4, jax.random.key(0))  # 3 pages: more than the pool
    with pytest.raises(RuntimeError, match="cannot hold one sequence"):
        small.run()


@pytest.mark.parametrize("pages", [None, 10], ids=["roomy-pool", "preempting-pool"])
def test_held_sample_resumes_on_its_own_pages(tiny, pages):
    """A held sample ends, keeps its pages, and resumes after appended tokens (a tool's
    result): its next tokens and log-probs are those of a fresh request whose prompt is the
    whole history with the same key, and only the new tokens (plus its last sampled one) are
    prefilled; released, every page comes back. A small pool preempts one of three
    episodes and still continues it exactly."""
    config = SamplingConfig.make(temperature=1.0, top_k=20)
    key_turn, appended = jax.random.key(5), [7, 8, 9, 10, 11]

    def episode_engine():
        return Engine(tiny, config, slots=3, max_seq_len=64, page_size=4, steps_per_call=4,
                      num_pages=pages)

    engine = episode_engine()
    firsts = [engine.add(p, 6, jax.random.key(i), hold=True) for i, p in enumerate(PROMPTS[:3])]
    turn_one = {c.request_id: c for c in engine.run()}
    assert engine.held() == 3 and engine.pool.used > 0
    before = engine.stats.prefill_tokens
    seconds = [engine.resume(r, appended, 8, key_turn, hold=False) for r in firsts]
    turn_two = {c.request_id: c for c in engine.run()}
    if pages is None:  # the history stayed in the pages: only the new tokens ran
        assert engine.stats.prefill_tokens - before == 3 * (len(appended) + 1)
    assert engine.held() == 0 and engine.pool.used == 0

    fresh = episode_engine()
    for r, prompt in zip(firsts, PROMPTS[:3]):
        fresh.add(prompt + turn_one[r].tokens + appended, 8, key_turn)
    expected = fresh.run()
    for second, want in zip(seconds, expected):
        assert turn_two[second].tokens == want.tokens
        np.testing.assert_allclose(turn_two[second].policy_logprobs, want.policy_logprobs,
                                   atol=2e-5)
    if pages is not None:
        assert engine.stats.preemptions > 0


def test_resume_errors_and_release(tiny):
    engine = Engine(tiny, SamplingConfig.make(temperature=0.0), slots=2, max_seq_len=32,
                    page_size=4)
    first = engine.add(PROMPTS[0], 4, jax.random.key(0), hold=True)
    engine.run()
    with pytest.raises(ValueError, match="max_seq_len"):
        engine.resume(first, [1] * 30, 4, jax.random.key(1))
    assert engine.held() == 1  # a refused resume leaves the sample held
    engine.release(first)
    assert engine.held() == 0 and engine.pool.used == 0
    with pytest.raises(KeyError, match="not held"):
        engine.resume(first, [1], 4, jax.random.key(1))
