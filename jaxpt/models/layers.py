"""Building blocks of the decoder: linear, RMSNorm, rotary embeddings, attention, MLP.

Weights keep the Hugging Face layout (``[out_features, in_features]``), so checkpoints
load slice by slice with no transposes, and each parameter names its logical axes
(``logical_axes`` metadata) for ``jaxpt.sharding``. Every module runs in either activation
``Layout``: batch-major (every forward) or feature-major (a one-token decode step on CPU).
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.sharding import PartitionSpec

from jaxpt.models import paged
from jaxpt.models.platform import attention_platform, target_platform  # noqa: F401 (public here)
from jaxpt.sharding import constrain, current_mesh, logical_to_spec


def along(v, axis: int, ndim: int):
    """A vector shaped to broadcast along ``axis`` of an ``ndim`` array (explicit ranks, so
    ``jax_numpy_rank_promotion='raise'`` holds)."""
    return v.reshape((1,) * axis + v.shape + (1,) * (ndim - axis - 1))


def _normal(rngs: nnx.Rngs, shape, std: float, dtype):
    return std * jax.random.normal(rngs.params(), shape, dtype)


class Layout(enum.Enum):
    """Where a forward keeps the features of its activations.

    ``BATCH_MAJOR`` ([B, T, D]) serves every forward. ``FEATURE_MAJOR`` ([D, B]: one token
    per row, no token axis) is for the sampler's decode step on CPU: there a projection of a
    few dozen rows stored batch-major is ``x @ W.T`` for a weight kept in its checkpoint
    layout [out, in], a product with a transposed operand that XLA:CPU runs slowly; stored
    feature-major it is ``W @ x``, and the logits come out vocabulary-major [V, B] (on
    bench-tiny at 32 rows this cut the projections, norms and LM head of a step from 5.1 to
    3.9 ms). The math is the same in both: attention, q/k norms and rotary run on heads
    [B, T, N, H] either way; only projections, norms over features and residuals see the
    layout.
    """

    BATCH_MAJOR = "batch_major"
    FEATURE_MAJOR = "feature_major"

    @property
    def feature_axis(self) -> int:
        return -1 if self is Layout.BATCH_MAJOR else 0

    def heads(self, x, num: int, head_dim: int):
        """Projected activations of this layout as heads [B, T, num, head_dim]."""
        if self is Layout.BATCH_MAJOR:
            return x.reshape(*x.shape[:-1], num, head_dim)
        # Split the heads before moving the rows first: a transpose right after the
        # projection is folded into it by XLA, which then runs it transposed (slowly).
        return jnp.transpose(x.reshape(num, head_dim, -1), (2, 0, 1))[:, None]

    def from_batch_major(self, x_btf):
        """[B, T, F] activations in this layout ([B, 1, F] -> [F, B])."""
        return x_btf if self is Layout.BATCH_MAJOR else x_btf[:, 0, :].T

    def constrain(self, x, logical_axes):
        """``sharding.constrain`` for batch-major activations; a feature-major decode step
        leaves its few small activations to the partitioner."""
        return constrain(x, logical_axes) if self is Layout.BATCH_MAJOR else x


BATCH_MAJOR, FEATURE_MAJOR = Layout.BATCH_MAJOR, Layout.FEATURE_MAJOR


def project(x, w_oi, layout: Layout = BATCH_MAJOR):
    """``x @ w.T`` over the features of ``x`` (``w @ x`` feature-major), for a weight stored
    ``[out, in]``: one plain dot, as remat's dot policies see it.

    On CPU the batch-major weight gradient is computed as ``(x^T dy)^T``. Autodiff's
    ``dy^T x`` makes XLA:CPU write the wide ``dy`` (e.g. [tokens, 4 x hidden] after the
    MLP's activation, or [tokens, vocab] at the LM head) transposed, a strided copy that
    took a fifth of a bench-tiny SFT step; transposing the narrow ``x`` and the small
    product instead is several times cheaper. So there the dot carries only the input's
    gradient and an added term worth zero carries the weight's
    (``_weight_grad_narrow_first``, whose forward XLA drops): the same values and the same
    forward, with no custom gradient around the dot.
    """
    if layout is FEATURE_MAJOR:
        return jnp.einsum("oi,i...->o...", w_oi, x)
    if target_platform() != "cpu":
        return jnp.einsum("...i,oi->...o", x, w_oi)
    y = jnp.einsum("...i,oi->...o", x, jax.lax.stop_gradient(w_oi))
    return y + _weight_grad_narrow_first(jax.lax.stop_gradient(x), w_oi)


@jax.custom_vjp
def _weight_grad_narrow_first(x_bi, w_oi):
    """Zeros shaped like ``x @ w.T`` whose gradient for ``w`` is ``(x^T dy)^T``."""
    return jnp.zeros((*x_bi.shape[:-1], w_oi.shape[0]), x_bi.dtype)


def _weight_grad_fwd(x_bi, w_oi):
    return _weight_grad_narrow_first(x_bi, w_oi), (x_bi, w_oi)


def _weight_grad_bwd(residuals, dy_bo):
    x_bi, w_oi = residuals
    x_ni = x_bi.reshape(-1, x_bi.shape[-1])
    dy_no = dy_bo.reshape(-1, dy_bo.shape[-1])
    dw_io = jax.lax.dot_general(x_ni, dy_no, (((0,), (0,)), ((), ())))
    return None, dw_io.T.astype(w_oi.dtype)  # x's gradient comes from the dot


_weight_grad_narrow_first.defvjp(_weight_grad_fwd, _weight_grad_bwd)


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
        self.lora = None  # a low-rank adapter (jaxpt.models.lora.add_adapters)

    def __call__(self, x, layout: Layout = BATCH_MAJOR):
        """Project ``x`` ([..., in] batch-major, [in, ...] feature-major)."""
        y = project(x.astype(self.dtype), self.weight[...].astype(self.dtype), layout)
        if self.lora is not None:
            y = y + self.lora(x, self.dtype, layout)
        if self.bias is not None:
            y = y + along(self.bias[...].astype(self.dtype), layout.feature_axis % y.ndim, y.ndim)
        return y


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32, as transformers does, then cast back.

    With ``offset`` (Gemma's 1) it scales by ``offset + w`` in float32 before the cast, as
    transformers' Gemma RMSNorm does, and ``w`` starts at zero; without, by ``w`` after it.
    """

    def __init__(self, dim, *, eps, axes=("norm",), dtype, param_dtype, offset: float = 0.0):
        self.weight = nnx.Param(jnp.full((dim,), 1.0 - offset, param_dtype), logical_axes=axes)
        self.eps = eps
        self.dtype = dtype
        self.offset = offset

    def __call__(self, x, axis: int = -1):
        """Normalize over ``axis`` (the features: ``layout.feature_axis``)."""
        axis = axis % x.ndim
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=axis, keepdims=True) + self.eps)
        if self.offset:
            scale = self.offset + self.weight[...].astype(jnp.float32)
            return (along(scale, axis, x.ndim) * x32).astype(self.dtype)
        return along(self.weight[...].astype(self.dtype), axis, x.ndim) * x32.astype(self.dtype)


