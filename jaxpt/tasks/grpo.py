"""GRPO with verifiable rewards (and its variants: Dr. GRPO, DAPO, GSPO, CISPO).

Rollouts come from ``jaxpt.tasks.rl.source.RolloutSource``: ``num_generations`` completions
per prompt sampled on the training mesh with the current weights and scored by the reward
functions. GRPO turns rewards into group-relative advantages and updates the policy with
the clipped-ratio objective against the rollout policy's log-probs for ``num_iterations``
optimizer steps per rollout.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.config import ConfigError
from jaxpt.losses import (
    ADVANTAGE_ESTIMATORS,
    LOSS_TYPES,
    aggregate_token_loss,
    entropy_from_logits,
    estimate_advantages,
    has_reward_spread,
    policy_gradient_loss,
    token_logprobs,
)
from jaxpt.losses.chunked import token_stats
from jaxpt.losses.policy import IMPORTANCE_LEVELS, importance_weights
from jaxpt.sampling.api import SAMPLERS
from jaxpt.state import reference_model
from jaxpt.step import LossOutput, StepContext
from jaxpt.tasks import common
from jaxpt.tasks.base import BuiltModel, RunContext, Task
from jaxpt.tasks.rl.batch import Rollout, completion_window, shares_prompts, train_batch
from jaxpt.tasks.rl.evaluator import accuracy_evaluator
from jaxpt.tasks.rl.forward import completion_hidden
from jaxpt.tasks.rl.program import RolloutProgram
from jaxpt.tasks.rl.replay import add_routing_spec, routing_shape
from jaxpt.tasks.rl.rewards import (
    RewardSpec,
    check_reward_settings,
    reward_model_spec,
    reward_specs,
)
from jaxpt.tasks.rl.source import RolloutSource, prompt_rows

__all__ = ["TASK", "GrpoConfig", "RewardSpec", "grpo_loss", "make_batch", "reward_specs"]

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    num_generations: int = 4  # completions per prompt; train.batch_size counts completions
    num_iterations: int = 1  # optimizer steps per rollout batch (mu)
    max_prompt_length: int = 128  # longer prompts keep their end
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    # Rollout sampler: auto (see jaxpt.sampling.api.choose_sampler) | paged | static
    sampler: str = "auto"
    # Serve the live policy over HTTP on this port (0: any free one) during the run, for
    # environments and judges (JAXPT_POLICY_URL); null: no server
    serve_port: int | None = None
    beta: float = 0.0  # k3 KL to the frozen reference; 0 keeps no reference in memory
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: epsilon_low; DAPO's clip-higher uses 0.28
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo
    importance_level: str = "token"  # token | sequence (GSPO)
    scale_rewards: bool = True  # grpo estimator: divide by the group std (off for Dr. GRPO)
    # grpo: group-normalised | rloo: leave-one-out baseline | reinforce_pp: group mean off,
    # then whitened over the batch's trained tokens (REINFORCE++-baseline)
    advantage_estimator: str = "grpo"
    mask_truncated_completions: bool = False
    share_prompt_forward: bool = True  # run each group's prompt once in the loss forward
    missing_eos_penalty: float = 0.0  # subtracted from the reward of completions cut at the limit
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    max_sampling_rounds: int = 1  # with dynamic_sampling: rollouts per step to fill the batch
    rewards: list[RewardSpec] = dataclasses.field(
        default_factory=lambda: [RewardSpec(name="math")]
    )
    # A reward model dir (`task: rm` or `task: prm` exports) whose score is added to the
    # total with this weight (a process reward model gives its steps' aggregate)
    reward_model: str | None = None
    reward_model_weight: float = 1.0
    # A reward function failing (raising, a wrong count, a non-number) on more than this
    # share of a rollout's completions stops the run; fewer failures score 0 and are counted.
    max_reward_error_frac: float = 0.5
    log_completions: int = 2  # completions per step appended to completions.jsonl
    eval_prompts: int = 128  # held-out prompts for greedy accuracy (0: no eval)
    eval_reward: str = "math"  # scores eval completions (1.0 = correct): a built-in or import path
    eval_max_new_tokens: int | None = None  # greedy eval budget; None: max_completion_length

    def __post_init__(self):
        def fail(key, why):
            raise ConfigError(f"config key 'grpo.{key}' {why}")

        if self.loss_type not in LOSS_TYPES:
            fail("loss_type", f"must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_level not in IMPORTANCE_LEVELS:
            fail("importance_level",
                 f"must be one of {IMPORTANCE_LEVELS}, got {self.importance_level!r}")
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            fail("advantage_estimator",
                 f"must be one of {ADVANTAGE_ESTIMATORS}, got {self.advantage_estimator!r}")
        if self.advantage_estimator == "rloo" and self.num_generations < 2:
            fail("advantage_estimator", "rloo's leave-one-out baseline needs "
                 f"'grpo.num_generations' >= 2, got {self.num_generations}")
        for key in ("num_generations", "num_iterations", "max_prompt_length",
                    "max_completion_length", "max_sampling_rounds"):
            if getattr(self, key) < 1:
                fail(key, f"must be >= 1, got {getattr(self, key)}")
        if self.temperature <= 0:
            fail("temperature", f"must be > 0 (rollouts sample), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            fail("top_k", f"must be >= 1 or null, got {self.top_k}")
        if self.sampler not in SAMPLERS:
            fail("sampler", f"must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        if self.beta < 0:
            fail("beta", f"must be >= 0, got {self.beta}")
        if self.epsilon_low < 0 or (self.epsilon_high is not None and self.epsilon_high < 0):
            fail("epsilon_low", "and 'grpo.epsilon_high' must be >= 0")
        if self.missing_eos_penalty < 0:
            fail("missing_eos_penalty", f"must be >= 0, got {self.missing_eos_penalty}")
        if self.eval_max_new_tokens is not None and self.eval_max_new_tokens < 1:
            fail("eval_max_new_tokens", f"must be >= 1 or null, got {self.eval_max_new_tokens}")
        if self.log_completions < 0 or self.eval_prompts < 0:
            fail("log_completions", "and 'grpo.eval_prompts' must be >= 0")
        if not 0 <= self.max_reward_error_frac <= 1:
            fail("max_reward_error_frac", f"must be in [0, 1], got {self.max_reward_error_frac}")
        if self.max_sampling_rounds > 1 and not self.dynamic_sampling:
            fail("max_sampling_rounds", "fills the batch with groups that have reward spread: "
                 "it needs 'grpo.dynamic_sampling: true'")


# ------------------------------------------------------------------------------ the loss


def completion_logprobs(m, batch: dict, cfg: GrpoConfig, logits_chunk_size: int = 0,
                        with_entropy: bool = False, replay: bool = True):
    """Log-probs [B, Lc] of the completion tokens under ``m`` at the sampling temperature
    (and their entropy, or None). The LM head runs only where targets are completion
    tokens: prompt positions would cost [B, Lp, vocab] of logits the loss never reads;
    ``logits_chunk_size`` > 0 runs it that many positions at a time (same values).
    ``replay``: route the tokens to the experts the batch's ``routing`` holds, when it has
    one (``rl.routing_replay``: the policy's forwards; a reference's routes itself)."""
    window = completion_window(batch["input_ids"].shape[1], cfg.max_completion_length)
    group = cfg.num_generations if cfg.share_prompt_forward else 1
    targets_bt = batch["target_ids"][:, window]
    hidden_btd = completion_hidden(m, batch, cfg.max_completion_length, group,
                                   batch.get("routing") if replay else None)
    if logits_chunk_size:
        stats = token_stats(
            lambda h: m.logits(h) / cfg.temperature, hidden_btd, targets_bt,
            logits_chunk_size, with_entropy=with_entropy,
        )
        return stats.logprobs, stats.entropy if with_entropy else None
    logits_btv = m.logits(hidden_btd) / cfg.temperature
    entropy_bt = entropy_from_logits(logits_btv) if with_entropy else None
    return token_logprobs(logits_btv, targets_bt), entropy_bt


def reference_logprobs(model, ref_params, batch: dict, cfg: GrpoConfig,
                       logits_chunk_size: int = 0):
    """The frozen reference's completion log-probs [B, Lc] (no gradients flow)."""
    ref_model = reference_model(model, ref_params)
    logp_bt, _ = completion_logprobs(ref_model, batch, cfg, logits_chunk_size, replay=False)
    return jax.lax.stop_gradient(logp_bt)


