"""Task ``smoothed_sft``: SFT with label smoothing, built from jaxpt's SFT pieces.

Its one option is the config key ``smoothed_sft.smoothing``: the share of each trained
token's target mass spread uniformly over the vocabulary.
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp

from jaxpt.config import ConfigError
from jaxpt.step import LossOutput, StepContext
from jaxpt.tasks import Task, common, register_task, sft


@dataclasses.dataclass(frozen=True)
class SmoothedSftConfig:
    smoothing: float = 0.1  # in [0, 1): 0 is plain SFT


def smoothed_sft_loss(model, batch: dict, ctx: StepContext, smoothing: float) -> LossOutput:
    """Sum over trained tokens of (1 - s) * CE(target) + s * CE(uniform), over the count."""
    mask_bt = batch["loss_mask"].astype(jnp.float32)
    logits_btv = model(
        batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    ).astype(jnp.float32)
    ce_bt, logz_bt, correct_bt = sft.token_cross_entropy(logits_btv, batch["target_ids"])
    uniform_ce_bt = logz_bt - jnp.mean(logits_btv, axis=-1)
    loss_bt = (1.0 - smoothing) * ce_bt + smoothing * uniform_ce_bt
    tokens = jnp.sum(mask_bt)
    return LossOutput(
        numerator=jnp.sum(loss_bt * mask_bt),
        denominator=tokens,
        metrics={"token_accuracy": jnp.sum(correct_bt * mask_bt)},
        totals={"tokens": tokens},
    )


def make_loss(ctx):
    return functools.partial(smoothed_sft_loss, smoothing=ctx.task_config.smoothing)


def make_evaluator(ctx):
    return common.batch_loss_evaluator(ctx, make_loss(ctx), sft.make_eval_batches(ctx))


def check_config(config) -> None:
    if not 0.0 <= config.smoothed_sft.smoothing < 1.0:
        raise ConfigError(
            f"config key 'smoothed_sft.smoothing' must be in [0, 1), got "
            f"{config.smoothed_sft.smoothing}"
        )


TASK = register_task(
    Task(
        name="smoothed_sft",
        description="SFT with label smoothing (a task from a user's module)",
        config_cls=SmoothedSftConfig,
        build=sft.build,
        make_loss=make_loss,
        make_train_source=sft.make_train_source,
        make_evaluator=make_evaluator,
        export=common.export_causal_lm,
        check_config=check_config,
    )
)