def rotary_cos_sin(positions_bt, inv_freq_f):
    """cos and sin tables [B, T, head_dim] in float32 for the given positions."""
    angles_btf = positions_bt.astype(jnp.float32)[:, :, None] * inv_freq_f[None, None, :]
    angles_bth = jnp.concatenate([angles_btf, angles_btf], axis=-1)
    return jnp.cos(angles_bth), jnp.sin(angles_bth)


def rotate_half(x):
    """``[-x2, x1]`` of the halves ``[x1, x2]`` of the last axis (head_dim), transformers'
    layout."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x_btnh, cos_bth, sin_bth):
    """Rotate query/key heads by position (the half-split layout transformers uses)."""
    rotated = rotate_half(x_btnh)
    cos, sin = cos_bth[:, :, None, :], sin_bth[:, :, None, :]
    out = x_btnh.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin
    return out.astype(x_btnh.dtype)


@struct.dataclass
class AttentionMask:
    """The boolean mask [B, 1, T, S] (``dense``) and what fused kernels rebuild it from:
    the segment ids of queries and keys, the sliding window, and whether the keys are the
    queries themselves (cache-free self-attention, where the mask is causal in index order).
    """

    dense: jax.Array
    q_segment_bt: jax.Array
    k_segment_bs: jax.Array
    window: int | None = struct.field(pytree_node=False, default=None)
    self_attention: bool = struct.field(pytree_node=False, default=False)


def _dense(mask):
    return mask.dense if isinstance(mask, AttentionMask) else mask


def window_masks(windows, q_segment_bt, q_slot_t, q_pos_bt, k_segment_bs, k_slot_s, k_pos_bs):
    """``attention_mask`` for each distinct sliding window in ``windows`` (one per layer;
    None: full attention), keyed by window."""
    return {
        window: attention_mask(
            q_segment_bt, q_slot_t, q_pos_bt, k_segment_bs, k_slot_s, k_pos_bs, window
        )
        for window in dict.fromkeys(windows)
    }


def attention_mask(q_segment_bt, q_slot_t, q_pos_bt, k_segment_bs, k_slot_s, k_pos_bs, window):
    """An ``AttentionMask`` whose ``dense`` [B, 1, T, S] is: causal in slot order, same
    document, key not padding.

    Slots are indices into the key sequence (the KV cache during decoding); positions are
    the rotary positions, used for sliding-window attention. Passing the query arrays as
    the key arrays (the same objects) marks cache-free self-attention.
    """
    same_doc = q_segment_bt[:, :, None] == k_segment_bs[:, None, :]
    mask = same_doc & (k_segment_bs[:, None, :] != 0)
    mask = mask & (k_slot_s[None, None, :] <= q_slot_t[None, :, None])
    if window is not None:
        mask = mask & (q_pos_bt[:, :, None] - k_pos_bs[:, None, :] < window)
    self_attention = k_segment_bs is q_segment_bt and k_slot_s is q_slot_t
    return AttentionMask(mask[:, None, :, :], q_segment_bt, k_segment_bs, window, self_attention)


DECODE_BLOCK = 128  # cache slots per block of length-aware decode attention


def decode_attention(q_b1nh, k_bkhs, v_bksh, mask_b11s, filled=None, *, scale=None,
                     softcap=None):
    """One query per row against a KV cache stored kv-head major: keys [B, K, H, S],
    values [B, K, S, H].

    In that layout both products are plain (not transposed) matmuls batched over (B, K)
    that read the cache in place: with [B, S, K, H] XLA CPU copies the whole cache every
    step first, and with keys [B, K, S, H] the scores are a transposed product that runs
    about 4x slower. With
    ``filled`` (traced: the number of slots written so far, a prefix of the cache), only
    the blocks of ``DECODE_BLOCK`` slots holding them are read, with an online softmax, so
    a step costs what the text so far costs, not the whole cache bucket. Skipped slots are
    masked ones, whose weight is exactly 0 either way. ``scale`` multiplies the scores
    (None: head_dim**-0.5) and ``softcap`` caps them (``paged.soft_cap``).
    """
    b, _, n, h = q_b1nh.shape
    k, s = k_bkhs.shape[1], k_bkhs.shape[3]
    q_bkgh = q_b1nh.reshape(b, k, n // k, h).astype(jnp.float32) * (
        h**-0.5 if scale is None else scale
    )
    mask_bs = _dense(mask_b11s)[:, 0, 0, :]
    lowest = jnp.finfo(jnp.float32).min
    if filled is None or s < 2 * DECODE_BLOCK or s % DECODE_BLOCK:
        scores_bkgs = jnp.einsum("bkgh,bkhs->bkgs", q_bkgh, k_bkhs.astype(jnp.float32))
        scores_bkgs = paged.soft_cap(scores_bkgs, softcap)
        scores_bkgs = jnp.where(mask_bs[:, None, None, :], scores_bkgs, lowest)
        probs_bkgs = jax.nn.softmax(scores_bkgs, axis=-1)
        out_bkgh = jnp.einsum("bkgs,bksh->bkgh", probs_bkgs, v_bksh.astype(jnp.float32))
        return out_bkgh.reshape(b, 1, n, h).astype(q_b1nh.dtype)

    def block(j, carry):
        start = j * DECODE_BLOCK
        k_blk = jax.lax.dynamic_slice_in_dim(k_bkhs, start, DECODE_BLOCK, axis=3)
        v_blk = jax.lax.dynamic_slice_in_dim(v_bksh, start, DECODE_BLOCK, axis=2)
        keep_b11c = jax.lax.dynamic_slice_in_dim(mask_bs, start, DECODE_BLOCK, axis=1)[
            :, None, None, :
        ]
        return paged.online_softmax_block(carry, q_bkgh, k_blk.astype(jnp.float32),
                                          v_blk.astype(jnp.float32), keep_b11c, softcap)

    blocks = jnp.minimum((filled + DECODE_BLOCK - 1) // DECODE_BLOCK, s // DECODE_BLOCK)
    init = (
        jnp.full(q_bkgh.shape[:3], lowest),
        jnp.zeros(q_bkgh.shape[:3], jnp.float32),
        jnp.zeros(q_bkgh.shape, jnp.float32),
    )
    _, total_bkg, acc_bkgh = jax.lax.fori_loop(0, blocks, block, init)
    out_bkgh = acc_bkgh / total_bkg[..., None]
    return out_bkgh.reshape(b, 1, n, h).astype(q_b1nh.dtype)


def grouped_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, *, scale=None, softcap=None):
    """Grouped-query attention as two einsums and a float32 softmax; ``scale`` multiplies
    the scores (None: head_dim**-0.5), ``softcap`` caps them (``paged.soft_cap``).

    Numerically the same as ``jax.nn.dot_product_attention``'s XLA path, but several
    times faster on CPU, where that path materializes the repeated kv heads and a
    broadcast mask; the query heads are grouped onto their kv head instead. Its backward
    recomputes the probabilities (``_attention_core``) rather than keeping [B, H, T, S]
    tensors per layer.
    """
    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h)
    mask_b11ts = _dense(mask_b1ts)[:, :, None, :, :]
    scale = h**-0.5 if scale is None else scale
    out_btkgh = _attention_core(q_btkgh, k_bskh, v_bskh, mask_b11ts, scale, softcap)
    return out_btkgh.reshape(b, t, n, h)


def _masked_scores(q_btkgh, k_bskh, mask_b11ts, scale, softcap):
    """The masked scores [B, K, G, T, S] and, soft-capped, the cap's tanh (its gradient)."""
    scores_bkgts = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh).astype(jnp.float32)
    scores_bkgts = scores_bkgts * scale
    tanh_bkgts = None
    if softcap is not None:
        tanh_bkgts = jnp.tanh(scores_bkgts / softcap)
        scores_bkgts = tanh_bkgts * softcap
    return jnp.where(mask_b11ts, scores_bkgts, jnp.finfo(jnp.float32).min), tanh_bkgts


