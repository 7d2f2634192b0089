"""Distillation: the generalized JSD against hand computation (beta 0, 0.5, 1), the task's
loss against numpy on a teacher of another shape, on- and off-policy steps drawn by a
seeded coin, exact resume, and a teacher with another tokenizer refused."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import TINY, make_tiny_dir, train_rows

from jaxpt.config import ConfigError, load_config
from jaxpt.loop import run, setup
from jaxpt.losses.distill import generalized_jsd
from jaxpt.step import StepContext, put_batch

pytestmark = pytest.mark.usefixtures("one_device_runs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISTILL_TINY = os.path.join(ROOT, "configs", "distill_tiny.yaml")


def _kl(p, q):
    return float(np.sum(p * np.log(p / q)))


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_generalized_jsd_by_hand(beta):
    student_logits = np.log(np.array([0.5, 0.25, 0.25]))
    teacher_logits = np.log(np.array([0.25, 0.25, 0.5]))
    s, t = np.exp(student_logits), np.exp(teacher_logits)
    if beta == 0.0:
        expected = _kl(t, s)  # forward KL: the teacher's mass the student misses
    elif beta == 1.0:
        expected = _kl(s, t)  # reverse KL: the student's mass the teacher would not put
    else:
        m = 0.5 * s + 0.5 * t
        expected = 0.5 * _kl(t, m) + 0.5 * _kl(s, m)
    got = generalized_jsd(jnp.asarray(student_logits), jnp.asarray(teacher_logits), beta)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    if beta == 0.0:
        np.testing.assert_allclose(expected, 0.25 * np.log(0.5) + 0.5 * np.log(2), rtol=1e-6)
    # Temperature divides both sets of logits; the teacher passes no gradient.
    hot = generalized_jsd(jnp.asarray(student_logits), jnp.asarray(teacher_logits), beta, 2.0)
    cooled = generalized_jsd(jnp.asarray(student_logits) / 2, jnp.asarray(teacher_logits) / 2,
                             beta)
    np.testing.assert_allclose(float(hot), float(cooled), rtol=1e-6)
    grad = jax.grad(lambda t_: generalized_jsd(jnp.asarray(student_logits), t_, beta))(
        jnp.asarray(teacher_logits))
    assert not np.any(np.asarray(grad))
    with pytest.raises(ValueError, match="beta"):
        generalized_jsd(jnp.asarray(student_logits), jnp.asarray(teacher_logits), 1.5)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    """A teacher of another shape (3 layers, wider MLP) with the shipped tokenizer."""
    config = {**TINY, "num_hidden_layers": 3, "intermediate_size": 96}
    return make_tiny_dir(str(tmp_path_factory.mktemp("teacher")), seed=7, config=config)


def _overrides(output_dir, student, teacher, **extra):
    values = {
        "output_dir": output_dir, "model.path": student, "distill.teacher": teacher,
        "data.arithmetic.num_train": 64, "data.arithmetic.num_test": 8,
        "distill.max_prompt_length": 16, "distill.max_completion_length": 8,
        "distill.eval_prompts": 0, "train.batch_size": 4, "train.max_steps": 4,
        "train.eval_at_start": "false", "checkpoint.every": 2, "export.hf": "false",
        "logging.progress": "false", "logging.tensorboard": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def _jsd_numpy(student_logits, teacher_logits, beta):
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    ls, lt = log_softmax(student_logits), log_softmax(teacher_logits)
    s, t = np.exp(ls), np.exp(lt)
    m = beta * t + (1 - beta) * s
    return beta * np.sum(t * (lt - np.log(m)), -1) + (1 - beta) * np.sum(s * (ls - np.log(m)), -1)


def _token_logp_numpy(logits, targets):
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return np.take_along_axis(logp, targets[..., None], -1)[..., 0]


# The divergence on the data's own solutions (lmbda 0), and the dense reward on the
# student's samples (lmbda 1).
@pytest.mark.parametrize("objective", ["divergence", "dense_reward"])
def test_the_task_loss_over_completion_tokens_matches_numpy(objective, tmp_path, tiny_dir,
                                                            teacher_dir, mesh1):
    lmbda = 0.0 if objective == "divergence" else 1.0
    config = load_config(DISTILL_TINY, _overrides(
        str(tmp_path), tiny_dir, teacher_dir, **{"distill.lmbda": lmbda, "distill.beta": 0.5,
                                                 "distill.temperature": 0.7,
                                                 "distill.objective": objective}))
    with setup(config, mesh=mesh1) as prepared:
        batch, metrics = prepared.source.next(prepared.state)
        assert metrics.get("on_policy", 1.0) == lmbda
        loss_fn = prepared.task.make_loss(prepared.ctx)
        with prepared.activate():
            out = jax.jit(lambda s, b: loss_fn(s.model(), b, StepContext(
                jax.random.key(0), s.step, s.ref_params)))(prepared.state,
                                                           put_batch(batch, prepared.mesh))
        student = prepared.state.model()
        from jaxpt.models import from_pretrained

        teacher = from_pretrained(teacher_dir)
        ids, pos, seg = batch["input_ids"], batch["positions"], batch["segment_ids"]
        s_logits = np.asarray(student(ids, pos, seg), np.float64) / 0.7
        t_logits = np.asarray(teacher(ids, pos, seg), np.float64) / 0.7
    mask = batch["completion_mask"]
    if objective == "divergence":
        per_token = _jsd_numpy(s_logits, t_logits, 0.5)
    else:  # -(log pi_teacher - log pi_student) * log pi_student of each sampled token
        ls = _token_logp_numpy(s_logits, batch["target_ids"])
        lt = _token_logp_numpy(t_logits, batch["target_ids"])
        per_token = -(lt - ls) * ls
    np.testing.assert_allclose(float(out.numerator), np.sum(per_token * mask), rtol=2e-4)
    assert float(out.denominator) == mask.sum() > 0
    if objective == "divergence":  # the off-policy rows: the sloppy teacher's solutions
        with open(tmp_path / "data" / "arithmetic_train.jsonl") as f:
            assert "messages" in json.loads(f.readline())


def test_steps_mix_on_and_off_policy_and_resume_exactly(tmp_path, tiny_dir, teacher_dir):
    extra = {"distill.lmbda": 0.5, "train.max_steps": 6, "distill.rewards": "[{name: math}]"}
    full = str(tmp_path / "full")
    run(load_config(DISTILL_TINY, _overrides(full, tiny_dir, teacher_dir, **extra)))
    resumed = str(tmp_path / "resumed")
    config = load_config(DISTILL_TINY, _overrides(resumed, tiny_dir, teacher_dir, **extra))
    assert run(config, stop_after_step=3).preempted
    run(config)
    a, b = train_rows(full), train_rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert {r["on_policy"] for r in a} == {0.0, 1.0}  # both kinds of step were drawn
    for key in ("loss", "grad_norm", "on_policy", "reward"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_a_teacher_with_another_tokenizer_is_refused(tmp_path, tiny_dir):
    from jaxpt.data import load_tokenizer
    from jaxpt.tasks.distill import check_tokenizers

    student = load_tokenizer()
    other = load_tokenizer()
    other.add_tokens(["<extra>"])
    with pytest.raises(ConfigError, match="distill.teacher.*another tokenizer"):
        check_tokenizers(student, other, "teacher-dir")
    check_tokenizers(student, load_tokenizer(), "teacher-dir")
    with pytest.raises(ConfigError, match="distill.teacher' is required"):
        load_config(DISTILL_TINY, _overrides(str(tmp_path), tiny_dir, "null"))


def test_dense_reward_gradient_is_the_reverse_kl_reward_times_the_score():
    from jaxpt.losses.distill import dense_reward_loss

    student, teacher = jnp.array([-0.5, -2.0]), jnp.array([-1.0, -0.5])
    loss = dense_reward_loss(student, teacher)
    # reward = teacher - student = [-0.5, 1.5]; loss = -reward * log pi_student.
    np.testing.assert_allclose(np.asarray(loss), [-0.25, 3.0], rtol=1e-6)
    grad = jax.grad(lambda s: dense_reward_loss(s, teacher).sum())(student)
    np.testing.assert_allclose(np.asarray(grad), [0.5, -1.5], rtol=1e-6)  # -reward
    with pytest.raises(ConfigError, match="dense_reward .* needs 'distill.lmbda' 1"):
        load_config(DISTILL_TINY, ["distill.objective=dense_reward", "distill.lmbda=0.5",
                                   "distill.teacher=x", "output_dir=x"])
