"""Selectable attention paths (`model.attention_impl`): the XLA path and splash (in its
interpreter) equal the CPU einsum path under packing, padding and sliding windows; the
masking agrees with an independent hand-built mask; splash compiles for a TPU slice."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.config import ConfigError, load_config
from jaxpt.models.layers import (
    AttentionMask,
    attend,
    attention_mask,
    attention_platform,
    resolve_attention,
    splash_attention,
)
from jaxpt.planning.topology import TopologyError, get_topology, libtpu_available
from jaxpt.sharding import make_mesh

B, T, N, K, H = 2, 128, 4, 2, 64


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(B, T, N, H)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(B, T, K, H)), jnp.float32)
    # Row 0: two packed documents then padding; row 1: one document.
    segments = np.ones((B, T), np.int32)
    segments[0, 50:], segments[0, 120:] = 2, 0
    positions = np.tile(np.arange(T), (B, 1))
    positions[0, 50:] -= 50
    positions[0, 120:] = 0
    return q, k, v, jnp.asarray(segments), jnp.asarray(positions, jnp.int32)


def _self_mask(segments, positions, window=None) -> AttentionMask:
    slots = jnp.arange(T, dtype=jnp.int32)
    return attention_mask(segments, slots, positions, segments, slots, positions, window)


def _real(segments):
    return np.asarray(segments)[:, :, None, None] != 0  # padding rows' outputs are unused


def _hand_mask(segments, positions, window):
    """[B, 1, T, T] from loops over numpy: same document, not padding, causal, in window."""
    seg, pos = np.asarray(segments), np.asarray(positions)
    mask = np.zeros((B, 1, T, T), bool)
    for b in range(B):
        for i in range(T):
            for j in range(i + 1):
                same = seg[b, i] == seg[b, j] != 0
                mask[b, 0, i, j] = same and (window is None or pos[b, i] - pos[b, j] < window)
    return mask


@pytest.mark.parametrize("window", [None, 16])
def test_xla_path_equals_einsum_path_and_jax_nn_with_a_hand_built_mask(window):
    q, k, v, segments, positions = _inputs()
    mask = _self_mask(segments, positions, window)
    assert mask.self_attention
    hand = _hand_mask(segments, positions, window)
    np.testing.assert_array_equal(np.asarray(mask.dense), hand)
    einsum = attend(q, k, v, mask, "einsum")
    ours_xla = attend(q, k, v, mask, "xla")
    reference = jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(hand), implementation="xla")
    real = _real(segments)
    for other in (ours_xla, reference):
        np.testing.assert_allclose(np.where(real, einsum, 0), np.where(real, other, 0),
                                   atol=2e-5)


def test_model_logits_are_the_same_on_every_cpu_path(tiny_dir):
    from jaxpt.models import from_pretrained

    ids = jnp.asarray(np.random.default_rng(1).integers(3, 60, size=(2, 12)), jnp.int32)
    segments = jnp.asarray([[1] * 7 + [2] * 5, [1] * 9 + [0] * 3], jnp.int32)
    logits = {}
    for impl in ("auto", "einsum", "xla"):
        model = from_pretrained(tiny_dir, attention_impl=impl)
        logits[impl] = np.asarray(model(ids, segment_ids=segments))
    real = np.asarray(segments)[:, :, None] != 0
    np.testing.assert_array_equal(logits["auto"], logits["einsum"])  # CPU default unchanged
    np.testing.assert_allclose(np.where(real, logits["xla"], 0),
                               np.where(real, logits["einsum"], 0), atol=1e-4)


@pytest.mark.parametrize("window", [None, 16])
def test_splash_kernel_matches_einsum_in_interpret_mode(window):
    q, k, v, segments, positions = _inputs(2)
    mask = _self_mask(segments, positions, window)
    splash = splash_attention(q, k, v, mask, interpret=True)
    einsum = attend(q, k, v, mask, "einsum")
    real = _real(segments)
    np.testing.assert_allclose(np.where(real, splash, 0), np.where(real, einsum, 0), atol=1e-5)


def test_choice_of_path_and_bad_choices():
    q, k, v, segments, positions = _inputs()
    mask = _self_mask(segments, positions)
    assert jax.default_backend() == "cpu"
    assert resolve_attention(None, q, k, mask) == "einsum"
    assert resolve_attention("auto", q, k, mask) == "einsum"
    assert resolve_attention("splash", q, k, mask) == "splash"
    with attention_platform("tpu"):  # as a TPU run (or a plan for one) resolves it
        assert resolve_attention("auto", q, k, mask) == "splash"
        cached = attention_mask(segments, jnp.arange(T), positions, segments,
                                jnp.arange(T), positions, None)  # keys from a cache
        assert resolve_attention("auto", q, k, cached) == "xla"
    with attention_platform("gpu"):
        assert resolve_attention("auto", q.astype(jnp.bfloat16), k, mask) == "cudnn"
        assert resolve_attention("auto", q, k, mask) == "xla"  # cuDNN needs half precision
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'"):
        attend(q, k, v, mask, "flash")
    short = _inputs()[0][:, :100]
    slots = jnp.arange(100, dtype=jnp.int32)
    seg, pos = segments[:, :100], positions[:, :100]
    short_mask = attention_mask(seg, slots, pos, seg, slots, pos, None)
    assert short_mask.self_attention
    with pytest.raises(ValueError, match="multiple of 128"):
        splash_attention(short, short[:, :, :K], short[:, :, :K], short_mask)
    with pytest.raises(ConfigError, match="model.attention_impl"):
        load_config(None, ["task=sft", "data.train=x", "train.max_steps=1", "output_dir=x",
                           "model.attention_impl=flash"])


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_path_matches_xla_on_gpu():
    q, k, v, segments, positions = _inputs()
    mask = _self_mask(segments, positions)
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    assert resolve_attention("auto", q, k, mask) == "cudnn"
    cudnn = attend(q, k, v, mask, "cudnn").astype(jnp.float32)
    xla = attend(q, k, v, mask, "xla").astype(jnp.float32)
    real = _real(segments)
    np.testing.assert_allclose(np.where(real, cudnn, 0), np.where(real, xla, 0), atol=2e-2)


@pytest.mark.skipif(not libtpu_available(), reason="libtpu not installed (pip install jaxpt[tpu])")
def test_splash_lowers_and_compiles_for_a_v5e_slice():
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        topology = get_topology("v5e:2x4")
    except TopologyError as error:
        pytest.skip(f"libtpu cannot describe v5e:2x4 here: {error}")
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2}, devices=list(topology.devices))

    def forward(q, k, v, segments, positions):
        return attend(q, k, v, _self_mask(segments, positions), "splash")

    from jax.sharding import NamedSharding, PartitionSpec

    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    dt = jnp.bfloat16
    b = 4
    args = (
        jax.ShapeDtypeStruct((b, T, N, H), dt, sharding=rows),
        jax.ShapeDtypeStruct((b, T, K, H), dt, sharding=rows),
        jax.ShapeDtypeStruct((b, T, K, H), dt, sharding=rows),
        jax.ShapeDtypeStruct((b, T), jnp.int32, sharding=rows),
        jax.ShapeDtypeStruct((b, T), jnp.int32, sharding=rows),
    )
    with jax.set_mesh(mesh):
        lowered = jax.jit(forward).lower(*args)
        assert "tpu_custom_call" in lowered.as_text()  # the Pallas kernel, not a fallback
        compiled = lowered.compile()
        grad = jax.jit(jax.grad(lambda *a: forward(*a).astype(jnp.float32).sum()))
        grad.lower(*args).compile()
    assert compiled.memory_analysis().temp_size_in_bytes >= 0
