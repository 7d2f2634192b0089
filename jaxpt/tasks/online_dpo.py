"""Online DPO (Guo et al. 2024): DPO on pairs the policy samples itself each step.

Each prompt gets two completions from the current policy (the RL tasks' rollouts); the
reward functions (a verifier such as ``math``, a judge) and/or a reward model
(``online_dpo.reward_model``) rank them, the better one is chosen, and the DPO loss
(sigmoid, IPO or hinge) trains on the pair against the frozen reference. A pair whose two
completions score the same teaches nothing and is masked (``pairs_tied_frac``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.config import ConfigError
from jaxpt.losses import dpo_loss, token_logprobs
from jaxpt.losses.chunked import token_stats
from jaxpt.losses.preference import REFERENCE_LOSS_TYPES
from jaxpt.sampling.api import SAMPLERS
from jaxpt.state import reference_model
from jaxpt.step import LossOutput, StepContext
from jaxpt.tasks import _preference as pref
from jaxpt.tasks import common
from jaxpt.tasks.base import BuiltModel, RunContext, Task
from jaxpt.tasks.rl.batch import Rollout, completion_window, sequence_rows
from jaxpt.tasks.rl.evaluator import accuracy_evaluator
from jaxpt.tasks.rl.forward import completion_hidden
from jaxpt.tasks.rl.rewards import (
    RewardSpec,
    check_reward_settings,
    reward_model_spec,
    reward_specs,
)
from jaxpt.tasks.rl.source import RolloutSource, prompt_rows


@dataclasses.dataclass(frozen=True)
class OnlineDpoConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge
    ref_model: str | None = None  # None: the policy's initial weights
    max_prompt_length: int = 128
    max_completion_length: int = 64
    temperature: float = 1.0  # sampling only: the loss's log-probs are the policy's own
    top_p: float = 1.0
    top_k: int | None = None
    # Rollout sampler: auto (see jaxpt.sampling.api.choose_sampler) | paged | static
    sampler: str = "auto"
    reward_model: str | None = None  # a reward model dir (what `task: rm` exports)
    reward_model_weight: float = 1.0
    rewards: list[RewardSpec] = dataclasses.field(default_factory=list)
    max_reward_error_frac: float = 0.5
    missing_eos_penalty: float = 0.0  # subtracted from the score of completions cut at the limit
    log_completions: int = 2
    eval_prompts: int = 128  # held-out prompts for greedy accuracy (0: no eval)
    eval_reward: str = "math"
    eval_max_new_tokens: int | None = None

    def __post_init__(self):
        def fail(key, why):
            raise ConfigError(f"config key 'online_dpo.{key}' {why}")

        if self.loss_type not in REFERENCE_LOSS_TYPES:
            fail("loss_type", f"must be one of {REFERENCE_LOSS_TYPES}, got {self.loss_type!r}")
        if self.beta <= 0:
            fail("beta", f"must be > 0, got {self.beta}")
        if self.temperature <= 0:
            fail("temperature", f"must be > 0 (pairs are sampled), got {self.temperature}")
        if self.sampler not in SAMPLERS:
            fail("sampler", f"must be one of {list(SAMPLERS)}, got {self.sampler!r}")


# ------------------------------------------------------------------------------ the loss


def completion_logps(model, batch: dict, max_completion_length: int,
                     logits_chunk_size: int = 0):
    """Sequence log-probs [B] of each row's completion under ``model`` (temperature 1),
    each pair's prompt run once (``completion_hidden`` with groups of 2)."""
    window = completion_window(batch["input_ids"].shape[1], max_completion_length)
    hidden_btd = completion_hidden(model, batch, max_completion_length, group=2)
    targets_bt = batch["target_ids"][:, window]
    if logits_chunk_size:
        logp_bt = token_stats(model.logits, hidden_btd, targets_bt, logits_chunk_size).logprobs
    else:
        logp_bt = token_logprobs(model.logits(hidden_btd), targets_bt)
    return jnp.sum(logp_bt * batch["completion_mask"][:, window], axis=-1)


def online_dpo_loss(model, batch: dict, ctx: StepContext, *, cfg: OnlineDpoConfig,
                    logits_chunk_size: int = 0) -> LossOutput:
    """DPO on the sampled pairs (rows 2p and 2p + 1), summed over untied pairs / their
    number."""
    lc = cfg.max_completion_length
    policy_b = completion_logps(model, batch, lc, logits_chunk_size)
    ref_b = jax.lax.stop_gradient(completion_logps(
        reference_model(model, ctx.ref_params), batch, lc, logits_chunk_size))
    chosen_p2 = batch["chosen"].reshape(-1, 2)

    def sides(values_b):
        values_p2 = values_b.reshape(-1, 2)
        return (jnp.sum(values_p2 * chosen_p2, -1), jnp.sum(values_p2 * (1 - chosen_p2), -1))

    loss_p, metrics_p = dpo_loss(*sides(policy_b), *sides(ref_b), beta=cfg.beta,
                                 loss_type=cfg.loss_type)
    return pref.pair_sums(loss_p, metrics_p, batch["pair_mask"].reshape(-1, 2)[:, 0])