def grpo_loss(
    model, batch: dict, ctx: StepContext, *, cfg: GrpoConfig, logits_chunk_size: int = 0,
    importance_correction: str = "none", importance_cap: float = 2.0,
) -> LossOutput:
    """Clipped policy-gradient loss (+ beta * k3 KL) aggregated per ``cfg.loss_type``.

    The policy is ``softmax(logits / temperature)`` over the whole vocabulary, and
    ``old_logprobs`` are that policy's log-probs when the rollout was sampled
    (``SampleArrays.policy_logprobs_bn``), so the first iteration's ratio is 1 up to float
    rounding. They are not the log-probs of the distribution the tokens were drawn from:
    top-k, top-p, min-p and a repetition penalty only choose which tokens are drawn; they
    are no part of the trained policy (as in TRL and verl) and that gap is not
    importance-corrected.
    With ``importance_correction`` (``rl.importance_correction``: tis or mis) the batch also
    carries the trainer's own log-probs of the rollout before any update
    (``trainer_logprobs``, ``LogprobFinisher``): they are the ratio's old side, and each
    token's loss is weighed by ``importance_weights`` of the trainer over the sampler.
    ``logits_chunk_size`` > 0 runs the LM head that many positions at a time (same values).
    The reference log-probs come with the batch when a rollout is reused
    (``LogprobFinisher``), else the reference forward runs here.
    """
    window = completion_window(batch["input_ids"].shape[1], cfg.max_completion_length)
    logp_bt, entropy_bt = completion_logprobs(
        model, batch, cfg, logits_chunk_size, with_entropy=True
    )
    mask_bt = batch["completion_mask"][:, window]
    old_logp_bt, weights_bt, correction_metrics = batch["old_logprobs"][:, window], None, {}
    if importance_correction != "none":
        sampler_logp_bt, old_logp_bt = old_logp_bt, batch["trainer_logprobs"]
        weights_bt, correction_metrics = importance_weights(
            old_logp_bt, sampler_logp_bt, mask_bt, importance_correction, importance_cap
        )
    ref_logp_bt = None
    if cfg.beta:
        ref_logp_bt = batch.get("ref_logprobs")
        if ref_logp_bt is None:
            ref_logp_bt = reference_logprobs(
                model, ctx.ref_params, batch, cfg, logits_chunk_size
            )
    loss_bt, token_metrics = policy_gradient_loss(
        logp_bt, old_logp_bt, batch["advantages"], mask_bt,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon_low,
        importance_level=cfg.importance_level, ref_logp_bt=ref_logp_bt, beta=cfg.beta,
        objective="cispo" if cfg.loss_type == "cispo" else "clip", weights_bt=weights_bt,
    )
    token_metrics.update(correction_metrics)
    aggregate = functools.partial(
        aggregate_token_loss, mask_bt=mask_bt, loss_type=cfg.loss_type,
        max_completion_length=cfg.max_completion_length,
    )
    numerator, denominator = aggregate(loss_bt)
    token_metrics["entropy"] = jax.lax.stop_gradient(entropy_bt)
    # Metrics aggregate like the loss, so "sum / denominator" is their mean in its unit.
    metrics = {name: aggregate(value)[0] for name, value in token_metrics.items()}
    return LossOutput(
        numerator=numerator,
        denominator=jax.lax.stop_gradient(denominator),
        metrics=metrics,
        totals={"completion_tokens": jnp.sum(mask_bt)},
    )


