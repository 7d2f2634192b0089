"""PPO for RLHF: a policy, a critic, a frozen reference, and rewards from a reward model
and/or reward functions (InstructGPT's recipe, as TRL's original PPOTrainer, OpenRLHF and
verl run it).

Each rollout (``jaxpt.tasks.rl.source.RolloutSource``) samples ``samples_per_prompt``
completions of ``train.batch_size * num_mini_batches / samples_per_prompt`` prompts with the
current policy and scores them. ``PpoFinisher`` then completes the batch on device, once per
rollout and without gradients: the reference's log-probs, the critic's values, per-token
rewards with the KL penalty (``losses.ppo.token_rewards``), GAE advantages and returns, and
whitened advantages. The rollout is trained on for ``num_ppo_epochs`` passes of
``num_mini_batches`` minibatches, one optimizer step each, with the clipped policy loss plus
``vf_coef`` times the clipped value loss. An adaptive KL controller moves ``kl_coef``
towards ``kl_target`` between rollouts; its state is checkpointed with the data's, so a
resumed run continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.config import ConfigError
from jaxpt.losses import aggregate_token_loss
from jaxpt.losses.chunked import token_stats
from jaxpt.losses.policy import importance_weights, policy_gradient_loss
from jaxpt.losses.ppo import (
    KL_CONTROLLERS,
    KL_ESTIMATORS,
    clipped_value_loss,
    explained_variance,
    gae_advantages,
    token_rewards,
    whiten,
)
from jaxpt.state import reference_model
from jaxpt.step import LossOutput, StepContext
from jaxpt.tasks import common
from jaxpt.tasks.base import BuiltModel, RunContext, Task
from jaxpt.tasks.rl.batch import Rollout, completion_window, train_batch
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

CRITIC_KINDS = ("separate", "shared")
KL_PENALTIES = ("reward", "loss")
LOSS_AGGREGATIONS = {"token_mean": "dapo", "sequence_mean": "grpo"}


@dataclasses.dataclass(frozen=True)
class PpoConfig:
    samples_per_prompt: int = 1  # completions per prompt in a rollout
    num_mini_batches: int = 1  # a rollout is train.batch_size * num_mini_batches completions
    num_ppo_epochs: int = 4  # passes over each rollout (one optimizer step per minibatch)
    max_prompt_length: int = 128
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    # Rollout sampler: auto (see jaxpt.sampling.api.choose_sampler) | paged | static
    sampler: str = "auto"
    # Serve the live policy over HTTP on this port (0: any free one) during the run, for
    # environments and judges (JAXPT_POLICY_URL); null: no server
    serve_port: int | None = None
    # The KL to the reference: in the reward (-kl_coef * kl per token, InstructGPT) or in
    # the loss (+kl_coef * k3 per token, as GRPO); estimator k1 or k3 in the reward.
    kl_penalty: str = "reward"
    kl_estimator: str = "k1"
    kl_coef: float = 0.05  # the initial coefficient
    kl_controller: str = "fixed"  # fixed | adaptive (Ziegler et al. 2019)
    kl_target: float = 6.0  # adaptive: the KL per sequence aimed at
    kl_horizon: int = 10000  # adaptive: samples over which a +-20% correction is spread
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    loss_aggregation: str = "token_mean"  # token_mean | sequence_mean
    # separate: a value head on a backbone of its own, loaded from critic_model (a reward
    # model dir keeps its head; a causal LM gets a new one) or, when null, model.path.
    # shared: a zero-initialised value head on the policy's hidden states.
    critic: str = "separate"
    critic_model: str | None = None
    critic_lr_scale: float = 1.0  # the critic's learning rate is optim.lr times this
    ref_model: str | None = None  # null: a copy of the policy's initial weights
    reward_model: str | None = None  # a reward model dir (what `task: rm` exports)
    reward_model_weight: float = 1.0
    rewards: list[RewardSpec] = dataclasses.field(default_factory=list)
    max_reward_error_frac: float = 0.5  # as grpo.max_reward_error_frac
    missing_eos_penalty: float = 0.0  # subtracted from the score of completions cut at the limit
    log_completions: int = 2
    eval_prompts: int = 128  # held-out prompts for greedy accuracy (0: no eval)
    eval_reward: str = "math"
    eval_max_new_tokens: int | None = None

    def __post_init__(self):
        def fail(key, why):
            raise ConfigError(f"config key 'ppo.{key}' {why}")

        choices = {
            "kl_penalty": KL_PENALTIES, "kl_estimator": KL_ESTIMATORS,
            "kl_controller": tuple(KL_CONTROLLERS), "critic": CRITIC_KINDS,
            "loss_aggregation": tuple(LOSS_AGGREGATIONS),
        }
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                fail(key, f"must be one of {allowed}, got {getattr(self, key)!r}")
        for key in ("samples_per_prompt", "num_mini_batches", "num_ppo_epochs",
                    "max_prompt_length", "max_completion_length", "kl_horizon"):
            if getattr(self, key) < 1:
                fail(key, f"must be >= 1, got {getattr(self, key)}")
        for key in ("kl_coef", "cliprange", "cliprange_value", "vf_coef", "missing_eos_penalty",
                    "critic_lr_scale"):
            if getattr(self, key) < 0:
                fail(key, f"must be >= 0, got {getattr(self, key)}")
        if self.kl_target <= 0:
            fail("kl_target", f"must be > 0, got {self.kl_target}")
        if not 0 <= self.gamma <= 1 or not 0 <= self.lam <= 1:
            fail("gamma", "and 'ppo.lam' must be in [0, 1]")
        if self.temperature <= 0:
            fail("temperature", f"must be > 0 (rollouts sample), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            fail("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.kl_controller == "adaptive" and self.kl_penalty != "reward":
            fail("kl_controller", "'adaptive' steers the KL penalty in the reward: it needs "
                 "'ppo.kl_penalty: reward'")
        if self.critic == "shared" and self.critic_model is not None:
            fail("critic_model", "is for a separate critic; 'ppo.critic: shared' puts the "
                 "value head on the policy")
        if self.log_completions < 0 or self.eval_prompts < 0:
            fail("log_completions", "and 'ppo.eval_prompts' must be >= 0")
        if not 0 <= self.max_reward_error_frac <= 1:
            fail("max_reward_error_frac", f"must be in [0, 1], got {self.max_reward_error_frac}")


def check_config(config) -> None:
    """Load-time checks across sections, before any model or data is loaded."""
    cfg = config.ppo
    if common.lora_enabled(config):
        raise ConfigError("config section 'lora' is not supported by task: ppo yet (under "
                          "LoRA only adapters train, and the critic has none); set lora.rank: 0")
    from jaxpt.tasks.rl.episodes import check_envs  # envs load tools: only when checking

    check_envs(config)
    if cfg.reward_model is None and not cfg.rewards and not config.envs.enabled():
        raise ConfigError("config key 'ppo.rewards' is empty and 'ppo.reward_model' is null: "
                          "PPO needs a reward model, reward functions, an environment in "
                          "'envs' that rewards, or several")
    rows = config.train.batch_size
    if rows % cfg.samples_per_prompt:
        raise ConfigError(
            f"config key 'train.batch_size' ({rows}) counts completions and must be divisible "
            f"by 'ppo.samples_per_prompt' ({cfg.samples_per_prompt})"
        )
    if cfg.reward_model is not None:
        common.check_model_path("ppo.reward_model", cfg.reward_model)
    for key in ("critic_model", "ref_model"):
        if getattr(cfg, key) is not None:
            common.check_model_path(f"ppo.{key}", getattr(cfg, key))
    check_reward_settings("ppo", cfg)
    routing_shape(config)


# --------------------------------------------------------------------------- building


def uses_reference(config) -> bool:
    """PPO always penalises the KL to its reference."""
    return True


def build(ctx: RunContext) -> BuiltModel:
    """``ActorCritic(policy, critic)`` and the reference (the policy's params)."""
    from jaxpt.models.actor_critic import ActorCritic, shared_value_head
    from jaxpt.models.classifier import load_classifier

    cfg = ctx.task_config
    policy = common.build_causal_lm(ctx)
    ref_params = common.reference_params(ctx, policy, cfg.ref_model, key="ppo.ref_model")
    if cfg.critic == "shared":
        head = shared_value_head(policy, seed=ctx.config.seed, mesh=ctx.mesh, rules=ctx.rules)
        return BuiltModel(ActorCritic(policy, value_head=head), ref_params=ref_params)
    tokenizer = common.resolve_tokenizer(ctx)
    critic = load_classifier(
        cfg.critic_model or ctx.config.model.path, num_labels=1,
        pad_token_id=tokenizer.pad_token_id, **common.model_kwargs(ctx),
    )
    common.check_vocab(tokenizer, critic)
    return BuiltModel(ActorCritic(policy, critic=critic), ref_params=ref_params)


def update_scales(ctx: RunContext, params):
    """The critic's updates are scaled by ``ppo.critic_lr_scale`` (its own learning rate)."""
    scale = ctx.task_config.critic_lr_scale

    def factor(path, _):
        critic = any(getattr(k, "key", None) in ("critic", "value_head") for k in path[:1])
        return scale if critic else 1.0

    return jax.tree_util.tree_map_with_path(factor, params)


class PolicyView:
    """``(state) -> (graphdef, params, rest)`` of the policy inside an ActorCritic state; the
    policy's graph is taken once, so sampling never re-traces."""

    def __init__(self):
        self.graphdef = None

    def __call__(self, state):
        from flax import nnx

        if self.graphdef is None:
            self.graphdef = nnx.split(state.model().policy, nnx.Param, ...)[0]
        rest = state.rest["policy"] if "policy" in state.rest else type(state.rest)({})
        return self.graphdef, state.params["policy"], rest


# ------------------------------------------------------------------------------ the loss


def _policy_stats(policy, batch: dict, cfg: PpoConfig, chunk: int, with_entropy: bool,
                  replay: bool = True):
    """(hidden states [B, Lc, D], token stats) of ``policy`` at the completion positions:
    log-probs of the sampled tokens under ``softmax(logits / temperature)`` over the whole
    vocabulary (the trained policy, whose rollout-time log-probs are ``old_logprobs``), the
    LM head run ``chunk`` positions at a time (0: at once). ``replay``: route to the
    batch's recorded experts (``rl.routing_replay``; the reference does not)."""
    window = completion_window(batch["input_ids"].shape[1], cfg.max_completion_length)
    hidden_btd = completion_hidden(
        policy, batch, cfg.max_completion_length, cfg.samples_per_prompt,
        batch.get("routing") if replay else None,
    )
    stats = token_stats(
        lambda h: policy.logits(h) / cfg.temperature, hidden_btd, batch["target_ids"][:, window],
        chunk, with_entropy=with_entropy,
    )
    return hidden_btd, stats


def ppo_loss(
    model, batch: dict, ctx: StepContext, *, cfg: PpoConfig, logits_chunk_size: int = 0,
    importance_correction: str = "none", importance_cap: float = 2.0,
) -> LossOutput:
    """Clipped policy loss + ``vf_coef`` x clipped value loss (+ ``kl_coef`` x k3 KL with
    ``kl_penalty: loss``), aggregated per ``loss_aggregation`` over the completion tokens.
    With an ``importance_correction`` the old policy is the trainer's own log-probs of the
    rollout and each token's policy loss is weighed as in GRPO (``importance_weights``)."""
    window = completion_window(batch["input_ids"].shape[1], cfg.max_completion_length)
    hidden_btd, stats = _policy_stats(model.policy, batch, cfg, logits_chunk_size, True)
    logp_bt = stats.logprobs
    old_logp_bt = batch["old_logprobs"][:, window]
    mask_bt = batch["completion_mask"][:, window]
    weights_bt, correction_metrics = None, {}
    if importance_correction != "none":
        sampler_logp_bt, old_logp_bt = old_logp_bt, batch["trainer_logprobs"]
        weights_bt, correction_metrics = importance_weights(
            old_logp_bt, sampler_logp_bt, mask_bt, importance_correction, importance_cap
        )
    in_loss = cfg.kl_penalty == "loss"
    policy_bt, token_metrics = policy_gradient_loss(
        logp_bt, old_logp_bt, batch["advantages"], mask_bt,
        epsilon_low=cfg.cliprange, epsilon_high=cfg.cliprange,
        ref_logp_bt=batch["ref_logprobs"] if in_loss else None,
        beta=cfg.kl_coef if in_loss else 0.0, weights_bt=weights_bt,
    )
    token_metrics.update(correction_metrics)
    values_bt = model.values(batch, window, hidden_btd)
    value_bt, value_clipped_bt = clipped_value_loss(
        values_bt, batch["old_values"], batch["returns"], mask_bt, cfg.cliprange_value
    )
    aggregate = functools.partial(
        aggregate_token_loss, mask_bt=mask_bt, loss_type=LOSS_AGGREGATIONS[cfg.loss_aggregation],
        max_completion_length=cfg.max_completion_length,
    )
    numerator, denominator = aggregate(policy_bt + cfg.vf_coef * value_bt)
    stop = jax.lax.stop_gradient
    log_ratio_bt = stop(logp_bt - old_logp_bt)
    token_metrics = {
        **{k: stop(v) for k, v in token_metrics.items()},
        "policy_loss": stop(policy_bt),
        "value_loss": stop(value_bt),
        "clipfrac": stop(token_metrics.pop("clip_low") + token_metrics.pop("clip_high")),
        "vf_clipfrac": value_clipped_bt,
        "approx_kl": 0.5 * log_ratio_bt**2,
        "ratio": jnp.exp(log_ratio_bt),
        "entropy": stop(stats.entropy),
        "values": stop(values_bt),
    }
    metrics = {name: aggregate(value)[0] for name, value in token_metrics.items()}
    return LossOutput(
        numerator=numerator,
        denominator=stop(denominator),
        metrics=metrics,
        totals={"completion_tokens": jnp.sum(mask_bt)},
    )


def make_loss(ctx: RunContext):
    rl = ctx.config.rl
    return functools.partial(
        ppo_loss, cfg=ctx.task_config, logits_chunk_size=ctx.config.train.logits_chunk_size,
        importance_correction=rl.importance_correction, importance_cap=rl.importance_cap,
    )


# ----------------------------------------------------------------- rollout -> train batch


def make_batch(rollout: Rollout, cfg: PpoConfig):
    """A rollout's train rows plus its sequence scores (after the missing-EOS penalty);
    ``PpoFinisher`` adds the per-token advantages on device."""
    if rollout.tokens.shape[1] != cfg.max_completion_length:
        raise ValueError(
            f"rollout completions are {rollout.tokens.shape[1]} wide, expected "
            f"ppo.max_completion_length={cfg.max_completion_length}"
        )
    # A reply cut at the budget pays the penalty: it never said it was done.
    scores_b = (rollout.rewards.total - cfg.missing_eos_penalty * rollout.truncated).astype(
        np.float32
    )
    rows = len(rollout.lengths)
    batch = train_batch(rollout, np.zeros(rows, np.float32), np.ones(rows, bool))
    batch["scores"] = scores_b
    del batch["advantages"]  # per token, from GAE
    return batch, {"score": float(scores_b.mean())}, scores_b


def finish_arrays(
    model, ref_params, batch: dict, kl_coef, *, cfg: PpoConfig, logits_chunk_size: int = 0,
    trainer_logprobs: bool = False,
):
    """Reference log-probs, values, KL-penalised token rewards, GAE advantages and returns
    [B, Lc] of a rollout batch, and its metrics (all on device, no gradients). With
    ``trainer_logprobs`` (an importance correction) also the policy's log-probs as the
    trainer computes them, which then stand for the old policy in the KL penalty too."""
    lc = cfg.max_completion_length
    window = completion_window(batch["input_ids"].shape[1], lc)
    group = cfg.samples_per_prompt
    mask_bt = batch["completion_mask"][:, window]
    old_logp_bt = batch["old_logprobs"][:, window]
    extra = {}
    if trainer_logprobs:
        old_logp_bt = _policy_stats(model.policy, batch, cfg, logits_chunk_size, False)[1].logprobs
        extra["trainer_logprobs"] = jnp.where(mask_bt > 0, old_logp_bt, 0.0)
    ref_policy = reference_model(model.policy, ref_params)
    ref_logp_bt = _policy_stats(
        ref_policy, batch, cfg, logits_chunk_size, False, replay=False
    )[1].logprobs
    policy_hidden_btd = (
        completion_hidden(model.policy, batch, lc, group, batch.get("routing"))
        if model.shares_backbone else None
    )
    values_bt = model.values(batch, window, policy_hidden_btd)
    reward_kl_coef = kl_coef if cfg.kl_penalty == "reward" else 0.0
    rewards_bt, kl_bt = token_rewards(
        batch["scores"], old_logp_bt, ref_logp_bt, mask_bt, reward_kl_coef, cfg.kl_estimator
    )
    advantages_bt, returns_bt = gae_advantages(rewards_bt, values_bt, mask_bt, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages_bt = whiten(advantages_bt, mask_bt)
    valid_bt = mask_bt > 0
    values_bt = jnp.where(valid_bt, values_bt, 0.0)
    tokens_b = jnp.maximum(jnp.sum(mask_bt, -1), 1.0)
    kl_b = jnp.sum(kl_bt, -1)
    arrays = {
        "advantages": advantages_bt, "returns": returns_bt, "old_values": values_bt,
        "ref_logprobs": jnp.where(valid_bt, ref_logp_bt, 0.0), **extra,
    }
    metrics = {
        "kl": jnp.mean(kl_b),  # per sequence, summed over its tokens
        "non_score_reward": jnp.mean(-reward_kl_coef * kl_b),
        "explained_variance": explained_variance(values_bt, returns_bt, mask_bt),
        "values_mean": jnp.mean(jnp.sum(values_bt, -1) / tokens_b),
        "returns_mean": jnp.mean(jnp.sum(returns_bt, -1) / tokens_b),
        "advantage_row_mean": jnp.sum(advantages_bt, -1) / tokens_b,
    }
    return arrays, metrics


class PpoFinisher:
    """Completes each rollout's batch on device (``finish_arrays``, jitted once) and runs
    the KL controller between rollouts; ``kl_coef`` is saved with every checkpoint."""

    def __init__(self, ctx: RunContext, cfg: PpoConfig):
        self.ctx, self.cfg = ctx, cfg
        self.kl_coef = float(cfg.kl_coef)

        def finish(state, device_batch, kl_coef):
            return finish_arrays(
                state.model(), state.ref_params, device_batch, kl_coef, cfg=cfg,
                logits_chunk_size=ctx.config.train.logits_chunk_size,
                trainer_logprobs=ctx.config.rl.importance_correction != "none",
            )

        self._finish = RolloutProgram(ctx, finish)

    def get_state(self) -> dict:
        return {"kl_coef": self.kl_coef}

    def set_state(self, state: dict) -> None:
        self.kl_coef = float(state["kl_coef"])

    def __call__(self, state, batch: dict):
        arrays, metrics = self._finish(state, batch, jnp.float32(self.kl_coef))
        row_advantages = metrics.pop("advantage_row_mean")
        out = {**batch, **arrays}
        del out["scores"]
        logged = {k: float(v) for k, v in metrics.items()}
        logged["kl_coef"] = self.kl_coef
        update = KL_CONTROLLERS[self.cfg.kl_controller]
        self.kl_coef = float(update(
            self.kl_coef, logged["kl"], len(batch["scores"]), self.cfg.kl_target,
            self.cfg.kl_horizon,
        ))
        return out, logged, row_advantages


def make_train_source(ctx: RunContext) -> RolloutSource:
    cfg = ctx.task_config
    rewards = reward_specs(cfg)
    if cfg.reward_model is not None:
        rewards.append(reward_model_spec(ctx, cfg.reward_model, cfg.reward_model_weight))
    return RolloutSource(
        ctx, prompt_rows(ctx, "train"), make_batch=functools.partial(make_batch, cfg=cfg),
        samples_per_prompt=cfg.samples_per_prompt, max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature,
        top_p=cfg.top_p, top_k=cfg.top_k, sampler=cfg.sampler, serve_port=cfg.serve_port,
        rewards=rewards,
        reuse=cfg.num_ppo_epochs * cfg.num_mini_batches, log_completions=cfg.log_completions,
        minibatches=cfg.num_mini_batches, finish=PpoFinisher(ctx, cfg),
        policy_view=PolicyView(), max_reward_error_frac=cfg.max_reward_error_frac,
        episodes=ctx.config.envs.enabled(),
    )


def make_evaluator(ctx: RunContext):
    """Greedy held-out accuracy of the policy (``eval_accuracy``)."""
    return accuracy_evaluator(ctx, ctx.task_config, lambda state: state.model().policy)


def export(ctx: RunContext, state, out_dir: str) -> None:
    """The policy as an HF causal-LM checkpoint plus the tokenizer files."""
    from jaxpt.models import save_pretrained

    save_pretrained(state.model().policy, out_dir, dtype=ctx.config.export.dtype)
    if ctx.is_main_process:
        common.resolve_tokenizer(ctx).save_pretrained(out_dir)


def batch_spec(config) -> dict:
    """A train batch: one minibatch of ``train.batch_size`` rollout rows
    (``train_batch``, prompts left-padded to ``max_prompt_length``) completed by
    ``PpoFinisher``'s per-token arrays over the ``max_completion_length`` window."""
    cfg = config.ppo
    b, lc = config.train.batch_size, cfg.max_completion_length
    rows = (b, cfg.max_prompt_length + lc)
    spec = {k: (rows, np.int32) for k in ("input_ids", "positions", "segment_ids", "target_ids")}
    spec.update({k: (rows, np.float32) for k in ("completion_mask", "old_logprobs")})
    for key in ("advantages", "returns", "old_values", "ref_logprobs"):
        spec[key] = ((b, lc), np.float32)
    if config.rl.importance_correction != "none":
        spec["trainer_logprobs"] = ((b, lc), np.float32)
    return add_routing_spec(spec, config)


def build_abstract(ctx: RunContext, hf_config: dict) -> BuiltModel:
    """``build`` from the architectures alone (for ``nnx.eval_shape``): the policy of
    ``hf_config``, its reference, and the critic of ``ppo.critic_model``'s config (default:
    the policy's) or a value head on the policy."""
    from jaxpt.models.actor_critic import ActorCritic, shared_value_head
    from jaxpt.models.classifier import init_classifier

    cfg = ctx.task_config
    built = common.abstract_causal_lm(ctx, hf_config)
    policy = built.model
    if cfg.critic == "shared":
        head = shared_value_head(policy, seed=ctx.config.seed, mesh=ctx.mesh, rules=ctx.rules)
        return BuiltModel(ActorCritic(policy, value_head=head), ref_params=built.ref_params)
    critic_config = hf_config
    if cfg.critic_model is not None:
        critic_config = common.hf_config_dict(cfg.critic_model, "ppo.critic_model")
    critic = init_classifier(critic_config, num_labels=1, **common.model_kwargs(ctx))
    return BuiltModel(ActorCritic(policy, critic=critic), ref_params=built.ref_params)


TASK = Task(
    name="ppo",
    description="PPO (RLHF): policy, critic, reference; KL-penalised rewards, GAE, clipped losses",
    config_cls=PpoConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=make_train_source,
    make_evaluator=make_evaluator,
    export=export,
    check_config=check_config,
    update_scales=update_scales,
    uses_reference=uses_reference,
    batch_spec=batch_spec,
    build_abstract=build_abstract,
)
