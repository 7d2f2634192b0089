"""A paged KV cache: keys and values in fixed-size pages of one preallocated pool, each
sequence reading its own pages through a page table.

Sequences of different lengths share the pool without padding every row to the longest,
and a page can belong to several sequences at once (the prompt of a GRPO group, a common
system prompt): the scheduler (``jaxpt.sampling.page_pool``) decides which pages a row
owns; the model only reads and writes through the table. Page 0 is scratch: writes of
padding tokens and of idle rows land there and no real sequence ever reads it.

Two layouts, chosen per backend when the pool is made:

- ``split`` (CPU, and TPU models whose head_dim the kernel cannot tile): keys
  [P, K, H, page] and values [P, K, page, H] per layer, the layouts
  ``layers.decode_attention`` reads with plain matmuls; attention is jnp (the reference
  path).
- ``head_major`` (GPU): keys and values [K, P, page, H] per layer, the layout of the GPU
  Pallas paged attention kernel (``jax.experimental.pallas.ops.gpu.paged_attention``),
  which serves decode steps; prefill chunks and sliding windows take the jnp path.
- ``combined`` (TPU): keys and values interleaved per kv head, [P, page, 2K, H] per layer,
  the layout of the ragged paged attention Pallas kernel
  (``jax.experimental.pallas.ops.tpu.ragged_paged_attention``), which serves prefill
  chunks and decode rows alike.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from jaxpt.models.platform import target_platform
from jaxpt.sharding import current_mesh

SPLIT, COMBINED, HEAD_MAJOR = "split", "combined", "head_major"
LAYOUTS = (SPLIT, COMBINED, HEAD_MAJOR)


KERNEL_LANES = 128  # the TPU kernel tiles head_dim by the vector lanes


def default_layout(platform: str, head_dim: int) -> str:
    """The layout of the platform's kernel: combined where the TPU kernel can run (head_dim
    a multiple of 128), head-major on GPU, else split and its jnp attention."""
    if platform == "tpu" and head_dim % KERNEL_LANES == 0:
        return COMBINED
    return HEAD_MAJOR if platform == "gpu" else SPLIT


@struct.dataclass
class PagedKVCache:
    """Per-layer pages and the page table of the rows of the current call.

    ``pages`` holds one entry per layer: ``(k [P, K, H, page], v [P, K, page, H])`` in the
    split layout, ``kv [P, page, 2K, H]`` in the combined one. ``page_table_bp`` [B,
    pages_per_seq] maps row ``b``'s position ``p`` to page ``page_table_bp[b, p // page]``.
    """

    pages: tuple
    page_table_bp: jax.Array
    page_size: int = struct.field(pytree_node=False)
    layout: str = struct.field(pytree_node=False, default=SPLIT)

    @classmethod
    def init(cls, config, num_pages: int, page_size: int, dtype=jnp.float32,
             layout: str = SPLIT):
        k, h = config.num_kv_heads, config.head_dim
        if layout == SPLIT:
            make = lambda: (jnp.zeros((num_pages, k, h, page_size), dtype),
                            jnp.zeros((num_pages, k, page_size, h), dtype))
        elif layout == COMBINED:
            make = lambda: jnp.zeros((num_pages, page_size, 2 * k, h), dtype)
        elif layout == HEAD_MAJOR:
            make = lambda: (jnp.zeros((k, num_pages, page_size, h), dtype),
                            jnp.zeros((k, num_pages, page_size, h), dtype))
        else:
            raise ValueError(f"unknown paged KV layout {layout!r}; choose from {LAYOUTS}")
        return cls(
            pages=tuple(make() for _ in range(config.num_layers)),
            page_table_bp=jnp.zeros((1, 1), jnp.int32),
            page_size=page_size,
            layout=layout,
        )

    @property
    def num_pages(self) -> int:
        first = self.pages[0]
        if self.layout == HEAD_MAJOR:
            return first[0].shape[1]
        return (first[0] if self.layout == SPLIT else first).shape[0]

    def with_table(self, page_table_bp) -> PagedKVCache:
        return self.replace(page_table_bp=jnp.asarray(page_table_bp, jnp.int32))

    def layer(self, i: int) -> LayerPages:
        return LayerPages(self.pages[i], self.page_table_bp, self.page_size, self.layout)

    def bytes_per_token(self) -> int:
        """KV bytes one token takes over every layer."""
        total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.pages))
        return total // (self.num_pages * self.page_size)


@struct.dataclass
class LayerPages:
    """One layer's pages with the table and geometry a forward reads them through."""

    pages: object
    page_table_bp: jax.Array
    page_size: int = struct.field(pytree_node=False)
    layout: str = struct.field(pytree_node=False, default=SPLIT)


