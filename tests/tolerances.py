"""Comparisons whose tolerances follow from what float rounding can do, so that they hold on
any CPU (other XLA codegen and thread counts, 1 vs 8 devices reducing in other orders)."""

import jax
import numpy as np


def assert_params_close_after_adam(a, b, *, lr: float, steps: int, atol: float = 1e-5,
                                   max_fraction: float = 1e-3):
    """Params after ``steps`` Adam(W) steps of size <= ``lr``, computed two ways that differ
    only in float rounding (e.g. 8 devices vs 1), agree.

    Adam divides each gradient coordinate by its own running magnitude, so where a coordinate
    is nearly zero (or its moments nearly cancel), rounding noise decides a move of up to
    ``lr`` per step: a single coordinate may differ by up to ``2 * lr * steps`` (Adam's bias-
    corrected step is at most ~``lr`` early in training). A real bug (a wrong shard, a missing
    all-reduce) moves whole shards, so all but ``max_fraction`` of the coordinates must still
    agree to ``atol``. Measured on x86: 0-2 of ~23k coordinates beyond 1e-5, the 99.9th
    percentile ~5e-7.
    """
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    diff = np.concatenate([
        np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)).ravel()
        for x, y in zip(leaves_a, leaves_b, strict=True)
    ])
    bound = 2 * lr * steps
    assert diff.max() <= bound, f"max |diff| {diff.max():.3g} > 2 * lr * steps = {bound:.3g}"
    far = int((diff > atol).sum())
    assert far <= max_fraction * diff.size, (
        f"{far} of {diff.size} coordinates differ by more than {atol} (max {diff.max():.3g})"
    )


def assert_close_to_leaf_scale(actual, expected, rtol: float = 1e-5):
    """Each leaf of ``actual`` is within ``rtol`` x the largest entry of that leaf of
    ``expected``: the rounding of a sum (a gradient, a matmul) is relative to its largest
    terms, so an entry much smaller than its leaf carries the leaf's absolute noise, not a
    noise relative to itself. (A flat atol fails for large leaves, a flat rtol for small
    entries: the tied embedding's gradient, ~0.4 at most, differs by ~1e-7 between packed
    and unpacked batches.)"""
    leaves_a, leaves_e = jax.tree.leaves(actual), jax.tree.leaves(expected)
    assert len(leaves_a) == len(leaves_e)
    for a, e in zip(leaves_a, leaves_e, strict=True):
        a, e = np.asarray(a, np.float64), np.asarray(e, np.float64)
        np.testing.assert_allclose(a, e, rtol=0, atol=rtol * float(np.abs(e).max()))