def make_loss(ctx: RunContext):
    rl = ctx.config.rl
    return functools.partial(
        grpo_loss, cfg=ctx.task_config, logits_chunk_size=ctx.config.train.logits_chunk_size,
        importance_correction=rl.importance_correction, importance_cap=rl.importance_cap,
    )


# --------------------------------------------------------------------------- building


def check_config(config) -> None:
    """Load-time checks that need more than the ``grpo`` section: a ConfigError naming the
    key before any model or data is loaded."""
    cfg = config.grpo
    if config.train.batch_size % cfg.num_generations:
        raise ConfigError(
            f"config key 'train.batch_size' ({config.train.batch_size}) counts completions and "
            f"must be divisible by 'grpo.num_generations' ({cfg.num_generations})"
        )
    if not cfg.rewards and cfg.reward_model is None and not config.envs.enabled():
        raise ConfigError("config key 'grpo.rewards' needs at least one reward function (or a "
                          "'grpo.reward_model', or an environment in 'envs' that rewards)")
    if cfg.reward_model is not None:
        common.check_model_path("grpo.reward_model", cfg.reward_model)
    check_reward_settings("grpo", cfg)
    from jaxpt.tasks.rl.episodes import check_envs  # envs load tools: only when checking

    check_envs(config)
    routing_shape(config)