def make_loss(ctx: RunContext):
    return functools.partial(online_dpo_loss, cfg=ctx.task_config,
                             logits_chunk_size=ctx.config.train.logits_chunk_size)


# --------------------------------------------------------------------------- building


def make_batch(rollout: Rollout, cfg: OnlineDpoConfig):
    """Each prompt's two completions as a pair: ``chosen`` [B] marks the better-scored row,
    ``pair_mask`` [B] is 0 on both rows of a tie."""
    scores_p2 = (rollout.rewards.total - cfg.missing_eos_penalty * rollout.truncated).reshape(
        rollout.num_prompts, 2)
    chosen_p2 = np.zeros_like(scores_p2, dtype=np.float32)
    chosen_p2[np.arange(len(scores_p2)), np.argmax(scores_p2, axis=1)] = 1.0
    untied_p = scores_p2[:, 0] != scores_p2[:, 1]
    batch = sequence_rows(rollout)
    batch["chosen"] = chosen_p2.reshape(-1)
    batch["pair_mask"] = np.repeat(untied_p, 2).astype(np.float32)
    margin_b = np.repeat(np.abs(scores_p2[:, 0] - scores_p2[:, 1]), 2)
    metrics = {"pairs_tied_frac": float(1 - untied_p.mean()),
               "score_margin": float(margin_b[::2][untied_p].mean()) if untied_p.any() else 0.0}
    return batch, metrics, (2 * chosen_p2.reshape(-1) - 1) * np.repeat(untied_p, 2)


def check_config(config) -> None:
    if config.train.batch_size % 2:
        raise ConfigError(
            f"config key 'train.batch_size' ({config.train.batch_size}) counts completions, "
            "two per prompt: it must be even"
        )
    cfg = config.online_dpo
    if not cfg.rewards and cfg.reward_model is None:
        raise ConfigError("config keys 'online_dpo.rewards' and 'online_dpo.reward_model' are "
                          "both empty: nothing ranks the pairs")
    check_reward_settings("online_dpo", cfg)


def build(ctx: RunContext) -> BuiltModel:
    """The policy and its frozen reference (none under LoRA: the adapters off)."""
    model = common.build_causal_lm(ctx)
    ref = common.reference_params(ctx, model, ctx.task_config.ref_model, "online_dpo.ref_model")
    return BuiltModel(model, ref_params=ref)


def make_train_source(ctx: RunContext) -> RolloutSource:
    cfg = ctx.task_config
    rewards = reward_specs(cfg)
    if cfg.reward_model is not None:
        rewards.append(reward_model_spec(ctx, cfg.reward_model, cfg.reward_model_weight))
    return RolloutSource(
        ctx, prompt_rows(ctx, "train"), make_batch=functools.partial(make_batch, cfg=cfg),
        samples_per_prompt=2, max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, sampler=cfg.sampler, rewards=rewards,
        log_completions=cfg.log_completions, max_reward_error_frac=cfg.max_reward_error_frac,
    )


def make_evaluator(ctx: RunContext):
    """Greedy held-out accuracy (``eval_accuracy``) on prompts with an ``answer`` column."""
    return accuracy_evaluator(ctx, ctx.task_config)


def batch_spec(config) -> dict:
    """A train batch: ``train.batch_size`` rows (two per prompt), each its prompt
    left-padded to ``max_prompt_length`` then ``max_completion_length`` tokens, with
    ``chosen`` and ``pair_mask`` per row."""
    cfg = config.online_dpo
    b = config.train.batch_size
    rows = (b, cfg.max_prompt_length + cfg.max_completion_length)
    spec = {k: (rows, np.int32) for k in ("input_ids", "positions", "segment_ids", "target_ids")}
    spec["completion_mask"] = (rows, np.float32)
    spec.update(chosen=((b,), np.float32), pair_mask=((b,), np.float32))
    return spec


TASK = Task(
    name="online_dpo",
    description="online DPO: pairs sampled from the policy each step, ranked by rewards or "
    "a reward model",
    config_cls=OnlineDpoConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=make_train_source,
    make_evaluator=make_evaluator,
    export=common.export_causal_lm,
    check_config=check_config,
    uses_reference=lambda config: True,
    batch_spec=batch_spec,
    build_abstract=common.abstract_causal_lm,
)