def _probabilities(q_btkgh, k_bskh, mask_b11ts, max_bkgt1, total_bkgt1, scale, softcap):
    # jax.nn.softmax's own arithmetic, so forward and backward see the same probabilities.
    scores_bkgts, tanh_bkgts = _masked_scores(q_btkgh, k_bskh, mask_b11ts, scale, softcap)
    return jnp.exp(scores_bkgts - max_bkgt1) / total_bkgt1, tanh_bkgts


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attention_core(q_btkgh, k_bskh, v_bskh, mask_b11ts, scale, softcap):
    """Masked softmax attention of query groups [B, T, K, G, H] on their kv head."""
    return _attention_fwd(q_btkgh, k_bskh, v_bskh, mask_b11ts, scale, softcap)[0]


def _attention_fwd(q_btkgh, k_bskh, v_bskh, mask_b11ts, scale, softcap):
    # Like flash attention's backward, keep the inputs and each row's softmax statistics
    # ([B, K, G, T, 1], the max and the sum of exponentials: a fully masked row's
    # uniform weights come back exactly), not the probabilities.
    scores_bkgts, _ = _masked_scores(q_btkgh, k_bskh, mask_b11ts, scale, softcap)
    max_bkgt1 = jax.lax.stop_gradient(jnp.max(scores_bkgts, axis=-1, keepdims=True))
    exp_bkgts = jnp.exp(scores_bkgts - max_bkgt1)
    total_bkgt1 = jnp.sum(exp_bkgts, axis=-1, keepdims=True)
    probs_bkgts = (exp_bkgts / total_bkgt1).astype(v_bskh.dtype)
    out_btkgh = jnp.einsum("bkgts,bskh->btkgh", probs_bkgts, v_bskh)
    return out_btkgh, (q_btkgh, k_bskh, v_bskh, mask_b11ts, max_bkgt1, total_bkgt1)


