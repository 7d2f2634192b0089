"""Distillation divergences between a student's and a teacher's next-token distributions,
and the per-token reward form of on-policy distillation.

``generalized_jsd`` is GKD's divergence (Agarwal et al. 2024) per position, summed over the
vocabulary: ``beta`` 0 is the forward KL(teacher || student) of classic logit
distillation, 1 the reverse KL(student || teacher) of on-policy distillation, and between
them ``beta KL(teacher || m) + (1 - beta) KL(student || m)`` against the mixture
``m = beta teacher + (1 - beta) student`` (TRL's convention; 0.5 is the symmetric JSD).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _kl(target_logp, other_logp):
    """KL(target || other) over the last axis, from log-probabilities."""
    return jnp.sum(jnp.exp(target_logp) * (target_logp - other_logp), axis=-1)


def generalized_jsd(student_logits, teacher_logits, beta: float, temperature: float = 1.0):
    """Per-position divergence [...] of the student from the teacher, both logits [..., V]
    divided by ``temperature``; see the module docstring for ``beta``. The teacher side
    passes no gradient."""
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    student_logp = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, -1)
    teacher_logp = jax.lax.stop_gradient(
        jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / temperature, -1)
    )
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    mixture_logp = jnp.logaddexp(student_logp + math.log(1 - beta),
                                 teacher_logp + math.log(beta))
    return beta * _kl(teacher_logp, mixture_logp) + (1 - beta) * _kl(student_logp, mixture_logp)


def dense_reward_loss(student_logp, teacher_logp):
    """On-policy distillation as a dense reward: each sampled token's reward is
    ``log pi_teacher(y_t) - log pi_student(y_t)`` (not differentiated), and the per-token
    REINFORCE loss ``-reward * log pi_student(y_t)``. On the student's own samples its
    expected gradient is the reverse KL's, from the sampled tokens' log-probs alone."""
    reward = jax.lax.stop_gradient(teacher_logp - student_logp)
    return -reward * student_logp