def uses_reference(config) -> bool:
    """Only the KL term (``beta > 0``) needs the reference."""
    return config.grpo.beta > 0


def build(ctx: RunContext) -> BuiltModel:
    """The policy; with ``beta > 0`` also a frozen copy of its params as the reference
    (none under LoRA: the reference is the policy with its adapters off)."""
    model = common.build_causal_lm(ctx)
    if not uses_reference(ctx.config):
        return BuiltModel(model)
    return BuiltModel(model, ref_params=common.reference_params(ctx, model))


def _penalized_rewards_pg(rollout: Rollout, cfg: GrpoConfig) -> np.ndarray:
    """Rewards [P, G] after the missing-EOS penalty."""
    # Completions that never ended pay the penalty: a reply that rambles past the budget
    # should not score like one that stops after its answer.
    rewards_b = rollout.rewards.total - cfg.missing_eos_penalty * rollout.truncated
    return rewards_b.reshape(rollout.num_prompts, cfg.num_generations)


def groups_with_spread(rollout: Rollout, cfg: GrpoConfig) -> np.ndarray:
    """[P] bool: the prompts whose completions' rewards differ (dynamic sampling's filter)."""
    return np.asarray(has_reward_spread(jnp.asarray(_penalized_rewards_pg(rollout, cfg))))


def make_batch(rollout: Rollout, cfg: GrpoConfig):
    """Group-relative advantages of a rollout and its train rows (GRPO's ``make_batch``)."""
    g = cfg.num_generations
    if rollout.tokens.shape[1] != cfg.max_completion_length:  # the loss's completion window
        raise ValueError(
            f"rollout completions are {rollout.tokens.shape[1]} wide, expected "
            f"grpo.max_completion_length={cfg.max_completion_length}"
        )
    spread_p = groups_with_spread(rollout, cfg)
    keep_b = np.ones(len(rollout.lengths), bool)
    if cfg.dynamic_sampling:
        keep_b &= np.repeat(spread_p, g)
    if cfg.mask_truncated_completions:
        keep_b &= ~rollout.truncated
    # REINFORCE++ whitens over the tokens the loss trains on: the kept rows' lengths.
    tokens_pg = (rollout.lengths * keep_b).reshape(rollout.num_prompts, g)
    advantages_pg, _ = estimate_advantages(
        jnp.asarray(_penalized_rewards_pg(rollout, cfg)), cfg.advantage_estimator,
        scale_by_std=cfg.scale_rewards, weights_pg=jnp.asarray(tokens_pg),
    )
    advantages_b = np.asarray(advantages_pg).reshape(-1)
    metrics = {"groups_with_spread_frac": float(np.mean(spread_p))}
    batch = train_batch(rollout, advantages_b, keep_b)
    if cfg.share_prompt_forward and not shares_prompts(batch, cfg.max_completion_length, g):
        raise ValueError("grpo.share_prompt_forward needs each group's rows to share a prompt")
    return batch, metrics, advantages_b


def carries_reference_logprobs(cfg: GrpoConfig) -> bool:
    """Whether each rollout's batch carries its reference log-probs (``LogprobFinisher``):
    when a KL term meets a rollout reused for several optimizer steps."""
    return cfg.num_iterations > 1 and cfg.beta > 0


def carries_trainer_logprobs(config) -> bool:
    """Whether each rollout's batch carries the trainer's log-probs of it
    (``rl.importance_correction``)."""
    return config.rl.importance_correction != "none"