def _attention_bwd(scale, softcap, residuals, dout_btkgh):
    q_btkgh, k_bskh, v_bskh, mask_b11ts, max_bkgt1, total_bkgt1 = residuals
    probs_bkgts, tanh_bkgts = _probabilities(
        q_btkgh, k_bskh, mask_b11ts, max_bkgt1, total_bkgt1, scale, softcap
    )
    dv_bskh = jnp.einsum("bkgts,btkgh->bskh", probs_bkgts.astype(v_bskh.dtype), dout_btkgh)
    dprobs_bkgts = jnp.einsum("btkgh,bskh->bkgts", dout_btkgh, v_bskh).astype(jnp.float32)
    # softmax's backward; masked scores (a constant where the mask is off) get none.
    dscores_bkgts = probs_bkgts * (
        dprobs_bkgts - jnp.sum(probs_bkgts * dprobs_bkgts, axis=-1, keepdims=True)
    )
    dscores_bkgts = jnp.where(mask_b11ts, dscores_bkgts, 0.0)
    if softcap is not None:  # d(tanh(s / cap) * cap) / ds
        dscores_bkgts = dscores_bkgts * (1.0 - tanh_bkgts * tanh_bkgts)
    dscores_bkgts = dscores_bkgts * scale
    dscores_bkgts = dscores_bkgts.astype(q_btkgh.dtype)
    dq_btkgh = jnp.einsum("bkgts,bskh->btkgh", dscores_bkgts, k_bskh)
    dk_bskh = jnp.einsum("bkgts,btkgh->bskh", dscores_bkgts, q_btkgh)
    return dq_btkgh, dk_bskh, dv_bskh, None


