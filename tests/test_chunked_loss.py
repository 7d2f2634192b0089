"""The chunked LM head (``jaxpt.losses.chunked``) equals the plain [B, T, V] path: per-token
log-probs, entropy and logsumexp, the SFT, DPO and GRPO losses, and their gradients, in
float32 and bfloat16, with T not a multiple of the chunk and masked positions."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import TINY
from tolerances import assert_close_to_leaf_scale

from jaxpt.bench.rm import random_pairs
from jaxpt.config import ConfigError, load_config
from jaxpt.losses import entropy_from_logits, token_logprobs
from jaxpt.losses.chunked import model_token_logprobs, token_stats
from jaxpt.models import init_model
from jaxpt.sampling import generate
from jaxpt.step import StepContext
from jaxpt.tasks import dpo, grpo, sft
from jaxpt.tasks.grpo import GrpoConfig, grpo_loss
from jaxpt.tasks.rollout import Rollout, train_batch

T, CHUNK = 13, 4  # 13 positions: three full chunks and a padded one
# (values rtol/atol, gradient rtol relative to each leaf's largest entry) per compute dtype:
# bfloat16 logits carry ~3 significant digits, and XLA may tile a chunk's matmul otherwise.
TOL = {"float32": (1e-5, 1e-5), "bfloat16": (2e-2, 3e-2)}
DTYPES = ["float32", "bfloat16"]


def _model(dtype):
    # bfloat16 runs the untied head (a separate lm_head), float32 the tied embedding.
    untied = dtype == "bfloat16"
    m = init_model({**TINY, "tie_word_embeddings": not untied}, seed=2, dtype=dtype)
    assert (m.lm_head is not None) == untied
    return m


@pytest.fixture(scope="module", params=DTYPES)
def model(request):
    return _model(request.param)


@pytest.fixture(scope="module")
def model_f32():
    return _model("float32")


def _tol(model):
    return TOL[jnp.dtype(model.dtype).name]


def _ids(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(1, TINY["vocab_size"], shape), jnp.int32)


def _hidden(model, ids_bt):
    return nnx.jit(lambda m, ids: m(ids, return_hidden=True))(model, ids_bt)


def _mask(shape, seed=1):
    mask = np.random.default_rng(seed).random(shape) < 0.7
    mask[:, -1] = False  # padding at the end of every row
    return jnp.asarray(mask, jnp.float32)


def _assert_grads_close(actual, expected, rtol):
    assert_close_to_leaf_scale(
        [np.asarray(x, np.float32) for x in jax.tree.leaves(actual)],
        [np.asarray(x, np.float32) for x in jax.tree.leaves(expected)], rtol=rtol,
    )


def test_token_stats_and_their_gradients_match_the_plain_path(model):
    """Log-probs, entropy, logsumexp and top-1 per token, and the gradients of a loss over
    them with respect to the params (the head) and the hidden states."""
    rtol, grad_rtol = _tol(model)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids_bt = _ids((3, T + 1))
    mask_bt = _mask((3, T))
    hidden_btd = _hidden(model, ids_bt[:, :-1])

    def loss(params, hidden_btd, chunk):
        m = nnx.merge(graphdef, params, rest)
        stats = token_stats(m.logits, hidden_btd, ids_bt[:, 1:], chunk,
                            with_entropy=True, with_top=True)
        per_token = stats.logprobs + 0.3 * stats.entropy + 0.01 * jnp.square(stats.logz)
        return jnp.sum(per_token * mask_bt), stats

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True), static_argnums=2)
    (plain, plain_stats), plain_grads = grad(params, hidden_btd, 0)
    (chunked, stats), grads = grad(params, hidden_btd, CHUNK)

    logits_btv = nnx.jit(lambda m, h: m.logits(h))(model, hidden_btd)
    np.testing.assert_allclose(plain_stats.logprobs, token_logprobs(logits_btv, ids_bt[:, 1:]),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(plain_stats.entropy, entropy_from_logits(logits_btv),
                               rtol=1e-5, atol=1e-5)
    assert stats.logprobs.shape == (3, T)
    for name in ("logprobs", "entropy", "logz"):
        np.testing.assert_allclose(getattr(stats, name), getattr(plain_stats, name),
                                   rtol=rtol, atol=rtol, err_msg=name)
    agree = np.mean(np.asarray(stats.is_top) == np.asarray(plain_stats.is_top))
    assert agree >= (1.0 if rtol < 1e-3 else 0.9)  # bf16 near-ties may flip
    np.testing.assert_allclose(chunked, plain, rtol=rtol)
    _assert_grads_close(grads, plain_grads, grad_rtol)


def test_chunk_size_zero_or_at_least_t_is_the_plain_path_and_negative_is_an_error(model):
    hidden_btd = _hidden(model, _ids((2, T)))
    targets_bt = _ids((2, T), seed=5)
    plain = token_stats(model.logits, hidden_btd, targets_bt, 0).logprobs
    whole = token_stats(model.logits, hidden_btd, targets_bt, T).logprobs
    np.testing.assert_array_equal(whole, plain)
    with pytest.raises(ValueError, match="chunk_size must be >= 0"):
        token_stats(model.logits, hidden_btd, targets_bt, -1)


def test_model_token_logprobs_helper_masks_and_applies_temperature(model):
    rtol, _ = _tol(model)
    ids_bt, targets_bt, mask_bt = _ids((2, T)), _ids((2, T), seed=3), _mask((2, T))
    helper = nnx.jit(functools.partial(model_token_logprobs, chunk_size=CHUNK, temperature=0.5,
                                       with_entropy=True))
    logp_bt, entropy_bt = helper(model, ids_bt, targets_bt, mask_bt)
    logits_btv = nnx.jit(lambda m, ids: m(ids))(model, ids_bt) / 0.5
    expected_bt = np.where(mask_bt > 0, token_logprobs(logits_btv, targets_bt), 0.0)
    np.testing.assert_allclose(logp_bt, expected_bt, rtol=rtol, atol=rtol)
    expected_entropy_bt = np.where(mask_bt > 0, entropy_from_logits(logits_btv), 0.0)
    np.testing.assert_allclose(entropy_bt, expected_entropy_bt, rtol=rtol, atol=rtol)
    assert np.all(np.asarray(logp_bt)[np.asarray(mask_bt) == 0] == 0)


def _loss_and_grads(model, loss_fn, batch, ref_params=None):
    """(loss, metrics, grads w.r.t. the params) of ``loss_fn(model, batch, ctx)``."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ctx = StepContext(jax.random.key(0), jnp.int32(0), ref_params)

    def f(params):
        out = loss_fn(nnx.merge(graphdef, params, rest), batch, ctx)
        return out.numerator / out.denominator, out.metrics

    (loss, metrics), grads = jax.jit(jax.value_and_grad(f, has_aux=True))(params)
    return loss, metrics, grads


