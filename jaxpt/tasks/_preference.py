"""What reward modeling and DPO share: preference data sources and pipelines, the
chosen+rejected batch in one forward pass, and per-pair sums under the loss contract."""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np
from omegaconf import OmegaConf

from jaxpt.tasks.base import LossOutput, RunContext
from jaxpt.tasks.sft import ARITHMETIC, PipelineSource, local_batch_size, resolve_tokenizer

SIDES = ("chosen", "rejected")


def first_existing(*candidates: str) -> str:
    """The first candidate that is an existing path or a preset name, else the last one.

    Registered as the config resolver ``${first_existing:a,b}``: the tiny RM/DPO configs
    start from the quickstart SFT output when it exists, else from a random-init preset.
    """
    from jaxpt.models import preset_config

    for candidate in candidates:
        if os.path.exists(candidate) or preset_config(candidate) is not None:
            return candidate
    return candidates[-1]


OmegaConf.register_resolver("first_existing", first_existing, replace=True)
ROW_FIELDS = ("input_ids", "target_ids", "loss_mask", "positions", "segment_ids")


def _arithmetic_pairs(ctx: RunContext, split: str) -> list[dict]:
    from jaxpt.data import generate_preference_pairs
    from jaxpt.tasks.sft import generated_arithmetic

    return generated_arithmetic(ctx, split, generate_preference_pairs, "arithmetic_pref")


def preference_sources(ctx: RunContext):
    """(train source, eval source or None): files/rows for the preference pipeline
    (made once per run, shared through ``ctx.cache``)."""
    if "preference_sources" not in ctx.cache:
        ctx.cache["preference_sources"] = _make_sources(ctx)
    return ctx.cache["preference_sources"]


def _make_sources(ctx: RunContext):
    from jaxpt.data import LoadedExamples, load_examples

    d = ctx.config.data
    train = _arithmetic_pairs(ctx, "train") if d.train == ARITHMETIC else d.train
    if d.eval is not None:
        return train, _arithmetic_pairs(ctx, "test") if d.eval == ARITHMETIC else d.eval
    if d.eval_fraction <= 0:
        return train, None
    loaded = load_examples(train, "preference", d.train_split, d.skip_invalid)
    order = np.random.default_rng(ctx.config.seed).permutation(len(loaded.rows))
    n_eval = max(1, round(d.eval_fraction * len(order)))
    if n_eval >= len(order):
        raise ValueError(f"data.eval_fraction={d.eval_fraction} leaves no training rows")

    def pick(idx):
        return [loaded.rows[i] for i in sorted(idx)]

    train_part = LoadedExamples(
        pick(order[n_eval:]),
        loaded.source,
        loaded.num_read,
        loaded.num_skipped,
        loaded.skip_reasons,
    )
    return train_part, LoadedExamples(
        pick(order[:n_eval]), loaded.source + " (eval)", n_eval, 0, []
    )


def build_pipeline(ctx: RunContext, source, *, train: bool, **overrides):
    """The preference pipeline over ``source`` with this run's data options: shuffled and
    repeated for training, one ordered pass for evaluation."""
    from jaxpt.data import build_preference_pipeline

    d = ctx.config.data
    kwargs = {
        "seq_len": d.seq_len,
        "batch_size": local_batch_size(ctx),
        "max_prompt_length": ctx.task_config.max_prompt_length,
        "overflow": d.truncation,
        "skip_invalid": d.skip_invalid,
    }
    if train:
        kwargs.update(
            seed=ctx.config.seed, split=d.train_split, shuffle=d.shuffle, num_workers=d.num_workers
        )
    else:
        kwargs.update(seed=0, split=d.eval_split, shuffle=False, num_epochs=1)
    kwargs.update(overrides)
    return build_preference_pipeline(source, resolve_tokenizer(ctx), **kwargs)


def make_train_source(ctx: RunContext) -> PipelineSource:
    train, _ = preference_sources(ctx)
    pipeline = build_pipeline(ctx, train, train=True)
    ctx.summary["data"] = pipeline.stats.as_dict()
    ctx.summary["data_skip_reasons"] = list(pipeline.skip_reasons)
    return PipelineSource(pipeline)


def make_eval_batches(ctx: RunContext) -> list[dict] | None:
    from jaxpt.data import eval_batches

    _, source = preference_sources(ctx)
    if source is None or ctx.config.train.eval_batches < 1:
        return None
    pipeline = build_pipeline(ctx, source, train=False)
    ctx.summary["eval_data"] = pipeline.stats.as_dict()
    return eval_batches(pipeline, ctx.config.train.eval_batches)


def stack_pairs(batch: dict) -> dict:
    """chosen_* and rejected_* [B, S] -> one [2B, S] batch (chosen rows first), so both
    sides go through the model in a single forward pass."""
    return {
        key: jnp.concatenate([batch[f"chosen_{key}"], batch[f"rejected_{key}"]], axis=0)
        for key in ROW_FIELDS
    }


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