_attention_core.defvjp(_attention_fwd, _attention_bwd)


ATTENTION_IMPLEMENTATIONS = ("auto", "einsum", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # splash's default block: sequence lengths must be multiples of it


def _cudnn_fits(q_btnh) -> bool:
    # cuDNN's fused attention: half precision, head_dim a multiple of 8 up to 128.
    h = q_btnh.shape[-1]
    return q_btnh.dtype in (jnp.bfloat16, jnp.float16) and h % 8 == 0 and h <= 128


def _splash_fits(q_btnh, k_bskh, mask) -> bool:
    t, s = q_btnh.shape[1], k_bskh.shape[1]
    return (
        isinstance(mask, AttentionMask) and mask.self_attention and t == s
        and t % SPLASH_BLOCK == 0
    )


def resolve_attention(implementation, q_btnh, k_bskh, mask, softcap=None) -> str:
    """The implementation ``attend`` runs: ``auto`` (or None) is cuDNN on GPU when the
    shapes and dtype allow, splash on TPU for cache-free self-attention over multiples of
    128 tokens, XLA otherwise, and the einsum path on CPU. Soft-capped scores
    (``softcap``) rule out XLA and cuDNN, which cannot cap: einsum takes their place."""
    if implementation not in (None, *ATTENTION_IMPLEMENTATIONS):
        raise ValueError(
            f"unknown attention implementation {implementation!r}; choose from "
            f"{ATTENTION_IMPLEMENTATIONS}"
        )
    if implementation not in (None, "auto"):
        if softcap is not None and implementation in ("xla", "cudnn"):
            raise ValueError(
                f"attention implementation {implementation!r} cannot soft-cap attention "
                "logits (this model's attn_logit_softcap); use auto, einsum or splash"
            )
        return implementation
    backend = target_platform()
    if backend == "cpu":
        return "einsum"
    if softcap is not None:
        return "splash" if backend == "tpu" and _splash_fits(q_btnh, k_bskh, mask) else "einsum"
    if backend == "gpu" and _cudnn_fits(q_btnh):
        return "cudnn"
    if backend == "tpu" and _splash_fits(q_btnh, k_bskh, mask):
        return "splash"
    return "xla"


def attend(q_btnh, k_bskh, v_bskh, mask_b1ts, implementation=None, *, scale=None,
           softcap=None):
    """Dispatch attention (see ``resolve_attention``). ``mask_b1ts`` is an
    ``AttentionMask`` or a boolean [B, 1, T, S] array (splash needs the former); ``scale``
    multiplies the scores (None: head_dim**-0.5), ``softcap`` caps them (``paged.soft_cap``)."""
    implementation = resolve_attention(implementation, q_btnh, k_bskh, mask_b1ts, softcap)
    if implementation == "einsum":
        return grouped_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, scale=scale, softcap=softcap)
    if implementation == "splash":
        return splash_attention(q_btnh, k_bskh, v_bskh, mask_b1ts, scale=scale, softcap=softcap)
    causal = isinstance(mask_b1ts, AttentionMask) and mask_b1ts.self_attention
    # The dense mask already holds causality; is_causal lets cuDNN skip masked blocks.
    return jax.nn.dot_product_attention(
        q_btnh, k_bskh, v_bskh, mask=_dense(mask_b1ts),
        is_causal=causal and implementation == "cudnn", implementation=implementation,
        scale=scale,
    )