def _compare(model, loss_fn, batch, ref_params=None, metrics_atol=None):
    rtol, grad_rtol = _tol(model)
    plain = _loss_and_grads(model, lambda *a: loss_fn(*a, logits_chunk_size=0), batch, ref_params)
    chunked = _loss_and_grads(
        model, lambda *a: loss_fn(*a, logits_chunk_size=CHUNK), batch, ref_params
    )
    np.testing.assert_allclose(chunked[0], plain[0], rtol=rtol, atol=rtol)
    assert plain[1].keys() == chunked[1].keys()
    for name in plain[1]:
        np.testing.assert_allclose(chunked[1][name], plain[1][name], rtol=rtol,
                                   atol=max(rtol, (metrics_atol or {}).get(name, 0.0)),
                                   err_msg=name)
    _assert_grads_close(chunked[2], plain[2], grad_rtol)
    return plain


def test_sft_loss_with_z_loss_matches_the_plain_path(model):
    ids_bt = _ids((4, T + 1), seed=7)
    segment_bt = np.ones((4, T), np.int32)
    segment_bt[1, 9:] = 0  # a padded row
    batch = {
        "input_ids": ids_bt[:, :-1], "target_ids": ids_bt[:, 1:],
        "loss_mask": _mask((4, T)) * segment_bt,
        "positions": jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (4, T)),
        "segment_ids": jnp.asarray(segment_bt),
    }
    # accuracy sums top-1 hits: in bfloat16 a near-tie may flip one token.
    metrics_atol = {"token_accuracy": 1.0} if model.dtype == jnp.bfloat16 else None
    loss, _, _ = _compare(model, lambda m, b, c, **kw: sft.sft_loss(m, b, c, z_loss=1e-3, **kw),
                          batch, metrics_atol=metrics_atol)
    assert np.isfinite(loss) and loss > 0