@struct.dataclass
class PagedMask:
    """What paged attention masks with: each query's position (its slot in its sequence)
    and whether it is a real token; keys are the sequence's own positions, causal."""

    positions_bt: jax.Array
    valid_bt: jax.Array
    window: int | None = struct.field(pytree_node=False, default=None)


def _slots(page_table_bp, positions_bt, valid_bt, page_size):
    """(page, offset) [B, T] where each new token is written; padding goes to page 0."""
    page_index = jnp.clip(positions_bt // page_size, 0, page_table_bp.shape[1] - 1)
    page_bt = jnp.take_along_axis(page_table_bp, page_index, axis=1)
    return jnp.where(valid_bt, page_bt, 0), positions_bt % page_size


def write(layer: LayerPages, k_btkh, v_btkh, mask: PagedMask) -> LayerPages:
    """``layer`` with the new keys/values [B, T, K, H] written at their positions."""
    return layer.replace(pages=_write(layer.pages, k_btkh, v_btkh, layer.page_table_bp, mask,
                                      layer.page_size, layer.layout))


def _write(layer_pages, k_btkh, v_btkh, page_table_bp, mask, page_size, layout):
    page_bt, offset_bt = _slots(page_table_bp, mask.positions_bt, mask.valid_bt, page_size)
    if layout == SPLIT:
        k_pages, v_pages = layer_pages
        # Indexing axes 0 and 3 (2 for values) with [B, T] arrays puts them first:
        # the update is [B, T, K, H] in either case.
        k_pages = k_pages.at[page_bt, :, :, offset_bt].set(k_btkh.astype(k_pages.dtype))
        v_pages = v_pages.at[page_bt, :, offset_bt, :].set(v_btkh.astype(v_pages.dtype))
        return k_pages, v_pages
    if layout == HEAD_MAJOR:  # [K, P, page, H]: the update is [K, B, T, H]
        k_pages, v_pages = layer_pages
        k_pages = k_pages.at[:, page_bt, offset_bt].set(
            jnp.transpose(k_btkh, (2, 0, 1, 3)).astype(k_pages.dtype))
        v_pages = v_pages.at[:, page_bt, offset_bt].set(
            jnp.transpose(v_btkh, (2, 0, 1, 3)).astype(v_pages.dtype))
        return k_pages, v_pages
    b, t, k, h = k_btkh.shape
    kv_btch = jnp.stack([k_btkh, v_btkh], axis=3).reshape(b, t, 2 * k, h)
    return layer_pages.at[page_bt, offset_bt].set(kv_btch.astype(layer_pages.dtype))


def _keep(q_pos_bt1, k_pos, window):
    keep = k_pos <= q_pos_bt1
    if window is not None:
        keep = keep & (q_pos_bt1 - k_pos < window)
    return keep


def attend(q_btnh, layer: LayerPages, mask: PagedMask, *, scale=None, softcap=None):
    """Causal attention of each row's queries over its pages (positions up to its own);
    ``scale`` multiplies the scores (None: head_dim**-0.5), ``softcap`` caps them as
    ``tanh(scores / softcap) * softcap`` (Gemma 2)."""
    layer_pages, page_table_bp = layer.pages, layer.page_table_bp
    page_size, layout = layer.page_size, layer.layout
    scores = {"scale": q_btnh.shape[-1] ** -0.5 if scale is None else scale, "softcap": softcap}
    if layout == COMBINED:
        return _attend_combined(q_btnh, layer_pages, page_table_bp, mask, **scores)
    k_pages, v_pages = layer_pages
    if layout == HEAD_MAJOR:
        if q_btnh.shape[1] == 1 and mask.window is None and target_platform() == "gpu":
            return decode_head_major(q_btnh, k_pages, v_pages, page_table_bp, mask, **scores)
        # The jnp path reads split pages: [K, P, page, H] -> [P, K, H, page] / [P, K, page, H].
        k_pages = jnp.transpose(k_pages, (1, 0, 3, 2))
        v_pages = jnp.transpose(v_pages, (1, 0, 2, 3))
    if q_btnh.shape[1] == 1:
        return _decode_split(q_btnh, k_pages, v_pages, page_table_bp, mask, page_size, **scores)
    return _prefill_split(q_btnh, k_pages, v_pages, page_table_bp, mask, page_size, **scores)


def soft_cap(scores, cap: float | None):
    """Attention logit soft-capping (Gemma 2): ``tanh(scores / cap) * cap``; None: none."""
    return scores if cap is None else jnp.tanh(scores / cap) * cap


def online_softmax_block(carry, q_bkgh, k_bkhc, v_bkch, keep_b11c, softcap=None):
    """One block of keys in a flash-style decode: ``carry`` (running max, sum of
    exponentials, weighted values) updated with keys [B, K, H, C] and values [B, K, C, H]
    (float32) where ``keep`` allows, the scores capped by ``softcap``. Masked keys weigh
    exactly 0."""
    max_bkg, total_bkg, acc_bkgh = carry
    lowest = jnp.finfo(jnp.float32).min
    scores = soft_cap(jnp.einsum("bkgh,bkhc->bkgc", q_bkgh, k_bkhc), softcap)
    scores = jnp.where(keep_b11c, scores, lowest)
    new_max_bkg = jnp.maximum(max_bkg, jnp.max(scores, axis=-1))
    rescale_bkg = jnp.exp(max_bkg - new_max_bkg)
    weights = jnp.where(keep_b11c, jnp.exp(scores - new_max_bkg[..., None]), 0.0)
    total_bkg = total_bkg * rescale_bkg + jnp.sum(weights, axis=-1)
    acc_bkgh = acc_bkgh * rescale_bkg[..., None] + jnp.einsum("bkgc,bkch->bkgh", weights, v_bkch)
    return new_max_bkg, total_bkg, acc_bkgh


def _decode_split(q_b1nh, k_pages, v_pages, page_table_bp, mask, page_size, *, scale,
                  softcap):
    """One query per row: an online softmax over the row's pages, one page per step of a
    loop that runs only as far as the longest row (``layers.decode_attention``'s blocks,
    gathered through the table)."""
    b, _, n, h = q_b1nh.shape
    k = k_pages.shape[1]
    q_bkgh = q_b1nh.reshape(b, k, n // k, h).astype(jnp.float32) * scale
    q_pos_b = mask.positions_bt[:, 0]
    lowest = jnp.finfo(jnp.float32).min

    def block(j, carry):
        pages_b = page_table_bp[:, j]
        k_blk = k_pages[pages_b].astype(jnp.float32)  # [B, K, H, page]
        v_blk = v_pages[pages_b].astype(jnp.float32)  # [B, K, page, H]
        k_pos_c = j * page_size + jnp.arange(page_size, dtype=jnp.int32)
        keep_b11c = _keep(q_pos_b[:, None], k_pos_c[None, :], mask.window)[:, None, None, :]
        return online_softmax_block(carry, q_bkgh, k_blk, v_blk, keep_b11c, softcap)

    first = 0
    if mask.window is not None:  # pages wholly before every row's window are skipped
        first = jnp.maximum(jnp.min(q_pos_b) - mask.window + 1, 0) // page_size
    blocks = jnp.minimum(jnp.max(q_pos_b) // page_size + 1, page_table_bp.shape[1])
    init = (
        jnp.full(q_bkgh.shape[:3], lowest),
        jnp.zeros(q_bkgh.shape[:3], jnp.float32),
        jnp.zeros(q_bkgh.shape, jnp.float32),
    )
    _, total_bkg, acc_bkgh = jax.lax.fori_loop(first, blocks, block, init)
    out_bkgh = acc_bkgh / total_bkg[..., None]
    return out_bkgh.reshape(b, 1, n, h).astype(q_b1nh.dtype)


def _prefill_split(q_btnh, k_pages, v_pages, page_table_bp, mask, page_size, *, scale,
                   softcap):
    """A chunk of queries per row against the row's pages, gathered: grouped-query
    attention with a float32 softmax (nothing here is differentiated)."""
    b, t, n, h = q_btnh.shape
    p, kv = page_table_bp.shape[1], k_pages.shape[1]
    k_bjkhc = k_pages[page_table_bp].astype(jnp.float32)  # [B, pages, K, H, page]
    v_bjkch = v_pages[page_table_bp].astype(jnp.float32)  # [B, pages, K, page, H]
    q_btkgh = q_btnh.reshape(b, t, kv, n // kv, h).astype(jnp.float32) * scale
    scores = jnp.einsum("btkgh,bjkhc->bkgtjc", q_btkgh, k_bjkhc).reshape(
        b, kv, n // kv, t, p * page_size
    )
    scores = soft_cap(scores, softcap)
    k_pos_s = jnp.arange(p * page_size, dtype=jnp.int32)
    keep_b11ts = _keep(mask.positions_bt[:, :, None], k_pos_s[None, None, :], mask.window)
    scores = jnp.where(keep_b11ts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).reshape(b, kv, n // kv, t, p, page_size)
    out_btkgh = jnp.einsum("bkgtjc,bjkch->btkgh", probs, v_bjkch)
    return out_btkgh.reshape(b, t, n, h).astype(q_btnh.dtype)


def decode_head_major(q_b1nh, k_pages, v_pages, page_table_bp, mask, interpret=False, *,
                      scale=None, softcap=None):
    """One query per row through the GPU Pallas paged attention kernel
    (``jax.experimental.pallas.ops.gpu.paged_attention``), which reads head-major pages
    [K, P, page, H] up to each row's length; ``interpret`` runs it anywhere (tests)."""
    from jax.experimental.pallas.ops.gpu.paged_attention import paged_attention

    h = q_b1nh.shape[-1]
    width = page_table_bp.shape[1]
    lengths_b = (mask.positions_bt[:, 0] + 1).astype(jnp.int32)
    scale = h**-0.5 if scale is None else scale
    q_bnh = (q_b1nh[:, 0] * scale).astype(k_pages.dtype)  # the kernel does not scale
    splits = min(16, width & -width)  # a power of two dividing the table's width
    call = functools.partial(paged_attention, k_splits=splits,
                             pages_per_compute_block=min(8, width // splits),
                             attn_logits_soft_cap=softcap, interpret=interpret)
    args = (q_bnh, k_pages, v_pages, page_table_bp, lengths_b)
    mesh = current_mesh()
    if mesh is not None and not interpret:  # a Triton kernel runs per device
        out = jax.shard_map(call, in_specs=(PartitionSpec(),) * len(args),
                            out_specs=PartitionSpec(), check_vma=False)(*args)
    else:
        out = call(*args)
    return out[:, None].astype(q_b1nh.dtype)


def _attend_combined(q_btnh, kv_pages, page_table_bp, mask, *, scale, softcap):
    """The ragged paged attention kernel's contract: rows of ``T`` queries flattened into
    one token axis, each row's kv length ending at its last query (padding queries at a
    row's end see keys past the real ones; their outputs are dropped)."""
    from jax.experimental.pallas.ops.tpu.ragged_paged_attention import kernel as rpa

    b, t, n, h = q_btnh.shape
    kv_lens_b = (mask.positions_bt[:, -1] + 1).astype(jnp.int32)
    cu_q_lens = jnp.arange(b + 1, dtype=jnp.int32) * t
    num_seqs = jnp.full((1,), b, jnp.int32)
    q_nh = q_btnh.reshape(b * t, n, h)
    # Off TPU (tests, or a pool laid out for TPU read elsewhere) the kernel's own
    # reference, which loops in Python: eager calls only.
    on_tpu = target_platform() == "tpu"
    fn = rpa.ragged_paged_attention if on_tpu else rpa.ref_ragged_paged_attention
    kwargs = {}
    if on_tpu:  # block sizes given, not looked up for the local chip (AOT compiles)
        kwargs = {"num_kv_pages_per_block": min(page_table_bp.shape[1], 8),
                  "num_queries_per_block": min(b * t, 32)}
    call = functools.partial(fn, sm_scale=scale, sliding_window=mask.window, soft_cap=softcap,
                             **kwargs)
    args = (q_nh, kv_pages, kv_lens_b, page_table_bp, cu_q_lens, num_seqs)
    mesh = current_mesh()
    if on_tpu and mesh is not None:  # a Mosaic kernel runs per device: the pool is replicated
        out = jax.shard_map(call, in_specs=(PartitionSpec(),) * len(args),
                            out_specs=PartitionSpec(), check_vma=False)(*args)
    else:
        out = call(*args)
    return out.reshape(b, t, n, h).astype(q_btnh.dtype)
