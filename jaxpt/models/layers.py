"""Building blocks of the decoder: linear, RMSNorm, rotary embeddings, attention, MLP.

Weights keep the Hugging Face layout (``[out_features, in_features]``), so checkpoints
load slice by slice with no transposes, and each parameter names its logical axes
(``logical_axes`` metadata) for ``jaxpt.sharding``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxpt.sharding import constrain


def _along_last(v, ndim):
    """A vector shaped to broadcast over the last axis of an ``ndim`` array (explicit
    ranks, so ``jax_numpy_rank_promotion='raise'`` holds)."""
    return v.reshape((1,) * (ndim - 1) + v.shape)


def _normal(rngs: nnx.Rngs, shape, std: float, dtype):
    return std * jax.random.normal(rngs.params(), shape, dtype)


class Linear(nnx.Module):
    """``y = x @ W.T + b`` with ``W`` stored as ``[out, in]``."""

    def __init__(self, in_features, out_features, *, axes, bias, rngs, std, dtype, param_dtype):
        self.weight = nnx.Param(
            _normal(rngs, (out_features, in_features), std, param_dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=axes[:1])
            if bias
            else None
        )
        self.dtype = dtype

    def __call__(self, x):
        y = jnp.einsum("...i,oi->...o", x.astype(self.dtype), self.weight[...].astype(self.dtype))
        if self.bias is not None:
            y = y + _along_last(self.bias[...].astype(self.dtype), y.ndim)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, as transformers does, then cast back."""

    def __init__(self, dim, *, eps, axes=("norm",), dtype, param_dtype):
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=axes)
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return _along_last(self.weight[...].astype(self.dtype), x.ndim) * x32.astype(self.dtype)


def rotary_cos_sin(positions_bt, inv_freq_f):
    """cos and sin tables [B, T, head_dim] in float32 for the given positions."""
    angles_btf = positions_bt.astype(jnp.float32)[:, :, None] * inv_freq_f[None, None, :]
    angles_bth = jnp.concatenate([angles_btf, angles_btf], axis=-1)
    return jnp.cos(angles_bth), jnp.sin(angles_bth)


def apply_rotary(x_btnh, cos_bth, sin_bth):
    """Rotate query/key heads by position (the half-split layout transformers uses)."""
    half = x_btnh.shape[-1] // 2
    rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    out = x_btnh.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x_btnh.dtype)


def attention_mask(q_segment_bt, q_slot_t, q_pos_bt, k_segment_bs, k_slot_s, k_pos_bs, window):
    """Boolean mask [B, 1, T, S]: causal in slot order, same document, key not padding.

    Slots are indices into the key sequence (the KV cache during decoding); positions are
    the rotary positions, used for sliding-window attention.
    """
    same_doc = q_segment_bt[:, :, None] == k_segment_bs[:, None, :]
    mask = same_doc & (k_segment_bs[:, None, :] != 0)
    mask = mask & (k_slot_s[None, None, :] <= q_slot_t[None, :, None])
    if window is not None:
        mask = mask & (q_pos_bt[:, :, None] - k_pos_bs[:, None, :] < window)
    return mask[:, None, :, :]