def test_dpo_log_ratios_and_loss_match_the_plain_path(model_f32):
    model = model_f32
    batch = {k: jnp.asarray(v) for k, v in
             random_pairs(np.random.default_rng(3), 3, T, TINY["vocab_size"]).items()}
    ref_params = jax.tree.map(lambda x: x * 1.01, nnx.state(model, nnx.Param))
    loss_fn = dpo.dpo_task_loss
    _compare(model, loss_fn, batch, ref_params)
    rtol, _ = _tol(model)
    # The sequence log-probs themselves (what the log-ratio is made of).
    pair_logps = nnx.jit(dpo.pair_logps, static_argnums=2)
    plain, chunked = pair_logps(model, batch, 0), pair_logps(model, batch, CHUNK)
    for a, b in zip(chunked, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 10)


def _grpo_batch(lp=5, lc=7, groups=2, g=2):
    rng = np.random.default_rng(4)
    prompt_ids = np.repeat(rng.integers(5, 128, (groups, lp)), g, axis=0).astype(np.int32)
    prompt_mask = np.ones((groups * g, lp), np.int32)
    prompt_mask[:g, :2] = 0  # left padding
    tokens = rng.integers(5, 128, (groups * g, lc)).astype(np.int32)
    lengths = np.array([7, 3, 1, 6])
    rollout = Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=tokens, lengths=lengths,
        logprobs=rng.normal(-4.0, 0.3, (groups * g, lc)).astype(np.float32),
        truncated=np.zeros(groups * g, bool), texts=[], rows=[], rewards=None,
        num_prompts=groups * g,
    )
    batch = train_batch(rollout, rng.normal(size=groups * g).astype(np.float32),
                        np.ones(groups * g, bool))
    return {k: jnp.asarray(v) for k, v in batch.items()}


def test_grpo_loss_entropy_and_kl_match_the_plain_path(model_f32):
    """7 completion positions in chunks of 4 (each group's prompt run once, the default);
    temperature and the k3 KL to a reference."""
    cfg = GrpoConfig(num_generations=2, max_completion_length=7, beta=0.1, temperature=0.7)
    ref_params = jax.tree.map(lambda x: x * 0.98, nnx.state(model_f32, nnx.Param))
    _compare(model_f32, lambda m, b, c, **kw: grpo_loss(m, b, c, cfg=cfg, **kw), _grpo_batch(),
             ref_params)


def test_each_task_binds_train_logits_chunk_size(tmp_path):
    def ctx_for(task, *extra):
        config = load_config(None, [
            f"task={task}", f"output_dir={tmp_path}", "data.train=arithmetic",
            "train.max_steps=1", "train.logits_chunk_size=32", *extra,
        ])
        return types.SimpleNamespace(config=config, task_config=getattr(config, task))

    for module in (sft, dpo, grpo):
        loss = module.make_loss(ctx_for(module.TASK.name))
        assert loss.keywords["logits_chunk_size"] == 32, module.__name__
    with pytest.raises(ConfigError, match="train.logits_chunk_size"):
        ctx_for("sft", "train.logits_chunk_size=-4")


def test_prefill_reads_the_head_at_the_last_prompt_position_only():
    """Greedy tokens of the sampler (prefill runs the LM head at each row's last position,
    decode one step at a time) equal argmax of a full, cache-free forward, step by step,
    for left-padded prompts of different lengths."""
    model = init_model(TINY, seed=5)
    prompts = [[5, 9, 17, 33, 2, 8, 40], [7, 3], [11, 12, 13, 14]]
    new, width = 5, 16
    out = generate(model, prompts, max_new_tokens=new, temperature=0.0)
    forward = nnx.jit(lambda m, ids, mask: m(ids, attention_mask=mask))
    for prompt, tokens in zip(prompts, out.tokens, strict=True):
        ids = list(prompt)
        for _ in range(new):  # right-padded to one width: one compiled forward
            row = np.zeros((1, width), np.int32)
            row[0, : len(ids)] = ids
            mask = (np.arange(width) < len(ids)).astype(np.int32)[None, :]
            logits_tv = forward(model, row, mask)[0]
            ids.append(int(jnp.argmax(logits_tv[len(ids) - 1])))
        assert tokens == ids[len(prompt):]
