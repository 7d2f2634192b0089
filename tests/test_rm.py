"""Reward modeling: the classifier's read position, the Bradley-Terry loss through the task,
transformers parity of the export, the reward-model scorer, 8 devices vs 1, exact resume."""

import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from preference_helpers import config_for, fast_overrides, train_rows, train_steps
from tolerances import assert_params_close_after_adam

from jaxpt.data import build_preference_pipeline, generate_preference_pairs
from jaxpt.loop import run
from jaxpt.models import from_pretrained
from jaxpt.models.classifier import classifier_from_pretrained, read_positions
from jaxpt.models.safetensors_io import SafetensorsFile
from jaxpt.rewards import load_reward_model
from jaxpt.step import StepContext
from jaxpt.tasks.rm import rm_loss

pytestmark = pytest.mark.usefixtures("one_device_runs")  # the 8-device test passes mesh8


def test_read_position_is_transformers_rightmost_non_pad():
    ids_bt = np.array([[5, 6, 3, 0, 0], [0, 0, 7, 8, 3], [5, 3, 3, 3, 3], [0, 0, 0, 0, 0]])
    real_bt = (ids_bt != 0).astype(np.int32)
    np.testing.assert_array_equal(read_positions(ids_bt, real_bt, 0), [2, 4, 4, 0])
    # pad == eos (a tokenizer without a pad token): trailing EOS tokens are skipped, as in
    # transformers' `(arange * (ids != pad)).argmax(-1)`.
    hf_rule = (np.arange(5) * (ids_bt != 3)).argmax(-1)
    np.testing.assert_array_equal(read_positions(ids_bt, None, 3), hf_rule)
    np.testing.assert_array_equal(read_positions(ids_bt, real_bt, 3)[:3], [1, 3, 0])


class ScoreStub:
    """A 'model' whose score is a fixed number per row, keyed by the row's first token."""

    def __init__(self, scores):
        self.scores = jnp.asarray(scores, jnp.float32)

    def __call__(self, input_ids, positions=None, segment_ids=None):
        return self.scores[input_ids[:, 0]][:, None]


def _pair_batch(first_chosen, first_rejected, margin, pair_mask):
    b = len(margin)

    def rows(first):
        ids = np.zeros((b, 4), np.int32)
        ids[:, 0] = first
        return ids

    batch = {"margin": np.asarray(margin, np.float32), "pair_mask": np.asarray(pair_mask, np.float32)}
    for side, first in (("chosen", first_chosen), ("rejected", first_rejected)):
        batch[f"{side}_input_ids"] = rows(first)
        for key in ("target_ids", "positions", "segment_ids"):
            batch[f"{side}_{key}"] = np.zeros((b, 4), np.int32)
        batch[f"{side}_loss_mask"] = np.zeros((b, 4), np.float32)
    return batch


def test_bradley_terry_through_the_task_loss_by_hand():
    # rewards by token: 1 -> 2.0, 2 -> 0.5, 3 -> 0.1, 4 -> 0.3, 5 -> 9, 6 -> -9
    model = ScoreStub([0.0, 2.0, 0.5, 0.1, 0.3, 9.0, -9.0])
    batch = _pair_batch([1, 3, 5], [2, 4, 6], margin=[0.0, 0.5, 0.0], pair_mask=[1, 1, 0])
    ctx = StepContext(rng=None, step=0)
    softplus = lambda x: np.log1p(np.exp(x))
    out = rm_loss(model, batch, ctx, center_coef=0.0, use_margin=True)
    # pair 1: r_c - r_r = 1.5; pair 2: 0.1 - 0.3 - 0.5 = -0.7; pair 3 is padding.
    np.testing.assert_allclose(out.numerator, softplus(-1.5) + softplus(0.7), rtol=1e-6)
    assert float(out.denominator) == 2.0
    np.testing.assert_allclose(out.metrics["accuracy"], 1.0)
    np.testing.assert_allclose(out.metrics["margin"], 1.5 - 0.2, rtol=1e-6)
    np.testing.assert_allclose(out.metrics["reward_chosen"], 2.1, rtol=1e-6)
    no_margin = rm_loss(model, batch, ctx, use_margin=False)
    np.testing.assert_allclose(no_margin.numerator, softplus(-1.5) + softplus(0.2), rtol=1e-6)
    centred = rm_loss(model, batch, ctx, center_coef=0.1)
    expected = softplus(-1.5) + softplus(0.7) + 0.1 * (2.5**2 + 0.4**2)
    np.testing.assert_allclose(centred.numerator, expected, rtol=1e-6)


