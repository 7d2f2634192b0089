"""DPO: losses through the task against numpy, response-only log-probs on the ChatML
template, the frozen reference (in the train state or precomputed), 8 devices vs 1, exact resume
with the reference left out of checkpoints."""

import functools
import os
import re

import jax
import numpy as np
import pytest
from flax import nnx
from preference_helpers import (
    TINY,
    assert_close_trees,
    config_for,
    fast_overrides,
    train_rows,
    train_steps,
)
from tiny import assert_no_reference_saved
from tolerances import assert_params_close_after_adam

from jaxpt.checkpoint import CheckpointError
from jaxpt.data import build_preference_pipeline, generate_preference_pairs, load_tokenizer
from jaxpt.loop import run
from jaxpt.models import init_model, save_pretrained
from jaxpt.step import StepContext
from jaxpt.tasks.dpo import dpo_task_loss

pytestmark = pytest.mark.usefixtures("one_device_runs")  # 8-device tests pass mesh8


@pytest.fixture(scope="module")
def batch():
    """3 real pairs and one padding row (pair_mask 0), shipped ChatML tokenizer."""
    rows = generate_preference_pairs(3, seed=1, split="train")
    pipeline = build_preference_pipeline(rows, load_tokenizer(), seq_len=80, batch_size=4,
                                         shuffle=False, num_epochs=1)
    return next(pipeline)


def test_logprobs_cover_the_response_only(batch):
    tokenizer = load_tokenizer()
    rows = generate_preference_pairs(3, seed=1, split="train")
    for side in ("chosen", "rejected"):
        mask = batch[f"{side}_loss_mask"][0] > 0
        trained = tokenizer.decode(batch[f"{side}_target_ids"][0][mask])
        assert trained == rows[0][side][0]["content"] + "<|im_end|>"
        prompt = tokenizer.decode(batch[f"{side}_input_ids"][0][: np.argmax(mask) + 1])
        assert prompt.endswith("<|im_start|>assistant\n") and "What is" in prompt
    assert batch["pair_mask"].tolist() == [1, 1, 1, 0]


@nnx.jit
def _logits(model, ids, positions, segment_ids):
    return model(ids, positions=positions, segment_ids=segment_ids)


