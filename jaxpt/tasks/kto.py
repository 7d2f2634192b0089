"""Kahneman-Tversky optimization: alignment from unpaired desirable / undesirable examples
(thumbs up or down on single responses) against a frozen reference.

Train rows are unpaired examples (``prompt``, ``completion``, ``label``); preference pairs
are read as two of them. The loss compares each example's implicit reward
``log pi - log ref`` with a reference point: the batch's KL between policy and reference,
estimated on mismatched rows (each prompt followed by its neighbour's completion) and not
differentiated, as TRL and the paper estimate it. On preference pairs as eval data the
evaluator also reports ``eval_rewards/pair_accuracy``: the share of pairs whose chosen
response earns the higher implicit reward.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.config import ConfigError
from jaxpt.losses import kto_loss
from jaxpt.state import reference_model
from jaxpt.step import LossOutput, StepContext
from jaxpt.tasks import _preference as pref
from jaxpt.tasks import common
from jaxpt.tasks.base import BuiltModel, RunContext, Task


@dataclasses.dataclass(frozen=True)
class KtoConfig:
    beta: float = 0.1  # scale of the implicit reward beta * (log pi - log ref)
    desirable_weight: float = 1.0  # lambda_D: raise it when desirable examples are fewer
    undesirable_weight: float = 1.0  # lambda_U
    ref_model: str | None = None  # None: the policy's initial weights
    max_prompt_length: int | None = None  # prompt tokens kept when cutting; None: seq_len // 2

    def __post_init__(self):
        for key in ("beta", "desirable_weight", "undesirable_weight"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"config key 'kto.{key}' must be > 0, got {getattr(self, key)}")


def _rows(batch: dict, prefix: str = "") -> dict:
    return {key: batch[f"{prefix}{key}"] for key in pref.ROW_FIELDS}


def kto_task_loss(model, batch: dict, ctx: StepContext, *, beta: float = 0.1,
                  desirable_weight: float = 1.0, undesirable_weight: float = 1.0,
                  logits_chunk_size: int = 0) -> LossOutput:
    """KTO summed over real examples / number of real examples. The examples and their
    mismatched rows go through the policy and the reference in one forward each."""
    rows, kl_rows = _rows(batch), _rows(batch, "kl_")
    stacked = {k: jnp.concatenate([rows[k], kl_rows[k]], axis=0) for k in pref.ROW_FIELDS}
    policy_b, policy_kl_b = pref.split_pairs(pref.row_logps(model, stacked, logits_chunk_size))
    ref_b, ref_kl_b = pref.split_pairs(jax.lax.stop_gradient(
        pref.row_logps(reference_model(model, ctx.ref_params), stacked, logits_chunk_size)
    ))
    weight_b = batch["example_mask"].astype(jnp.float32)
    # The reference point: the mean log-ratio of the mismatched rows that have tokens.
    has_kl_b = (jnp.sum(kl_rows["loss_mask"], axis=-1) > 0).astype(jnp.float32) * weight_b
    kl_sum = jnp.sum(jax.lax.stop_gradient(policy_kl_b - ref_kl_b) * has_kl_b)
    kl = jnp.maximum(kl_sum / jnp.maximum(jnp.sum(has_kl_b), 1.0), 0.0)
    loss_b, metrics_b = kto_loss(policy_b, ref_b, batch["label"], kl, beta=beta,
                                 desirable_weight=desirable_weight,
                                 undesirable_weight=undesirable_weight)
    examples = jnp.sum(weight_b)
    metrics = {k: jnp.sum(v.astype(jnp.float32) * weight_b) for k, v in metrics_b.items()}
    metrics["kl"] = kl * examples  # logged as sum / examples: the batch's estimate
    metrics["desirable_frac"] = jnp.sum(batch["label"] * weight_b)
    if "pair_mask" in batch:  # pairs unpaired by ``unpair_batch``: chosen rows first
        reward_c, reward_r = pref.split_pairs(policy_b - ref_b)
        pairs = batch["pair_mask"].astype(jnp.float32)
        # Two examples per pair: twice the pair count over the example count is the share.
        metrics["rewards/pair_accuracy"] = 2 * jnp.sum((reward_c > reward_r) * pairs)
    return LossOutput(numerator=jnp.sum(loss_b * weight_b), denominator=examples,
                      metrics=metrics, totals={"examples": examples})


def unpair_batch(pairs: dict) -> dict:
    """A preference batch of B pairs as an unpaired batch of 2B examples (the chosen rows,
    desirable, then the rejected ones), with its mismatched rows and the ``pair_mask``."""
    from jaxpt.data.features import mismatched_rows

    out = {k: np.concatenate([pairs[f"chosen_{k}"], pairs[f"rejected_{k}"]])
           for k in pref.ROW_FIELDS}
    n = len(pairs["pair_mask"])
    out["label"] = np.concatenate([np.ones(n, np.float32), np.zeros(n, np.float32)])
    out["example_mask"] = np.concatenate([pairs["pair_mask"], pairs["pair_mask"]])
    # loss_mask[t] trains token t + 1: the first trained target follows the prompt's end.
    trained = out["loss_mask"] > 0
    out["prompt_length"] = np.where(trained.any(1), trained.argmax(1) + 1, 0).astype(np.int32)
    out.update(mismatched_rows(out))
    out["pair_mask"] = pairs["pair_mask"]
    return out


# --------------------------------------------------------------------------------- the task


def build_pipeline(ctx: RunContext, source, *, train: bool, **overrides):
    from jaxpt.data import build_unpaired_pipeline

    kwargs = {
        **common.pipeline_options(ctx, train=train),
        "max_prompt_length": ctx.task_config.max_prompt_length,
    }
    kwargs.update(overrides)
    return build_unpaired_pipeline(source, common.resolve_tokenizer(ctx), **kwargs)


def build(ctx: RunContext) -> BuiltModel:
    """The policy (as SFT builds it) and the frozen reference params (none under LoRA)."""
    model = common.build_causal_lm(ctx)
    ref_params = common.reference_params(ctx, model, ctx.task_config.ref_model, "kto.ref_model")
    return BuiltModel(model, ref_params=ref_params)


def make_train_source(ctx: RunContext):
    return common.train_pipeline_source(ctx, "unpaired", build_pipeline)


def _eval_rows_are_pairs(ctx: RunContext, source) -> bool:
    from jaxpt.data import DataError, load_examples

    d = ctx.config.data
    try:
        load_examples(source, "preference", d.eval_split, d.skip_invalid)
    except DataError:
        return False
    return True


def make_evaluator(ctx: RunContext):
    """eval_loss and eval_rewards/*, eval_kl; on preference pairs also
    eval_rewards/pair_accuracy."""
    _, source = common.data_sources(ctx, "unpaired")
    if source is None or ctx.config.train.eval_batches < 1:
        return None
    if _eval_rows_are_pairs(ctx, source):
        batches = [unpair_batch(b) for b in pref.make_eval_batches(ctx)]
    else:
        batches = common.eval_pipeline_batches(ctx, "unpaired", build_pipeline)
    return common.batch_loss_evaluator(ctx, make_loss(ctx), batches)


def make_loss(ctx: RunContext):
    cfg = ctx.task_config
    return functools.partial(
        kto_task_loss, beta=cfg.beta, desirable_weight=cfg.desirable_weight,
        undesirable_weight=cfg.undesirable_weight,
        logits_chunk_size=ctx.config.train.logits_chunk_size,
    )


def batch_spec(config) -> dict:
    """An unpaired batch (``jaxpt.data.build_unpaired_pipeline``): ``train.batch_size``
    examples and their mismatched rows of ``data.seq_len``, labels, masks and prompt
    lengths."""
    rows = (config.train.batch_size, config.data.seq_len)
    examples = (config.train.batch_size,)
    spec = {}
    for prefix in ("", "kl_"):
        for field in pref.ROW_FIELDS:
            spec[f"{prefix}{field}"] = (rows, np.float32 if field == "loss_mask" else np.int32)
    return {**spec, "label": (examples, np.float32), "example_mask": (examples, np.float32),
            "prompt_length": (examples, np.int32)}


TASK = Task(
    name="kto",
    description="Kahneman-Tversky optimization on unpaired desirable/undesirable examples "
    "vs a frozen reference",
    config_cls=KtoConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=make_train_source,
    make_evaluator=make_evaluator,
    export=common.export_causal_lm,
    uses_reference=lambda config: True,
    batch_spec=batch_spec,
    build_abstract=common.abstract_causal_lm,
)