def decode_attention(q_b1nh, k_bskh, v_bskh, mask_b11s):
    """One query per row against a KV cache, as multiply-and-reduce over the cache's
    stored [B, S, K, H] layout: a batched dot makes XLA CPU transpose (copy) the whole
    cache every decode step, which costs more than the attention itself."""
    b, _, n, h = q_b1nh.shape
    k = k_bskh.shape[2]
    q_bkgh = q_b1nh.reshape(b, k, n // k, h).astype(jnp.float32) * (h**-0.5)
    scores_bskg = jnp.sum(q_bkgh[:, None] * k_bskh[:, :, :, None, :].astype(jnp.float32), -1)
    mask_bs11 = mask_b11s[:, 0, 0, :, None, None]
    scores_bskg = jnp.where(mask_bs11, scores_bskg, jnp.finfo(jnp.float32).min)
    probs_bskg = jax.nn.softmax(scores_bskg, axis=1)
    v_bsk1h = v_bskh[:, :, :, None, :].astype(jnp.float32)
    out_bkgh = jnp.sum(probs_bskg[..., None] * v_bsk1h, axis=1)
    return out_bkgh.reshape(b, 1, n, h).astype(q_b1nh.dtype)


def grouped_attention(q_btnh, k_bskh, v_bskh, mask_b1ts):
    """Grouped-query attention as two einsums and a float32 softmax.

    Numerically the same as ``jax.nn.dot_product_attention``'s XLA path, but several
    times faster on CPU, where that path materializes the repeated kv heads and a
    broadcast mask; the query heads are grouped onto their kv head instead.
    """
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
    scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh).astype(jnp.float32)
    scores_bkgts = scores_bkgts * (h**-0.5)
    mask_b11ts = mask_b1ts[:, :, None, :, :]
    scores_bkgts = jnp.where(mask_b11ts, scores_bkgts, jnp.finfo(jnp.float32).min)
    probs_bkgts = jax.nn.softmax(scores_bkgts, axis=-1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
    return out_btkgh.reshape(b, t, n, h)


def attend(q_btnh, k_bskh, v_bskh, mask_b1ts, implementation=None):
    """Dispatch attention: ``implementation`` None picks the einsum path on CPU and
    ``jax.nn.dot_product_attention`` (XLA) elsewhere; ``"einsum"``, ``"xla"`` and
    ``"cudnn"`` select one explicitly (cudnn is the GPU flash kernel)."""
    if implementation is None:
        implementation = "einsum" if jax.default_backend() == "cpu" else "xla"
    if implementation == "einsum":
        return grouped_attention(q_btnh, k_bskh, v_bskh, mask_b1ts)
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=mask_b1ts, implementation=implementation
    )


class Attention(nnx.Module):
    """Grouped-query attention with RoPE, optional qkv bias and q/k RMSNorm."""

    def __init__(self, config, *, rngs, dtype, param_dtype, implementation=None):
        c = config
        std = c.initializer_range
        common = {"rngs": rngs, "std": std, "dtype": dtype, "param_dtype": param_dtype}
        d, n, k, h = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
        self.q_proj = Linear(d, n * h, axes=("heads", "embed"), bias=c.qkv_bias, **common)
        self.k_proj = Linear(d, k * h, axes=("kv_heads", "embed"), bias=c.qkv_bias, **common)
        self.v_proj = Linear(d, k * h, axes=("kv_heads", "embed"), bias=c.qkv_bias, **common)
        self.o_proj = Linear(n * h, d, axes=("embed", "heads"), bias=c.o_bias, **common)
        if c.qk_norm:
            norm = {
                "eps": c.rms_norm_eps,
                "axes": ("head_dim",),
                "dtype": dtype,
                "param_dtype": param_dtype,
            }
            self.q_norm = RMSNorm(h, **norm)
            self.k_norm = RMSNorm(h, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.implementation = implementation

    def __call__(self, x_btd, cos_bth, sin_bth, mask_b1ts, kv_cache=None, cache_index=None):
        """Attend; with ``kv_cache=(k_bskh, v_bskh)`` the new keys/values are written at
        ``cache_index`` and attention runs over the whole cache. Returns (out, new kv)."""
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rotary(q, cos_bth, sin_bth), ("batch", "seq", "heads", None))
        k = constrain(apply_rotary(k, cos_bth, sin_bth), ("batch", "seq", "kv_heads", None))
        v = constrain(v, ("batch", "seq", "kv_heads", None))
        if kv_cache is not None:
            k_cache, v_cache = kv_cache
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), start)
            v = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), start)
            kv_cache = (k, v)
        if kv_cache is not None and t == 1 and self.implementation is None:
            out = decode_attention(q, k, v, mask_b1ts)
        else:
            out = attend(q, k.astype(q.dtype), v.astype(q.dtype), mask_b1ts, self.implementation)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), kv_cache


class MLP(nnx.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config, *, rngs, dtype, param_dtype):
        c = config
        common = {
            "rngs": rngs,
            "std": c.initializer_range,
            "dtype": dtype,
            "param_dtype": param_dtype,
        }
        d, f = c.hidden_size, c.intermediate_size
        self.gate_proj = Linear(d, f, axes=("mlp", "embed"), bias=c.mlp_bias, **common)
        self.up_proj = Linear(d, f, axes=("mlp", "embed"), bias=c.mlp_bias, **common)
        self.down_proj = Linear(f, d, axes=("embed", "mlp"), bias=c.mlp_bias, **common)

    def __call__(self, x_btd):
        h_btf = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
        return self.down_proj(constrain(h_btf, ("batch", "seq", "mlp")))
