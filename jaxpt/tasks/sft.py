"""Supervised fine-tuning: masked next-token cross-entropy on (packed) chat examples."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.losses.chunked import token_stats
from jaxpt.step import LossOutput, StepContext
from jaxpt.tasks import common
from jaxpt.tasks.base import BuiltModel, RunContext, Task


@dataclasses.dataclass(frozen=True)
class SftConfig:
    z_loss: float = 0.0  # weight of logsumexp(logits)^2 on trained tokens (stabilizer)


def token_cross_entropy(logits_btv, targets_bt):
    """(per-token CE, logsumexp, target is the top logit), all [B, T], in float32."""
    logits_btv = logits_btv.astype(jnp.float32)
    logz_bt = jax.nn.logsumexp(logits_btv, axis=-1)
    target_logit_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
    # max, not argmax: XLA:CPU's variadic argmax reduce is several times slower (ties count
    # as correct, which random float logits make vanishingly rare).
    correct_bt = jax.lax.stop_gradient(target_logit_bt >= jnp.max(logits_btv, axis=-1))
    return logz_bt - target_logit_bt, logz_bt, correct_bt


def sft_loss(
    model, batch: dict, ctx: StepContext, z_loss: float = 0.0, logits_chunk_size: int = 0
) -> LossOutput:
    """Sum of CE over trained tokens / number of trained tokens (see the loss contract).

    Packed documents never attend across each other (segment_ids) and restart positions,
    and targets never cross a document boundary, so packing does not change the loss.
    ``logits_chunk_size`` > 0 runs the LM head that many positions at a time
    (``jaxpt.losses.chunked``): the same loss without [B, T, V] logits in memory.
    """
    mask_bt = batch["loss_mask"].astype(jnp.float32)
    if logits_chunk_size:
        hidden_btd = model(
            batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"],
            return_hidden=True,
        )
        stats = token_stats(
            model.logits, hidden_btd, batch["target_ids"], logits_chunk_size, with_top=True
        )
        ce_bt, logz_bt, correct_bt = -stats.logprobs, stats.logz, stats.is_top
    else:
        logits_btv = model(
            batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]
        )
        ce_bt, logz_bt, correct_bt = token_cross_entropy(logits_btv, batch["target_ids"])
    numerator = jnp.sum(ce_bt * mask_bt)
    if z_loss:
        numerator = numerator + z_loss * jnp.sum(jnp.square(logz_bt) * mask_bt)
    tokens = jnp.sum(mask_bt)
    return LossOutput(
        numerator=numerator,
        denominator=tokens,
        # Next-token accuracy (``eval_token_accuracy`` in evals), named apart from the RL
        # tasks' ``accuracy`` / ``eval_accuracy`` (answers checked by a reward).
        metrics={"token_accuracy": jnp.sum(correct_bt * mask_bt)},
        totals={"tokens": tokens},
    )


# ----------------------------------------------------------------------------- building


def build(ctx: RunContext) -> BuiltModel:
    """The causal LM (preset random init or HF checkpoint) on the run's mesh."""
    return BuiltModel(common.build_causal_lm(ctx))


def _pipeline(ctx: RunContext, source, *, train: bool):
    """The SFT pipeline over ``source`` with this run's data options."""
    from jaxpt.data import build_sft_pipeline

    d = ctx.config.data
    kwargs = {
        **common.pipeline_options(ctx, train=train), "packing": d.packing,
        "completion_only": d.completion_only, "max_length": d.max_length,
    }
    return build_sft_pipeline(source, common.resolve_tokenizer(ctx), **kwargs)


def make_train_source(ctx: RunContext) -> common.PipelineSource:
    return common.train_pipeline_source(ctx, "sft", _pipeline)


def make_eval_batches(ctx: RunContext) -> list[dict] | None:
    return common.eval_pipeline_batches(ctx, "sft", _pipeline)


def make_evaluator(ctx: RunContext):
    batches = make_eval_batches(ctx)
    return common.batch_loss_evaluator(ctx, make_loss(ctx), batches)


def make_loss(ctx: RunContext):
    """The SFT loss with this run's options bound."""
    return functools.partial(
        sft_loss, z_loss=ctx.task_config.z_loss,
        logits_chunk_size=ctx.config.train.logits_chunk_size,
    )


def batch_spec(config) -> dict:
    """A train batch: ``train.batch_size`` packed rows of ``data.seq_len`` (see
    ``jaxpt.data.features`` for the fields)."""
    shape = (config.train.batch_size, config.data.seq_len)
    ints = ("input_ids", "target_ids", "positions", "segment_ids")
    return {**{k: (shape, np.int32) for k in ints}, "loss_mask": (shape, np.float32)}


TASK = Task(
    name="sft",
    description="supervised fine-tuning (masked next-token cross-entropy, packed)",
    config_cls=SftConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=make_train_source,
    make_evaluator=make_evaluator,
    export=common.export_causal_lm,
    batch_spec=batch_spec,
    build_abstract=common.abstract_causal_lm,
)
