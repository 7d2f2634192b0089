"""Process reward losses: a token classifier's step labels (good / bad) and where a
solution's first bad step is.

Two readings of "the reply is right up to the end of step i" from the classifier's
two-class logits (class 1: right):

    step_end       the class-1 probability at the step's last token (what TRL's PRM trainer
                   and the published PRMs read)
    token_product  the product of every reply token's class-1 probability up to that token:
                   the reply so far is right exactly when each of its tokens is, so a step is
                   only as good as its worst token and, once a token is wrong, every later
                   step is too. Each token then judges one thing (is this token right, given
                   a right prefix), which a shallow model can learn where a single judgement
                   at the step's end must redo the whole step's work.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

READINGS = ("step_end", "token_product")
# How a reply's step probabilities become one reward: the weakest, their product, the last.
AGGREGATES = ("min", "prod", "last")


def step_log_probs(logits_btl, response_bt=None, reading: str = "step_end"):
    """[B, T] log-probability that the reply is right up to each position (see the module
    docstring); ``response_bt`` (1 on the reply's tokens) is needed by ``token_product``."""
    if reading not in READINGS:
        raise ValueError(f"reading must be one of {READINGS}, got {reading!r}")
    logp_bt = jax.nn.log_softmax(logits_btl.astype(jnp.float32), axis=-1)[..., 1]
    if reading == "token_product":
        logp_bt = jnp.cumsum(logp_bt * response_bt.astype(jnp.float32), axis=1)
    return logp_bt


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (Maechler 2012)."""
    x = jnp.minimum(x, -1e-7)  # x = 0 (certainly right) would be log(0)
    return jnp.where(x > -0.6931472, jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def step_label_loss(logits_btl, labels_bt, response_bt=None, reading: str = "step_end"):
    """Per-position cross-entropy of the step labels ``labels_bt`` (1 good, 0 bad, -1 no
    step ends here) under ``reading`` of two-class logits ``[B, T, 2]``.

    Returns (loss_bt: zero off the labelled positions, mask_bt: the labelled positions,
    p_good_bt: the probability that the reply is right up to each position).
    """
    mask_bt = labels_bt >= 0
    logp_good_bt = step_log_probs(logits_btl, response_bt, reading)
    if reading == "step_end":
        logp_bad_bt = jax.nn.log_softmax(logits_btl.astype(jnp.float32), axis=-1)[..., 0]
    else:
        logp_bad_bt = log1mexp(logp_good_bt)
    nll_bt = -jnp.where(labels_bt == 1, logp_good_bt, logp_bad_bt)
    return jnp.where(mask_bt, nll_bt, 0.0), mask_bt, jnp.exp(logp_good_bt)


def first_bad_step(bad_bt, mask_bt):
    """Per row, the index (counting labelled positions only) of the first bad step, or the
    number of steps when none is bad."""
    step_bt = jnp.cumsum(mask_bt.astype(jnp.int32), axis=1) - 1
    steps_b = jnp.sum(mask_bt.astype(jnp.int32), axis=1)
    return jnp.min(jnp.where(bad_bt & mask_bt, step_bt, steps_b[:, None]), axis=1)
