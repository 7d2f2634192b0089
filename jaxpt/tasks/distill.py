"""Knowledge distillation from a frozen teacher: offline logit distillation, on-policy
distillation and GKD (Agarwal et al. 2024), one task.

Each step trains the student on completions of the prompt rows: with probability
``lmbda`` sampled by the student itself (on-policy, with the RL tasks' rollouts), otherwise
the rows' own reference completions (off-policy: the SFT data). At every completion
position the student's next-token distribution is pulled toward the teacher's by
``generalized_jsd`` over the whole vocabulary: ``beta`` 0 is forward KL (classic logit
distillation: ``lmbda`` 0, ``beta`` 0), 1 reverse KL (on-policy distillation: ``lmbda``
1, ``beta`` 1). ``objective: dense_reward`` trains on-policy distillation as a per-token
reward instead (``dense_reward_loss``: the sampled tokens' log-probs alone). The teacher, any causal LM with the student's tokenizer, runs frozen on
the same mesh in its own dtype; like a reference it is kept out of checkpoints and read
again from ``distill.teacher`` on resume (its fingerprint checked).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.config import ConfigError
from jaxpt.losses.chunked import map_chunks, token_stats
from jaxpt.losses.distill import dense_reward_loss, generalized_jsd
from jaxpt.sampling.api import SAMPLERS
from jaxpt.step import LossOutput, StepContext
from jaxpt.tasks import common
from jaxpt.tasks.base import BuiltModel, RunContext, Task
from jaxpt.tasks.rl.batch import Rollout, completion_window, sequence_rows
from jaxpt.tasks.rl.evaluator import accuracy_evaluator
from jaxpt.tasks.rl.forward import completion_hidden
from jaxpt.tasks.rl.rewards import RewardSpec, check_reward_settings, reward_specs
from jaxpt.tasks.rl.source import RolloutSource, prompt_rows

_TEACHER = "distill_teacher_graphdef"  # in RunContext.cache: build -> loss
OBJECTIVES = ("divergence", "dense_reward")


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    teacher: str | None = None  # the teacher model (required): a dir, hub name, GGUF, preset
    teacher_dtype: str | None = None  # its weights and compute dtype; None: model.dtype
    # divergence: generalized JSD over the vocabulary | dense_reward: per-token reward
    # log pi_teacher - log pi_student of the sampled tokens (on-policy only, lmbda 1)
    objective: str = "divergence"
    beta: float = 0.5  # generalized JSD: 0 forward KL, 1 reverse KL
    lmbda: float = 0.5  # share of steps on the student's own samples (the rest on the data's)
    temperature: float = 0.9  # sampling, and both distributions in the divergence
    max_prompt_length: int = 128
    max_completion_length: int = 64
    # Rollout sampler: auto (see jaxpt.sampling.api.choose_sampler) | paged | static
    sampler: str = "auto"
    rewards: list[RewardSpec] = dataclasses.field(default_factory=list)  # logged, not trained
    log_completions: int = 2
    eval_prompts: int = 128  # held-out prompts for greedy accuracy (0: no eval)
    eval_reward: str = "math"
    eval_max_new_tokens: int | None = None

    def __post_init__(self):
        def fail(key, why):
            raise ConfigError(f"config key 'distill.{key}' {why}")

        if self.objective not in OBJECTIVES:
            fail("objective", f"must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.objective == "dense_reward" and self.lmbda != 1:
            fail("objective", "dense_reward is a policy gradient on the student's own samples: "
                 f"it needs 'distill.lmbda' 1, got {self.lmbda}")
        if not 0 <= self.beta <= 1:
            fail("beta", f"must be in [0, 1], got {self.beta}")
        if not 0 <= self.lmbda <= 1:
            fail("lmbda", f"must be in [0, 1], got {self.lmbda}")
        if self.temperature <= 0:
            fail("temperature", f"must be > 0, got {self.temperature}")
        if self.sampler not in SAMPLERS:
            fail("sampler", f"must be one of {list(SAMPLERS)}, got {self.sampler!r}")
        for key in ("max_prompt_length", "max_completion_length"):
            if getattr(self, key) < 1:
                fail(key, f"must be >= 1, got {getattr(self, key)}")


# ------------------------------------------------------------------------------ the loss


def distill_loss(model, batch: dict, ctx: StepContext, *, cfg: DistillConfig, teacher_graphdef,
                 logits_chunk_size: int = 0) -> LossOutput:
    """The generalized JSD between student and teacher at every completion position,
    averaged over the batch's completion tokens. The LM heads run ``logits_chunk_size``
    positions at a time (0: all at once); the vocabularies are cut to the shorter one."""
    lc = cfg.max_completion_length
    teacher = nnx.merge(teacher_graphdef, ctx.ref_params)
    student_hidden_btd = completion_hidden(model, batch, lc)
    teacher_hidden_btd = jax.lax.stop_gradient(completion_hidden(teacher, batch, lc))
    vocab = min(model.config.vocab_size, teacher.config.vocab_size)
    window = completion_window(batch["input_ids"].shape[1], lc)
    mask_bt = batch["completion_mask"][:, window]
    tokens = jnp.sum(mask_bt)
    if cfg.objective == "dense_reward":
        targets_bt = batch["target_ids"][:, window]
        logp = lambda logits_fn, hidden: token_stats(
            lambda h: logits_fn(h)[..., :vocab] / cfg.temperature, hidden, targets_bt,
            logits_chunk_size).logprobs
        student_bt = logp(model.logits, student_hidden_btd)
        teacher_bt = jax.lax.stop_gradient(logp(teacher.logits, teacher_hidden_btd))
        total = jnp.sum(dense_reward_loss(student_bt, teacher_bt) * mask_bt)
        # The sampled estimate of the reverse KL: the reward's negated mean.
        divergence = jnp.sum((student_bt - teacher_bt) * mask_bt)
    else:
        def per_position(student_bcd, teacher_bcd):
            return generalized_jsd(model.logits(student_bcd)[..., :vocab],
                                   teacher.logits(teacher_bcd)[..., :vocab], cfg.beta,
                                   cfg.temperature)

        jsd_bt = map_chunks(per_position, logits_chunk_size, student_hidden_btd,
                            teacher_hidden_btd)
        total = divergence = jnp.sum(jsd_bt * mask_bt)
    return LossOutput(numerator=total, denominator=tokens,
                      metrics={"divergence": jax.lax.stop_gradient(divergence)},
                      totals={"completion_tokens": tokens})


def make_loss(ctx: RunContext):
    return functools.partial(
        distill_loss, cfg=ctx.task_config, teacher_graphdef=ctx.cache[_TEACHER],
        logits_chunk_size=ctx.config.train.logits_chunk_size,
    )


# --------------------------------------------------------------------------- building


def check_config(config) -> None:
    cfg = config.distill
    if not cfg.teacher:
        raise ConfigError("config key 'distill.teacher' is required: the teacher model")
    check_reward_settings("distill", cfg)


def _teacher_dtype(ctx: RunContext) -> str:
    return ctx.task_config.teacher_dtype or ctx.config.model.dtype


def check_tokenizers(student_tokenizer, teacher_tokenizer, teacher: str) -> None:
    """A ConfigError unless student and teacher tokenize alike (the same vocabulary): the
    divergence compares their distributions token id by token id."""
    if student_tokenizer.get_vocab() != teacher_tokenizer.get_vocab():
        raise ConfigError(
            f"config key 'distill.teacher': the teacher {teacher!r} has another tokenizer "
            f"({len(teacher_tokenizer)} tokens) than the student ({len(student_tokenizer)}); "
            "distillation compares next-token distributions id by id, so both must share one"
        )


def build(ctx: RunContext) -> BuiltModel:
    """The student (as SFT builds it) and the teacher's frozen params in the reference's
    place (its graphdef in ``ctx.cache``): on the run's mesh, in ``teacher_dtype``."""
    from jaxpt.data import tokenizer_for_model
    from jaxpt.models import load_model

    cfg = ctx.task_config
    student = common.build_causal_lm(ctx)
    check_tokenizers(common.resolve_tokenizer(ctx), tokenizer_for_model(cfg.teacher),
                     cfg.teacher)
    dtype = _teacher_dtype(ctx)
    teacher = load_model(cfg.teacher, dtype=dtype, param_dtype=dtype, mesh=ctx.mesh,
                         rules=ctx.rules)
    graphdef, params, rest = nnx.split(teacher, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ConfigError(f"config key 'distill.teacher': {cfg.teacher!r} holds state besides "
                          "its weights (LoRA adapters?); merge them first")
    ctx.cache[_TEACHER] = graphdef
    return BuiltModel(student, ref_params=params)


def build_abstract(ctx: RunContext, hf_config: dict) -> BuiltModel:
    """``build`` from configs alone: the student of ``hf_config`` and the teacher of
    ``distill.teacher``'s config, abstract."""
    from jaxpt.models import init_model

    built = common.abstract_causal_lm(ctx, hf_config)
    dtype = _teacher_dtype(ctx)
    teacher = init_model(common.hf_config_dict(ctx.task_config.teacher, "distill.teacher"),
                         mesh=ctx.mesh, rules=ctx.rules, dtype=dtype, param_dtype=dtype)
    graphdef, params, _ = nnx.split(teacher, nnx.Param, ...)
    ctx.cache[_TEACHER] = graphdef
    return BuiltModel(built.model, ref_params=params)


def make_batch(rollout: Rollout, cfg: DistillConfig):
    """A rollout's train rows (no advantages: the loss is the divergence alone)."""
    return sequence_rows(rollout), {}, np.zeros(len(rollout.lengths), np.float32)


def make_train_source(ctx: RunContext) -> RolloutSource:
    cfg = ctx.task_config
    rows = prompt_rows(ctx, "train", reference_completions=True)
    if cfg.lmbda < 1:
        missing = [i for i, r in enumerate(rows) if "completion" not in r]
        if missing:
            raise ConfigError(
                f"config key 'distill.lmbda' ({cfg.lmbda}) trains on the data's own "
                f"completions, but train row {missing[0]} (of {len(missing)}) has none: give "
                "rows a 'completion' (or 'messages' ending in an assistant turn), or set "
                "distill.lmbda=1 (on-policy only)"
            )
    return RolloutSource(
        ctx, rows, make_batch=functools.partial(make_batch, cfg=cfg), samples_per_prompt=1,
        max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature, top_p=1.0, top_k=None, sampler=cfg.sampler,
        rewards=reward_specs(cfg), log_completions=cfg.log_completions,
        on_policy_frac=cfg.lmbda,
    )


def make_evaluator(ctx: RunContext):
    """Greedy held-out accuracy (``eval_accuracy``) on prompts with an ``answer`` column."""
    return accuracy_evaluator(ctx, ctx.task_config)


def batch_spec(config) -> dict:
    """A train batch: ``train.batch_size`` rows, each its prompt left-padded to
    ``max_prompt_length`` then ``max_completion_length`` tokens."""
    cfg = config.distill
    rows = (config.train.batch_size, cfg.max_prompt_length + cfg.max_completion_length)
    spec = {k: (rows, np.int32) for k in ("input_ids", "positions", "segment_ids", "target_ids")}
    spec["completion_mask"] = (rows, np.float32)
    return spec


TASK = Task(
    name="distill",
    description="distillation from a frozen teacher: offline (forward KL), on-policy "
    "(reverse KL) and GKD's mix",
    config_cls=DistillConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=make_train_source,
    make_evaluator=make_evaluator,
    export=common.export_causal_lm,
    check_config=check_config,
    uses_reference=lambda config: True,
    batch_spec=batch_spec,
    build_abstract=build_abstract,
    reference_is_policy=False,
)
