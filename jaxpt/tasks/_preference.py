"""What reward modeling, DPO and KTO share: preference pipelines, the
chosen+rejected batch in one forward pass, sequence log-probs of rows, and per-pair sums
under the loss contract."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxpt.step import LossOutput
from jaxpt.tasks import common
from jaxpt.tasks.base import RunContext

SIDES = ("chosen", "rejected")
ROW_FIELDS = ("input_ids", "target_ids", "loss_mask", "positions", "segment_ids")


def build_pipeline(ctx: RunContext, source, *, train: bool, **overrides):
    """The preference pipeline over ``source`` with this run's data options: shuffled and
    repeated for training, one ordered pass for evaluation."""
    from jaxpt.data import build_preference_pipeline

    kwargs = {
        **common.pipeline_options(ctx, train=train),
        "max_prompt_length": ctx.task_config.max_prompt_length,
    }
    kwargs.update(overrides)
    return build_preference_pipeline(source, common.resolve_tokenizer(ctx), **kwargs)


def make_train_source(ctx: RunContext) -> common.PipelineSource:
    return common.train_pipeline_source(ctx, "preference", build_pipeline)


def make_eval_batches(ctx: RunContext) -> list[dict] | None:
    return common.eval_pipeline_batches(ctx, "preference", build_pipeline)


def stack_pairs(batch: dict) -> dict:
    """chosen_* and rejected_* [B, S] -> one [2B, S] batch (chosen rows first), so both
    sides go through the model in a single forward pass."""
    return {
        key: jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)
        for key in ROW_FIELDS
    }


def row_logps(model, rows: dict, logits_chunk_size: int = 0):
    """Sequence log-probs [B] (summed over the trained tokens, ``loss_mask``) of ``rows``
    (``ROW_FIELDS`` [B, S]); the LM head runs ``logits_chunk_size`` positions at a time
    (0: all at once)."""
    from jaxpt.losses import sequence_logprob, token_logprobs
    from jaxpt.losses.chunked import token_stats

    if logits_chunk_size:
        hidden_btd = model(
            rows["input_ids"], positions=rows["positions"], segment_ids=rows["segment_ids"],
            return_hidden=True,
        )
        logp_bt = token_stats(
            model.logits, hidden_btd, rows["target_ids"], logits_chunk_size
        ).logprobs
    else:
        logits_btv = model(
            rows["input_ids"], positions=rows["positions"], segment_ids=rows["segment_ids"]
        )
        logp_bt = token_logprobs(logits_btv, rows["target_ids"])
    return sequence_logprob(logp_bt, rows["loss_mask"])


def split_pairs(values_2b):
    """[2B] -> ([B] chosen, [B] rejected), the inverse of ``stack_pairs``' row order."""
    half = values_2b.shape[0] // 2
    return values_2b[:half], values_2b[half:]


def pair_sums(loss_b, metrics_b: dict, pair_mask_b) -> LossOutput:
    """Loss contract for pairs: numerator = sum of per-pair losses over real pairs,
    denominator = number of real pairs; metrics are pair-weighted sums too."""
    weight_b = pair_mask_b.astype(jnp.float32)
    return LossOutput(
        numerator=jnp.sum(loss_b * weight_b),
        denominator=jnp.sum(weight_b),
        metrics={k: jnp.sum(v.astype(jnp.float32) * weight_b) for k, v in metrics_b.items()},
        totals={"pairs": jnp.sum(weight_b)},
    )


def batch_spec(config) -> dict:
    """A preference train batch: ``train.batch_size`` pairs, each side a row of
    ``data.seq_len`` (``chosen_*``/``rejected_*`` fields), with its ``margin`` and
    ``pair_mask`` (see ``jaxpt.data.features.preference_row``)."""
    rows = (config.train.batch_size, config.data.seq_len)
    pairs = (config.train.batch_size,)
    spec = {}
    for side in SIDES:
        for field in ROW_FIELDS:
            spec[f"{side}_{field}"] = (rows, np.float32 if field == "loss_mask" else np.int32)
    return {**spec, "margin": (pairs, np.float32), "pair_mask": (pairs, np.float32)}
