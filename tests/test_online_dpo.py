"""Online DPO: pairs ranked by their rewards (ties masked), the loss against numpy on the
sampled pairs, and exact resume with a reward model ranking."""

import os
import types

import jax
import numpy as np
import pytest
from flax import nnx
from tiny import TINY, train_rows

from jaxpt.config import ConfigError, load_config
from jaxpt.loop import run, setup
from jaxpt.models.classifier import init_classifier, save_classifier
from jaxpt.step import StepContext, put_batch
from jaxpt.tasks.online_dpo import OnlineDpoConfig, make_batch
from jaxpt.tasks.rl.batch import Rollout

pytestmark = pytest.mark.usefixtures("one_device_runs")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONLINE_DPO_TINY = os.path.join(ROOT, "configs", "online_dpo_tiny.yaml")


def _overrides(output_dir, model, **extra):
    values = {
        "output_dir": output_dir, "model.path": model, "online_dpo.reward_model": "null",
        "online_dpo.rewards": "[{name: math}]", "data.arithmetic.num_train": 64,
        "data.arithmetic.num_test": 8, "online_dpo.max_prompt_length": 16,
        "online_dpo.max_completion_length": 8, "online_dpo.eval_prompts": 0,
        "train.batch_size": 8, "train.max_steps": 4, "train.eval_at_start": "false",
        "checkpoint.every": 2, "export.hf": "false", "logging.progress": "false",
        "logging.tensorboard": "false",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_pairs_are_ranked_by_score_and_ties_masked():
    # Three prompts, two completions each; the second completion of prompt 0 truncated.
    rollout = Rollout(
        prompt_ids=np.ones((6, 2), np.int32), prompt_mask=np.ones((6, 2), np.int32),
        tokens=np.ones((6, 3), np.int32), lengths=np.full(6, 3), logprobs=np.zeros((6, 3)),
        truncated=np.array([False, True, False, False, False, False]), texts=[""] * 6,
        rows=[{}] * 6, rewards=types.SimpleNamespace(total=np.array([1.0, 1.2, 0., 1., .5, .5])),
        num_prompts=3,
    )
    cfg = OnlineDpoConfig(rewards=[{"name": "math"}], missing_eos_penalty=0.5)
    batch, metrics, _ = make_batch(rollout, cfg)
    # Prompt 0: 1.0 beats 1.2 - 0.5 (its penalty); prompt 1: the second; prompt 2: a tie.
    assert batch["chosen"].tolist() == [1, 0, 0, 1, 1, 0]
    assert batch["pair_mask"].tolist() == [1, 1, 1, 1, 0, 0]
    assert metrics["pairs_tied_frac"] == pytest.approx(1 / 3)
    assert "advantages" not in batch and batch["input_ids"].shape == (6, 5)


def _numpy_completion_logps(model, batch, lc):
    logits = np.asarray(model(batch["input_ids"], batch["positions"], batch["segment_ids"]),
                        np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    tok = np.take_along_axis(logp, batch["target_ids"][..., None], -1)[..., 0]
    return (tok * batch["completion_mask"]).sum(-1)


def test_the_loss_is_dpo_on_the_sampled_pairs(tmp_path, tiny_dir, mesh1):
    config = load_config(ONLINE_DPO_TINY, _overrides(str(tmp_path), tiny_dir,
                                                     **{"online_dpo.beta": 0.5}))
    from jaxpt.models import init_model

    with setup(config, mesh=mesh1) as prepared:
        batch, metrics = prepared.source.next(prepared.state)
        # Another reference than the policy's start, so that the reference side counts.
        reference = init_model(TINY, seed=5)
        ref_params = nnx.state(reference, nnx.Param)
        loss_fn = prepared.task.make_loss(prepared.ctx)
        with prepared.activate():
            out = jax.jit(lambda s, b, r: loss_fn(s.model(), b, StepContext(
                jax.random.key(0), s.step, r)))(prepared.state, put_batch(batch, prepared.mesh),
                                                ref_params)
        policy = _numpy_completion_logps(prepared.state.model(), batch, 8)
    ref = _numpy_completion_logps(reference, batch, 8)
    chosen = batch["chosen"].reshape(-1, 2)
    side = lambda v: ((v.reshape(-1, 2) * chosen).sum(1), (v.reshape(-1, 2) * (1 - chosen)).sum(1))
    (pc, pr), (rc, rr) = side(policy), side(ref)
    h = (pc - rc) - (pr - rr)
    pairs = batch["pair_mask"].reshape(-1, 2)[:, 0]
    expected = np.sum(np.log1p(np.exp(-0.5 * h)) * pairs)
    np.testing.assert_allclose(float(out.numerator), expected, rtol=2e-4, atol=1e-6)
    assert float(out.denominator) == pairs.sum()
    assert 0 <= metrics["pairs_tied_frac"] <= 1


def test_online_dpo_resumes_exactly_with_a_reward_model(tmp_path, tiny_dir):
    rm_dir = str(tmp_path / "rm")
    save_classifier(init_classifier(TINY, seed=3), rm_dir)
    extra = {"online_dpo.reward_model": rm_dir, "online_dpo.rewards": "[]",
             "train.max_steps": 3}
    full = str(tmp_path / "full")
    run(load_config(ONLINE_DPO_TINY, _overrides(full, tiny_dir, **extra)))
    resumed = str(tmp_path / "resumed")
    config = load_config(ONLINE_DPO_TINY, _overrides(resumed, tiny_dir, **extra))
    assert run(config, stop_after_step=2).preempted
    run(config)
    a, b = train_rows(full), train_rows(resumed)
    assert [r["step"] for r in b] == [1, 2, 3]
    for key in ("loss", "grad_norm", "rewards/margins", "pairs_tied_frac", "reward"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    with pytest.raises(ConfigError, match="must be even"):
        load_config(ONLINE_DPO_TINY, _overrides(str(tmp_path / "x"), tiny_dir,
                                                **{"train.batch_size": 7}))
    with pytest.raises(ConfigError, match="nothing ranks the pairs"):
        load_config(ONLINE_DPO_TINY, _overrides(str(tmp_path / "x"), tiny_dir,
                                                **{"online_dpo.rewards": "[]"}))
