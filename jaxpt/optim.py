"""The optimizer: AdamW with warmup + cosine/linear/constant decay and global-norm clipping."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def make_schedule(cfg, max_steps: int) -> optax.Schedule:
    """Linear warmup from 0 to ``cfg.lr`` over ``warmup_steps``, then decay to
    ``lr * min_lr_ratio`` at ``max_steps`` (cosine or linear), or stay constant."""
    warmup = min(cfg.warmup_steps, max_steps)
    decay_steps = max(max_steps - warmup, 1)
    end = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.schedule == "linear":
        decay = optax.linear_schedule(cfg.lr, end, decay_steps)
    elif cfg.schedule == "constant":
        decay = optax.constant_schedule(cfg.lr)
    else:
        raise ValueError(f"unknown schedule {cfg.schedule!r}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decay_mask(params):
    """Weight decay on matrices only (not norms or biases), as transformers' Trainer does."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg, max_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """(tx, schedule) from the ``optim`` config section."""
    schedule = make_schedule(cfg, max_steps)
    adamw = optax.adamw(
        schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    if cfg.max_grad_norm > 0:
        return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), adamw), schedule
    return adamw, schedule


def scale_updates(factors) -> optax.GradientTransformation:
    """Multiply each parameter's update by its factor (a tree like the params): a learning
    rate per parameter group on top of one schedule. Stateless."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, f: u * jnp.asarray(f, u.dtype), updates, factors), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
