"""The first optimizer step on a rollout is on-policy: GRPO's and PPO's importance ratio is 1
and nothing is clipped, whatever filters the sampler drew the tokens with (top-k, top-p,
min-p, a repetition penalty). The old log-probs are the loss's own policy,
``log_softmax(logits / temperature)``, not the filtered distribution."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpt.config import load_config
from jaxpt.loop import setup
from jaxpt.step import StepContext, put_batch
from jaxpt.tasks import grpo, ppo
from jaxpt.tasks.rl.batch import completion_window

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPERATURE = 0.7  # not 1: the old log-probs must be divided by it, as the loss divides
LC = 8
# Each filter alone moves the sampled distribution away from the policy the loss computes.
FILTERS = {
    "top_k": {"top_k": 3},
    "top_p": {"top_p": 0.5},
    "min_p": {"min_p": 0.5},
    "repetition_penalty": {"repetition_penalty": 3.0},
}
# Float rounding only: the sampler's decode step and the loss's teacher-forced forward are
# the same float32 math in another order. A filter's renormalisation moves a log-prob by
# far more (top-k 3 of 128 tokens: log(3/128), about 3.8).
RATIO_TOL = 1e-5


def spread_reward(prompts, completions, **kwargs):
    """Rewards that differ within a group, so the advantages are not all zero."""
    return [float(len(set(text)) % 3) for text in completions]


def _overrides(task, output_dir, model_path, prompts, **extra):
    values = {
        "output_dir": output_dir, "model.path": model_path, "data.train": prompts,
        "data.eval": "null", "train.batch_size": 8, "logging.progress": "false",
        "logging.tensorboard": "false", f"{task}.max_prompt_length": 16,
        f"{task}.max_completion_length": LC, f"{task}.temperature": TEMPERATURE,
        f"{task}.rewards": "[{fn: 'test_rl_ratio:spread_reward'}]", f"{task}.eval_prompts": 0,
        f"{task}.log_completions": 0,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory, tiny_dir, prompts_file, mesh1):
    out = str(tmp_path_factory.mktemp("grpo_ratio"))
    config = load_config(os.path.join(ROOT, "configs", "grpo_arith.yaml"), _overrides(
        "grpo", out, tiny_dir, prompts_file, **{"grpo.num_generations": 4}))
    with setup(config, mesh=mesh1) as run:
        yield run


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory, tiny_dir, prompts_file, mesh1):
    out = str(tmp_path_factory.mktemp("ppo_ratio"))
    config = load_config(os.path.join(ROOT, "configs", "ppo_arith.yaml"), _overrides(
        "ppo", out, tiny_dir, prompts_file, **{
            "ppo.samples_per_prompt": 4, "ppo.num_mini_batches": 1, "ppo.critic": "shared",
            "ppo.kl_coef": 0.0}))
    with setup(config, mesh=mesh1) as run:
        yield run


def _grpo_stats(state, batch, cfg, chunk):
    model = state.model()
    logp_bt, _ = grpo.completion_logprobs(model, batch, cfg, chunk)
    out = grpo.grpo_loss(model, batch, StepContext(jax.random.key(0), jnp.int32(0)), cfg=cfg,
                         logits_chunk_size=chunk)
    return logp_bt, out.metrics["clip_low"] + out.metrics["clip_high"]


def _ppo_stats(state, batch, cfg, chunk):
    model = state.model()
    logp_bt = ppo._policy_stats(model.policy, batch, cfg, chunk, False)[1].logprobs
    out = ppo.ppo_loss(model, batch, StepContext(jax.random.key(0), jnp.int32(0)), cfg=cfg,
                       logits_chunk_size=chunk)
    return logp_bt, out.metrics["clipfrac"]


_JITTED: dict = {}  # one compiled stats program per run


def _stats(run):
    if id(run) not in _JITTED:
        fn = {"grpo": _grpo_stats, "ppo": _ppo_stats}[run.task.name]
        cfg, chunk = run.ctx.task_config, run.config.train.logits_chunk_size
        _JITTED[id(run)] = jax.jit(lambda state, batch: fn(state, batch, cfg, chunk))
    return _JITTED[id(run)]


def _first_iteration(run, filters):
    """Per-token ratios of the first optimizer step on a fresh rollout sampled with
    ``filters``, its completion mask, and the loss's clipped-token count."""
    source, cfg = run.source, run.ctx.task_config
    base = dataclasses.replace(source.sampler.sampling, top_k=None, top_p=None, min_p=None,
                               repetition_penalty=None)
    source.sampler.sampling = dataclasses.replace(base, **filters)
    source.pending = None  # sample a new rollout rather than reuse one
    with run.activate():
        batch, _ = source.next(run.state)
        device_batch = put_batch(batch, run.mesh)
        logp_bt, clipped = _stats(run)(run.state, device_batch)
    window = completion_window(batch["input_ids"].shape[1], cfg.max_completion_length)
    mask_bt = batch["completion_mask"][:, window] > 0
    ratio_bt = np.exp(np.asarray(logp_bt) - batch["old_logprobs"][:, window])
    return ratio_bt, mask_bt, float(clipped)


@pytest.mark.parametrize("filters", FILTERS.values(), ids=FILTERS.keys())
@pytest.mark.parametrize("task", ["grpo", "ppo"])
def test_first_iteration_ratio_is_one_whatever_the_sampling_filters(
    task, filters, grpo_run, ppo_run
):
    run = {"grpo": grpo_run, "ppo": ppo_run}[task]
    assert run.ctx.task_config.temperature == TEMPERATURE
    ratio_bt, mask_bt, clipped = _first_iteration(run, filters)
    assert mask_bt.sum() >= 8  # sampled tokens to compare
    deviation = np.abs(ratio_bt - 1.0)[mask_bt]
    assert deviation.max() < RATIO_TOL, (filters, deviation.max())
    assert clipped == 0.0
