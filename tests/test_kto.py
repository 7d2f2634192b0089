"""KTO: the loss and its KL reference point against hand computation, unpaired rows (and
pairs read as two) with their mismatched rows, the task's loss against numpy, and exact
resume."""

import functools
import json

import numpy as np
import pytest
from flax import nnx
from preference_helpers import TINY, config_for, fast_overrides, train_rows

from jaxpt.data import DataError, build_unpaired_pipeline, load_examples, load_tokenizer
from jaxpt.data.features import mismatched_rows
from jaxpt.loop import run
from jaxpt.losses import kto_loss
from jaxpt.models import init_model
from jaxpt.step import StepContext
from jaxpt.tasks.kto import kto_task_loss, unpair_batch

pytestmark = pytest.mark.usefixtures("one_device_runs")

ROWS = [
    {"prompt": "What is 2+3?", "completion": "5", "label": True},
    {"prompt": "What is 4+4?", "completion": "9", "label": False},
    {"prompt": "Name a colour", "chosen": "red", "rejected": "7"},  # read as two rows
]


def sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_kto_loss_by_hand():
    policy, ref = np.array([-2.0, -5.0, -0.5]), np.array([-3.0, -4.0, -1.0])
    label = np.array([1.0, 0.0, 0.0])  # log-ratios 1, -1, 0.5; reference point 0.25
    loss, m = kto_loss(policy, ref, label, 0.25, beta=0.5, desirable_weight=2.0,
                       undesirable_weight=0.5)
    expected = [2.0 * (1 - sigmoid(0.5 * 0.75)), 0.5 * (1 - sigmoid(0.5 * 1.25)),
                0.5 * (1 - sigmoid(0.5 * -0.25))]
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(m["rewards/desirable"], [0.5, 0.0, 0.0])
    np.testing.assert_allclose(m["rewards/undesirable"], [0.0, -0.5, 0.25])
    # Above the reference point when desirable, below it when not (the third is above).
    np.testing.assert_array_equal(m["rewards/accuracy"], [1.0, 1.0, 0.0])


def test_unpaired_rows_pairs_as_two_and_bad_labels():
    rows = load_examples(ROWS, "unpaired").rows
    assert [(r["completion"], r["label"]) for r in rows] == [
        ("5", True), ("9", False), ("red", True), ("7", False)]
    with pytest.raises(DataError, match=r"row 1: 'label' must be true .* got 'yes'"):
        load_examples([ROWS[0], {**ROWS[1], "label": "yes"}], "unpaired")
    with pytest.raises(DataError, match=r"row 0: missing field\(s\) 'label'"):
        load_examples([{"prompt": "a", "completion": "b"}], "unpaired")