class LogprobFinisher:
    """Adds log-probs of a rollout's completions [B, Lc] to its batch, once per rollout, on
    device, without gradients, with the weights that sampled it: the reference's
    (``ref_logprobs``: with ``num_iterations`` > 1 the batch trains that many optimizer steps
    against the same frozen reference, so computing them inside every update would repeat
    one forward per reuse) and the trainer's own (``trainer_logprobs``: the old policy of an
    importance-corrected loss, as the trainer computes it)."""

    def __init__(self, ctx: RunContext, cfg: GrpoConfig):
        chunk = ctx.config.train.logits_chunk_size
        reference, trainer = carries_reference_logprobs(cfg), carries_trainer_logprobs(ctx.config)

        def logprobs(state, device_batch):
            out = {}
            if reference:
                out["ref_logprobs"] = reference_logprobs(
                    state.model(), state.ref_params, device_batch, cfg, chunk
                )
            if trainer:
                out["trainer_logprobs"] = completion_logprobs(
                    state.model(), device_batch, cfg, chunk
                )[0]
            return out

        self._logprobs = RolloutProgram(ctx, logprobs)

    def get_state(self) -> dict:
        return {}

    def set_state(self, state: dict) -> None:
        pass

    def __call__(self, state, batch: dict):
        return {**batch, **self._logprobs(state, batch)}, {}, batch["advantages"]


def make_train_source(ctx: RunContext) -> RolloutSource:
    cfg = ctx.task_config
    rewards = reward_specs(cfg)
    if cfg.reward_model is not None:
        rewards.append(reward_model_spec(ctx, cfg.reward_model, cfg.reward_model_weight))
    return RolloutSource(
        ctx, prompt_rows(ctx, "train"), make_batch=functools.partial(make_batch, cfg=cfg),
        samples_per_prompt=cfg.num_generations, max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, sampler=cfg.sampler, serve_port=cfg.serve_port,
        rewards=rewards,
        reuse=cfg.num_iterations,
        log_completions=cfg.log_completions,
        group_filter=(functools.partial(groups_with_spread, cfg=cfg)
                      if cfg.dynamic_sampling and cfg.max_sampling_rounds > 1 else None),
        max_rounds=cfg.max_sampling_rounds,
        finish=(LogprobFinisher(ctx, cfg)
                if carries_reference_logprobs(cfg) or carries_trainer_logprobs(ctx.config)
                else None),
        max_reward_error_frac=cfg.max_reward_error_frac,
        episodes=ctx.config.envs.enabled(),
    )


def make_evaluator(ctx: RunContext):
    """Greedy held-out accuracy (``eval_accuracy``) on prompts with an ``answer`` column."""
    return accuracy_evaluator(ctx, ctx.task_config)


def batch_spec(config) -> dict:
    """A train batch (``train_batch`` of a rollout): ``train.batch_size`` completions, each row
    its prompt left-padded to ``max_prompt_length`` then ``max_completion_length`` tokens;
    with a reused rollout and a KL term also the reference's completion log-probs, with an
    importance correction the trainer's (``LogprobFinisher``)."""
    cfg = config.grpo
    b, lc = config.train.batch_size, cfg.max_completion_length
    rows = (b, cfg.max_prompt_length + lc)
    spec = {k: (rows, np.int32) for k in ("input_ids", "positions", "segment_ids", "target_ids")}
    spec.update({k: (rows, np.float32) for k in ("completion_mask", "old_logprobs")})
    spec["advantages"] = ((b,), np.float32)
    if carries_reference_logprobs(cfg):  # then the step runs no reference forward
        spec["ref_logprobs"] = ((b, lc), np.float32)
    if carries_trainer_logprobs(config):
        spec["trainer_logprobs"] = ((b, lc), np.float32)
    return add_routing_spec(spec, config)


TASK = Task(
    name="grpo",
    description="GRPO / Dr. GRPO / DAPO / GSPO / CISPO with verifiable rewards (on-policy "
    "rollouts)",
    config_cls=GrpoConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=make_train_source,
    make_evaluator=make_evaluator,
    export=common.export_causal_lm,
    check_config=check_config,
    uses_reference=uses_reference,
    batch_spec=batch_spec,
    build_abstract=common.abstract_causal_lm,
)