def test_classifier_from_a_causal_lm_checkpoint(tiny_dir):
    lm = from_pretrained(tiny_dir)
    a = classifier_from_pretrained(tiny_dir, seed=3, pad_token_id=0)
    b = classifier_from_pretrained(tiny_dir, seed=3, pad_token_id=0)
    np.testing.assert_array_equal(nnx.state(a)["model"]["embed_tokens"]["weight"][...],
                                  nnx.state(lm)["model"]["embed_tokens"]["weight"][...])
    np.testing.assert_array_equal(a.score.weight[...], b.score.weight[...])  # seeded
    assert a.score.weight.shape == (1, 32) and a.lm_head is None
    # Padding after the read position changes nothing.
    ids = np.array([[9, 10, 11, 3]])
    padded = np.array([[9, 10, 11, 3, 0, 0]])
    np.testing.assert_allclose(a(ids, segment_ids=ids != 0), a(padded, segment_ids=padded != 0),
                               rtol=1e-6)


def _held_out_batch(tokenizer, n=8):
    rows = generate_preference_pairs(n, seed=0, split="test")
    pipeline = build_preference_pipeline(rows, tokenizer, seq_len=80, batch_size=n,
                                         shuffle=False, num_epochs=1)
    return rows, next(pipeline)


def test_rm_run_exports_transformers_classifier_and_resumes_exactly(tmp_path, tiny_dir):
    steps = {"train.max_steps": 4, "rm.center_coef": 0.01}
    full = config_for("rm", fast_overrides(str(tmp_path / "full"), tiny_dir, **steps))
    result = run(full)
    assert result.evals and "eval_accuracy" in result.evals[-1]
    assert {"eval_margin", "eval_reward_chosen", "eval_reward_rejected"} <= set(result.evals[-1])

    # Exported dir: transformers' classifier gives jaxpt's scores (float32, 1e-4).
    hf_dir = result.hf_dir
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        hf_dir, dtype=torch.float32
    ).eval()
    assert hf.config.architectures == ["LlamaForSequenceClassification"]
    assert hf.config.num_labels == 1 and hf.config.pad_token_id == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    rows, batch = _held_out_batch(tokenizer)
    ours = classifier_from_pretrained(hf_dir)
    ids, segments = batch["chosen_input_ids"], batch["chosen_segment_ids"]
    ours_b = np.asarray(ours(ids, positions=batch["chosen_positions"], segment_ids=segments))[:, 0]
    with torch.no_grad():
        theirs_b = hf(torch.as_tensor(ids, dtype=torch.long),
                      attention_mask=torch.as_tensor(segments)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours_b, theirs_b, atol=1e-4)

    # The scorer tokenizes (prompt, response) as training did: same scores, any batching.
    scorer = load_reward_model(hf_dir, batch_size=4)
    responses = [r["chosen"][0]["content"] for r in rows]
    np.testing.assert_allclose(scorer.score([r["prompt"] for r in rows], responses), theirs_b,
                               atol=1e-4)

    # 2 steps, stop, resume 2 steps == 4 steps straight, bit for bit.
    resumed = config_for("rm", fast_overrides(str(tmp_path / "resumed"), tiny_dir, **steps))
    assert run(resumed, stop_after_step=2).preempted
    second = run(resumed)
    assert second.step == 4
    a, b = train_rows(str(tmp_path / "full")), train_rows(str(tmp_path / "resumed"))
    for key in ("loss", "grad_norm", "accuracy", "margin", "reward_chosen"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    weights = [SafetensorsFile(os.path.join(d, "model.safetensors")) for d in (hf_dir, second.hf_dir)]
    for name in weights[0].keys():  # noqa: SIM118 (not a dict)
        np.testing.assert_array_equal(weights[0].array(name)[...], weights[1].array(name)[...])


def test_rm_on_8_devices_matches_1_device(tmp_path, tiny_dir, mesh8, mesh1):
    config = config_for("rm", fast_overrides(str(tmp_path), tiny_dir, **{"train.max_steps": 3}))
    state8, hist8, eval8 = train_steps(config, mesh8, 3)
    state1, hist1, eval1 = train_steps(config, mesh1, 3)
    # Rewards are ~0.1 here, so their rounding across meshes is ~1e-8 (seen: 4e-9): atol 1e-6
    # leaves 100x and still catches any discrepancy a sharding bug could make.
    for key in ("loss", "margin"):
        np.testing.assert_allclose([h[key] for h in hist8], [h[key] for h in hist1],
                                   rtol=1e-5, atol=1e-6)
    # Accuracy is the sign of each pair's reward margin; every |r_c - r_r| in these steps is
    # >= 2e-4 (measured), 1e4 x that rounding, so it cannot flip between meshes.
    assert [h["accuracy"] for h in hist8] == [h["accuracy"] for h in hist1]
    np.testing.assert_allclose(eval8["eval_loss"], eval1["eval_loss"], rtol=1e-5)
    assert_params_close_after_adam(state8.params, state1.params, lr=3e-3, steps=3)