@functools.lru_cache(maxsize=64)
def _splash_kernel(t: int, group: int, window: int | None, interpret: bool,
                   softcap: float | None = None):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    if window is None:
        head_mask = splash.CausalMask((t, t))
    else:  # keys at most window - 1 slots back (slots = positions within a document)
        head_mask = splash.LocalMask((t, t), (window - 1, 0), offset=0)
    return splash.make_splash_mqa_single_device(
        splash.MultiHeadMask([head_mask] * group), interpret=interpret,
        attn_logits_soft_cap=softcap,
    )


def _splash_local(q_btnh, k_bskh, v_bskh, q_segment_bt, k_segment_bs, *, window, interpret,
                  scale=None, softcap=None):
    """Splash on one device's rows and heads: each kv head with its query group (MQA)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    b, t, n, h = q_btnh.shape
    kv = k_bskh.shape[2]
    kernel = _splash_kernel(t, n // kv, window, interpret, softcap)
    # [B, K, G, T, H] queries against [B, K, S, H] keys; splash does not scale queries.
    q_bkgth = (q_btnh * (h**-0.5 if scale is None else scale)).reshape(b, t, kv, n // kv, h).transpose(0, 2, 3, 1, 4)
    k_bksh, v_bksh = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)

    def one_row(q_kgth, k_ksh, v_ksh, q_seg_t, k_seg_s):
        segments = SegmentIds(q=q_seg_t, kv=k_seg_s)
        return jax.vmap(lambda q, k, v: kernel(q, k, v, segment_ids=segments))(
            q_kgth, k_ksh, v_ksh
        )

    out_bkgth = jax.vmap(one_row)(q_bkgth, k_bksh, v_bksh, q_segment_bt, k_segment_bs)
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_btnh.dtype)


def splash_attention(q_btnh, k_bskh, v_bskh, mask: AttentionMask, interpret: bool = False,
                     *, scale=None, softcap=None):
    """TPU splash attention (Pallas) with segment ids: causal (or sliding-window) in index
    order within each document, padding (segment 0) never attended from real tokens.

    Under a mesh it runs per shard (``shard_map``) over the rows' batch axes and the
    heads' axis; ``interpret`` runs the kernel's reference interpreter (any backend).
    """
    if not _splash_fits(q_btnh, k_bskh, mask):
        raise ValueError(
            "splash attention needs cache-free self-attention over a multiple of "
            f"{SPLASH_BLOCK} tokens (got queries {q_btnh.shape}, keys {k_bskh.shape})"
        )
    local = functools.partial(_splash_local, window=mask.window, interpret=interpret,
                              scale=scale, softcap=softcap)
    args = (q_btnh, k_bskh, v_bskh, mask.q_segment_bt, mask.k_segment_bs)
    mesh = current_mesh()
    if mesh is None:
        return local(*args)
    q_spec = logical_to_spec(("batch", None, "heads", None), q_btnh.shape, mesh)
    k_spec = logical_to_spec(("batch", None, "kv_heads", None), k_bskh.shape, mesh)
    if q_spec[2] != k_spec[2]:  # query groups must stay with their kv head
        q_spec = PartitionSpec(q_spec[0], None, None, None)
        k_spec = PartitionSpec(k_spec[0], None, None, None)
    seg_spec = PartitionSpec(q_spec[0], None)
    return jax.shard_map(
        local, in_specs=(q_spec, k_spec, k_spec, seg_spec, seg_spec), out_specs=q_spec,
        check_vma=False,
    )(*args)


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
                "offset": c.norm_offset,
            }
            self.q_norm = RMSNorm(h, **norm)
            self.k_norm = RMSNorm(h, **norm)
        else:
            self.q_norm = self.k_norm = None
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        self.implementation = implementation
        # None: head_dim**-0.5, computed where the scores are (today's families unchanged).
        scalar = c.query_pre_attn_scalar
        self.scale = None if scalar is None else scalar**-0.5
        self.softcap = c.attn_logit_softcap

    def __call__(
        self, x, cos_bth, sin_bth, mask_b1ts, kv_cache=None, cache_index=None,
        layout: Layout = BATCH_MAJOR,
    ):
        """Attend; with ``kv_cache=(k_bkhs, v_bksh)`` the new keys/values are written at
        ``cache_index`` and attention runs over the cache. ``x`` and the output are in
        ``layout`` (feature-major: one token per row, through a cache). Returns (out, new
        kv)."""
        q = layout.heads(self.q_proj(x, layout), self.num_heads, self.head_dim)
        k = layout.heads(self.k_proj(x, layout), self.num_kv_heads, self.head_dim)
        v = layout.heads(self.v_proj(x, layout), self.num_kv_heads, self.head_dim)
        b, t = q.shape[:2]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = layout.constrain(apply_rotary(q, cos_bth, sin_bth), ("batch", "seq", "heads", None))
        k = layout.constrain(apply_rotary(k, cos_bth, sin_bth), ("batch", "seq", "kv_heads", None))
        v = layout.constrain(v, ("batch", "seq", "kv_heads", None))
        scores = {"scale": self.scale, "softcap": self.softcap}
        if kv_cache is None:
            out = attend(q, k, v, mask_b1ts, self.implementation, **scores)
        elif isinstance(kv_cache, paged.LayerPages):  # a paged pool: see jaxpt.models.paged
            kv_cache = paged.write(kv_cache, k, v, mask_b1ts)
            out = paged.attend(q, kv_cache, mask_b1ts, **scores)
        else:  # keys [B, K, H, S], values [B, K, S, H]: see decode_attention
            k_cache, v_cache = kv_cache
            k_bkhs = jax.lax.dynamic_update_slice(
                k_cache, jnp.transpose(k, (0, 2, 3, 1)).astype(k_cache.dtype),
                (0, 0, 0, cache_index),
            )
            v_bksh = jax.lax.dynamic_update_slice(
                v_cache, jnp.swapaxes(v, 1, 2).astype(v_cache.dtype), (0, 0, cache_index, 0)
            )
            kv_cache = (k_bkhs, v_bksh)
            # Feature-major is a CPU decode step, where decode_attention is the kernel.
            if t == 1 and (self.implementation in (None, "auto") or layout is FEATURE_MAJOR):
                out = decode_attention(
                    q, k_bkhs, v_bksh, mask_b1ts, filled=cache_index + 1, **scores
                )
            else:
                k_all = jnp.transpose(k_bkhs, (0, 3, 1, 2)).astype(q.dtype)
                v_all = jnp.swapaxes(v_bksh, 1, 2).astype(q.dtype)
                out = attend(q, k_all, v_all, mask_b1ts, self.implementation, **scores)
        out = layout.from_batch_major(out.reshape(b, t, self.num_heads * self.head_dim))
        return self.o_proj(out, layout), kv_cache


class MLP(nnx.Module):
    """Gated MLP: ``down(act(gate(x)) * up(x))``, ``act`` named by the config's
    ``hidden_act`` (see ``ACTIVATIONS``; SwiGLU by default)."""

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
        self.hidden_act = getattr(config, "hidden_act", "silu")
        gated_activation(self.hidden_act)  # an unknown name fails when the model is built

    def __call__(self, x, layout: Layout = BATCH_MAJOR):
        h = gated_activation(self.hidden_act)(self.gate_proj(x, layout), self.up_proj(x, layout))
        return self.down_proj(layout.constrain(h, ("batch", "seq", "mlp")), layout)


@jax.custom_vjp
def swiglu(gate, up):
    """``silu(gate) * up`` whose backward keeps only ``gate`` and ``up`` (autodiff keeps
    four more tensors of their size: the sigmoid, silu, and their products)."""
    return jax.nn.silu(gate) * up


def _swiglu_fwd(gate, up):
    return swiglu(gate, up), (gate, up)


def _swiglu_bwd(residuals, dh):
    gate, up = residuals
    g32, u32, dh32 = (x.astype(jnp.float32) for x in (gate, up, dh))
    s32 = jax.nn.sigmoid(g32)
    dgate = dh32 * u32 * s32 * (1.0 + g32 * (1.0 - s32))
    dup = dh32 * g32 * s32
    return dgate.astype(gate.dtype), dup.astype(up.dtype)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)


def gated(act: Callable) -> Callable:
    """The MLP's gate of an elementwise activation: ``(gate, up) -> act(gate) * up``."""

    def gated_act(gate, up):
        return act(gate) * up

    return gated_act


# The MLP's gated activation by transformers' ``hidden_act`` name (its ACT2FN).
ACTIVATIONS: dict[str, Callable] = {
    "silu": swiglu,
    "swish": swiglu,
    "gelu": gated(functools.partial(jax.nn.gelu, approximate=False)),  # erf, torch's default
    "gelu_pytorch_tanh": gated(functools.partial(jax.nn.gelu, approximate=True)),
}


def register_activation(name: str, act: Callable) -> None:
    """Make ``hidden_act: name`` build MLPs computing ``act(gate) * up`` (``act``
    elementwise). For a hand-written gradient put ``(gate, up) -> hidden`` in
    ``ACTIVATIONS`` directly, as ``swiglu`` is."""
    ACTIVATIONS[name] = gated(act)


def gated_activation(name: str) -> Callable:
    """The gated activation ``(gate, up) -> hidden`` registered as ``name``."""
    if name not in ACTIVATIONS:
        raise ValueError(
            f"unknown hidden_act {name!r}; known: {sorted(ACTIVATIONS)} "
            "(add one with jaxpt.models.layers.register_activation)"
        )
    return ACTIVATIONS[name]