def _numpy_logps(model, batch, side):
    logits = np.asarray(_logits(model, batch[f"{side}_input_ids"], batch[f"{side}_positions"],
                                batch[f"{side}_segment_ids"]), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    logp -= logits.max(-1, keepdims=True)
    tok = np.take_along_axis(logp, batch[f"{side}_target_ids"][..., None], -1)[..., 0]
    return (tok * batch[f"{side}_loss_mask"]).sum(-1)


def test_dpo_losses_through_the_task_match_numpy(batch):
    policy = init_model(TINY, seed=1)
    reference = init_model(TINY, seed=2)
    pi_c, pi_r = _numpy_logps(policy, batch, "chosen"), _numpy_logps(policy, batch, "rejected")
    ref_c, ref_r = (_numpy_logps(reference, batch, s) for s in ("chosen", "rejected"))
    real = batch["pair_mask"]
    beta = 0.5
    h = (pi_c - ref_c) - (pi_r - ref_r)
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))
    expected = {
        "sigmoid": -0.9 * log_sigmoid(beta * h) - 0.1 * log_sigmoid(-beta * h),
        "ipo": (h - 1 / (2 * beta)) ** 2,
        "hinge": np.maximum(0, 1 - beta * h),
    }
    ref_params = nnx.state(reference, nnx.Param)
    precomputed = {**batch, "ref_chosen_logps": ref_c.astype(np.float32),
                   "ref_rejected_logps": ref_r.astype(np.float32)}
    for loss_type, loss_b in expected.items():
        kwargs = {"beta": beta, "loss_type": loss_type,
                  "label_smoothing": 0.1 if loss_type == "sigmoid" else 0.0}
        # Reference from params in extras, and from precomputed batch columns.
        for b, extras in ((batch, ref_params), (precomputed, None)):
            loss_fn = nnx.jit(functools.partial(dpo_task_loss, **kwargs))
            out = loss_fn(policy, b, StepContext(None, 0, ref_params=extras))
            np.testing.assert_allclose(out.numerator, np.sum(loss_b * real), rtol=2e-4)
            assert float(out.denominator) == 3.0
    m = out.metrics
    np.testing.assert_allclose(m["rewards/chosen"], np.sum(beta * (pi_c - ref_c) * real),
                               rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(m["rewards/margins"], np.sum(beta * h * real), rtol=2e-4,
                               atol=1e-5)
    np.testing.assert_allclose(m["rewards/accuracy"], np.sum((h > 0) * real))
    np.testing.assert_allclose(m["logps/chosen"], np.sum(pi_c * real), rtol=1e-5)


def test_simpo_and_orpo_by_hand():
    """Two pairs: chosen log-probs -6 over 3 tokens and -12 over 4 (averages -2, -3)."""
    from jaxpt.losses import orpo_loss, simpo_loss

    pc, pr = np.array([-6.0, -12.0]), np.array([-12.0, -6.0])
    tc, tr = np.array([3.0, 4.0]), np.array([4.0, 3.0])
    # SimPO, beta 2, gamma 0.5: h = 2 * (-2) - 2 * (-3) - 0.5 = 1.5; the second pair -2.5.
    loss, m = simpo_loss(pc, pr, tc, tr, beta=2.0, gamma=0.5)
    np.testing.assert_allclose(loss, [np.log1p(np.exp(-1.5)), np.log1p(np.exp(2.5))], rtol=1e-6)
    np.testing.assert_allclose(loss[0], 0.2014133, rtol=1e-6)
    np.testing.assert_allclose(m["rewards/chosen"], [-4.0, -6.0])
    np.testing.assert_allclose(m["rewards/accuracy"], [1.0, 0.0])
    smoothed, _ = simpo_loss(pc, pr, tc, tr, beta=2.0, gamma=0.5, label_smoothing=0.1)
    np.testing.assert_allclose(smoothed[0], 0.9 * np.log1p(np.exp(-1.5))
                               + 0.1 * np.log1p(np.exp(1.5)), rtol=1e-6)
    # ORPO, lambda 0.1: log odds(p) = log p - log(1 - p) of the average token probability.
    loss, m = orpo_loss(pc, pr, tc, tr, beta=0.1)
    log_odds = lambda avg: avg - np.log1p(-np.exp(avg))
    ratio = log_odds(-2.0) - log_odds(-3.0)
    np.testing.assert_allclose(m["log_odds_chosen"][0], ratio, rtol=1e-6)
    np.testing.assert_allclose(loss[0], 2.0 + 0.1 * np.log1p(np.exp(-ratio)), rtol=1e-6)
    np.testing.assert_allclose(loss[0], 2.0288735, rtol=1e-6)
    np.testing.assert_allclose(loss[1], 3.0 + 0.1 * np.log1p(np.exp(ratio)), rtol=1e-6)
    np.testing.assert_allclose(m["nll_loss"], [2.0, 3.0])
    # Near-certain responses: the odds stay finite.
    loss, _ = orpo_loss(np.array([-1e-9]), np.array([-50.0]), np.array([1.0]), np.array([1.0]))
    assert np.all(np.isfinite(loss))


def test_simpo_and_orpo_through_the_task_use_no_reference(batch):
    policy = init_model(TINY, seed=1)
    pi_c, pi_r = _numpy_logps(policy, batch, "chosen"), _numpy_logps(policy, batch, "rejected")
    tc, tr = batch["chosen_loss_mask"].sum(-1), batch["rejected_loss_mask"].sum(-1)
    real = batch["pair_mask"]
    with np.errstate(all="ignore"):  # the padding row has no tokens: its values are unused
        avg_c, avg_r = pi_c / tc, pi_r / tr
    log_sigmoid = lambda x: -np.log1p(np.exp(-x))
    log_odds = lambda avg: avg - np.log1p(-np.exp(avg))
    with np.errstate(all="ignore"):
        expected = {
            "simpo": -log_sigmoid(2.0 * (avg_c - avg_r) - 0.3),
            "orpo": -avg_c - 2.0 * log_sigmoid(log_odds(avg_c) - log_odds(avg_r)),
        }
    for loss_type, loss_b in expected.items():
        loss_fn = nnx.jit(functools.partial(dpo_task_loss, beta=2.0, loss_type=loss_type,
                                            simpo_gamma=0.3))
        out = loss_fn(policy, batch, StepContext(None, 0, ref_params=None))
        np.testing.assert_allclose(out.numerator, np.sum(np.where(real, loss_b, 0)), rtol=2e-4)
        assert float(out.denominator) == 3.0


def test_reference_free_losses_keep_no_reference_and_resume_exactly(tmp_path, tiny_dir):
    from jaxpt.config import ConfigError

    extra = {"train.max_steps": 4, "dpo.loss_type": "simpo", "dpo.beta": 2.0,
             "dpo.precompute_ref": "true", "export.hf": "false", "train.eval_batches": 0}
    from jaxpt.tasks.common import keeps_reference

    full = config_for("dpo", fast_overrides(str(tmp_path / "full"), tiny_dir, **extra))
    assert not keeps_reference(full)
    assert "reference_pairs" not in run(full).summary  # nor a precomputed table
    resumed = config_for("dpo", fast_overrides(str(tmp_path / "resumed"), tiny_dir, **extra))
    assert run(resumed, stop_after_step=2).preempted
    assert run(resumed).step == 4
    a, b = train_rows(str(tmp_path / "full")), train_rows(str(tmp_path / "resumed"))
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    with pytest.raises(ConfigError, match="dpo.ref_model"):
        config_for("dpo", fast_overrides(str(tmp_path / "x"), tiny_dir, **{
            **extra, "dpo.loss_type": "orpo", "dpo.ref_model": tiny_dir}))


def test_dpo_8_devices_with_reference_params_match_1_device_precomputed(tmp_path, tiny_dir,
                                                                        mesh8, mesh1):
    # A reference other than the policy: were they equal, every margin at step 1 would be
    # float noise and the accuracy the sign of that noise (which differs between CPUs and
    # meshes). With this one every |beta * margin| in these steps is >= 1e-3 (measured),
    # 100x the worst float32 noise of a margin (below).
    ref_dir = str(tmp_path / "reference")
    save_pretrained(init_model(TINY, seed=1), ref_dir)
    base = fast_overrides(str(tmp_path), tiny_dir, **{"train.max_steps": 3, "dpo.beta": 0.5,
                                                      "dpo.ref_model": ref_dir})
    on_the_fly = config_for("dpo", base + ["dpo.precompute_ref=false"])
    state8, hist8, eval8 = train_steps(on_the_fly, mesh8, 3)
    # The reference sits in TrainState.ref_params, sharded like the policy, and never moves.
    ref = state8.ref_params["model"]["layers"]["mlp"]["up_proj"]["weight"]
    up = state8.params["model"]["layers"]["mlp"]["up_proj"]["weight"]
    assert ref.sharding.spec == up.sharding.spec
    reference = nnx.state(init_model(TINY, seed=1), nnx.Param)
    assert_close_trees(state8.ref_params, reference, rtol=0, atol=0)
    initial_up = nnx.state(init_model(TINY, seed=0), nnx.Param)["model"]["layers"]["mlp"]
    assert not np.allclose(np.asarray(up), np.asarray(initial_up["up_proj"]["weight"]))

    precomputed = config_for("dpo", base + ["dpo.precompute_ref=true"])
    state1, hist1, eval1 = train_steps(precomputed, mesh1, 3)
    assert state1.ref_params is None
    # Margins are differences of sequence log-probs of size ~100: float32 rounding alone
    # moves them by up to ~1e-5 (seen: 5e-7), so atol 1e-5, 1000x below a 1e-2 discrepancy.
    for key in ("loss", "rewards/margins", "grad_norm"):
        np.testing.assert_allclose([h[key] for h in hist8], [h[key] for h in hist1],
                                   rtol=1e-4, atol=1e-5)
    for key in ("eval_loss", "eval_rewards/margins"):
        np.testing.assert_allclose(eval8[key], eval1[key], rtol=1e-4, atol=1e-5)
    # Margins far from 0 (above): the accuracies cannot flip, so they must agree exactly.
    assert [h["rewards/accuracy"] for h in hist8] == [h["rewards/accuracy"] for h in hist1]
    assert eval8["eval_rewards/accuracy"] == eval1["eval_rewards/accuracy"]
    assert_params_close_after_adam(state8.params, state1.params, lr=3e-3, steps=3)
    jax.clear_caches()


def test_dpo_default_reference_is_the_initial_policy_and_stays_apart(tmp_path, tiny_dir, mesh8):
    """Without dpo.ref_model the reference is a copy of the policy's initial params in their
    own buffers: donating the policy's every step must leave it untouched."""
    extra = {"train.max_steps": 2, "dpo.beta": 0.5, "dpo.precompute_ref": "false",
             "train.eval_batches": 0}
    config = config_for("dpo", fast_overrides(str(tmp_path), tiny_dir, **extra))
    state, history, _ = train_steps(config, mesh8, 2)
    initial = nnx.state(init_model(TINY, seed=0), nnx.Param)
    assert_close_trees(state.ref_params, initial, rtol=0, atol=0)
    ref = state.ref_params["model"]["layers"]["mlp"]["up_proj"]["weight"]
    up = state.params["model"]["layers"]["mlp"]["up_proj"]["weight"]
    assert ref.sharding.spec == up.sharding.spec
    assert not np.allclose(np.asarray(up), np.asarray(ref))
    # Policy == reference at step 1: margin 0 and loss log 2, up to float noise (only these
    # continuous values are compared; the accuracy there would be the sign of the noise).
    np.testing.assert_allclose(history[0]["loss"], np.log(2), atol=1e-5)
    np.testing.assert_allclose(history[0]["rewards/margins"], 0.0, atol=1e-5)
    jax.clear_caches()


def test_dpo_resumes_exactly_with_precomputed_reference(tmp_path, tiny_dir):
    extra = {"train.max_steps": 4, "dpo.precompute_ref": "true", "export.hf": "false",
             "train.eval_batches": 0}
    full = config_for("dpo", fast_overrides(str(tmp_path / "full"), tiny_dir, **extra))
    run(full)
    resumed = config_for("dpo", fast_overrides(str(tmp_path / "resumed"), tiny_dir, **extra))
    assert run(resumed, stop_after_step=2).preempted
    assert run(resumed).step == 4
    a, b = train_rows(str(tmp_path / "full")), train_rows(str(tmp_path / "resumed"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/rejected"):
        assert [r[key] for r in a] == [r[key] for r in b], key


def test_dpo_checkpoints_leave_the_reference_out_resume_exactly_and_catch_a_changed_one(
    tmp_path, tiny_dir
):
    """The reference (dpo.ref_model) is re-read on resume, not stored; the checkpoint's
    fingerprint of it makes a changed model at that path an error, not a silent drift."""
    ref_dir = str(tmp_path / "reference")
    save_pretrained(init_model(TINY, seed=1), ref_dir)
    extra = {"train.max_steps": 4, "dpo.precompute_ref": "false", "dpo.ref_model": ref_dir,
             "export.hf": "false", "train.eval_batches": 0}
    run(config_for("dpo", fast_overrides(str(tmp_path / "full"), tiny_dir, **extra)))
    resumed = config_for("dpo", fast_overrides(str(tmp_path / "resumed"), tiny_dir, **extra))
    first = run(resumed, stop_after_step=2)
    assert first.preempted
    assert_no_reference_saved(first.checkpoint_dir, 2)

    save_pretrained(init_model(TINY, seed=2), ref_dir)  # another model at the same path
    where, source = re.escape(f"{first.checkpoint_dir}/2"), re.escape(f"({ref_dir})")
    with pytest.raises(CheckpointError, match=rf"{where} .*'dpo.ref_model' {source}"):
        run(resumed)
    assert os.listdir(first.checkpoint_dir) == ["2"]  # an error, not damage: nothing set aside

    save_pretrained(init_model(TINY, seed=1), ref_dir)  # the original back: resumes exactly
    assert run(resumed).step == 4
    a, b = train_rows(str(tmp_path / "full")), train_rows(str(tmp_path / "resumed"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/margins", "logps/rejected"):
        assert [r[key] for r in a] == [r[key] for r in b], key