def test_mismatched_rows_join_each_prompt_to_the_next_completion():
    # Two rows, prompt lengths 2 and 3; the third row is padding.
    batch = {"input_ids": np.array([[5, 6, 7, 8, 0], [1, 2, 3, 4, 0], [0] * 5]),
             "segment_ids": np.array([[1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [0] * 5]),
             "prompt_length": np.array([2, 3, 0]), "example_mask": np.array([1.0, 1.0, 0.0])}
    kl = mismatched_rows(batch)
    # Row 0: prompt [5, 6] + row 1's completion [4]; row 1: prompt [1, 2, 3] + nothing
    # (row 2 is padding); row 2 is padding itself.
    np.testing.assert_array_equal(kl["kl_input_ids"][0], [5, 6, 4, 0, 0])
    np.testing.assert_array_equal(kl["kl_target_ids"][0], [6, 4, 0, 0, 0])
    np.testing.assert_array_equal(kl["kl_loss_mask"][0], [0, 1, 0, 0, 0])
    np.testing.assert_array_equal(kl["kl_positions"][0], [0, 1, 2, 0, 0])
    np.testing.assert_array_equal(kl["kl_input_ids"][1], [1, 2, 3, 0, 0])
    assert kl["kl_loss_mask"][1:].sum() == 0 and kl["kl_segment_ids"][2].sum() == 0


@nnx.jit
def _logits(model, ids, positions, segment_ids):
    return model(ids, positions=positions, segment_ids=segment_ids)


def _numpy_logps(model, batch, prefix=""):
    logits = np.asarray(_logits(model, batch[f"{prefix}input_ids"],
                                batch[f"{prefix}positions"], batch[f"{prefix}segment_ids"]),
                        np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, batch[f"{prefix}target_ids"][..., None], -1)[..., 0]
    return (tok * batch[f"{prefix}loss_mask"]).sum(-1)


def test_kto_task_loss_matches_numpy_on_unpaired_rows_and_on_pairs():
    policy, reference = init_model(TINY, seed=1), init_model(TINY, seed=2)
    ref_params = nnx.state(reference, nnx.Param)
    pipeline = build_unpaired_pipeline(ROWS, load_tokenizer(), seq_len=48, batch_size=4,
                                       shuffle=False, num_epochs=1)
    batch = next(pipeline)
    beta = 0.5
    r = _numpy_logps(policy, batch) - _numpy_logps(reference, batch)
    kl_r = _numpy_logps(policy, batch, "kl_") - _numpy_logps(reference, batch, "kl_")
    kl = max(kl_r.mean(), 0.0)  # every row's neighbour has a completion here
    label = batch["label"]
    expected = np.where(label > 0, 1 - sigmoid(beta * (r - kl)), 1 - sigmoid(beta * (kl - r)))
    loss_fn = nnx.jit(functools.partial(kto_task_loss, beta=beta))
    out = loss_fn(policy, batch, StepContext(None, 0, ref_params=ref_params))
    np.testing.assert_allclose(out.numerator, expected.sum(), rtol=2e-4)
    assert float(out.denominator) == 4.0
    np.testing.assert_allclose(out.metrics["kl"] / 4, kl, rtol=2e-4, atol=1e-6)
    # A preference batch unpaired: chosen rows desirable, rejected ones not; pair accuracy.
    from jaxpt.data import build_preference_pipeline

    pairs = next(build_preference_pipeline([ROWS[2], {**ROWS[2], "prompt": "Say hi"}],
                                           load_tokenizer(), seq_len=48, batch_size=2,
                                           shuffle=False, num_epochs=1))
    unpaired = unpair_batch(pairs)
    assert unpaired["label"].tolist() == [1, 1, 0, 0]
    np.testing.assert_array_equal(unpaired["input_ids"][0], pairs["chosen_input_ids"][0])
    out = loss_fn(policy, unpaired, StepContext(None, 0, ref_params=ref_params))
    r = _numpy_logps(policy, unpaired) - _numpy_logps(reference, unpaired)
    np.testing.assert_allclose(out.metrics["rewards/pair_accuracy"] / 4,
                               np.mean(r[:2] > r[2:]))


def test_kto_resumes_exactly(tmp_path, tiny_dir):
    extra = {"train.max_steps": 4, "export.hf": "false", "train.eval_batches": 1,
             "train.eval_every": 2, "train.batch_size": 8}
    full = config_for("kto", fast_overrides(str(tmp_path / "full"), tiny_dir, **extra))
    result = run(full)
    assert "eval_rewards/pair_accuracy" in result.evals[-1]  # arithmetic eval rows are pairs
    resumed = config_for("kto", fast_overrides(str(tmp_path / "resumed"), tiny_dir, **extra))
    assert run(resumed, stop_after_step=2).preempted
    assert run(resumed).step == 4
    a, b = train_rows(str(tmp_path / "full")), train_rows(str(tmp_path / "resumed"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "kl", "rewards/accuracy", "desirable_frac"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    with open(tmp_path / "full" / "data" / "arithmetic_pref_train.jsonl") as f:
        assert "chosen" in json.loads(f.readline())  # pairs, read as unpaired examples
