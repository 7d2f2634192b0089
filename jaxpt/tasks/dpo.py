"""Direct preference optimization (sigmoid / cDPO, IPO, hinge) against a frozen reference,
and the reference-free SimPO and ORPO (``dpo.loss_type: simpo | orpo``: no reference is kept
or computed).

The reference starts as a copy of the policy's initial weights (or ``dpo.ref_model``) and
lives in ``TrainState.ref_params``: sharded like the policy, never differentiated, without
optimizer state, and not checkpointed (a resumed run re-reads it from its source). With
``dpo.precompute_ref`` the reference's sequence log-probabilities are computed once per
dataset before training, keyed by each pair's token content, and attached to every batch
by the source, so they follow the pairs through shuffling and resumption; then no
reference model is kept.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.config import ConfigError
from jaxpt.losses import (
    DPO_LOSS_TYPES,
    REFERENCE_FREE_LOSS_TYPES,
    dpo_loss,
    orpo_loss,
    simpo_loss,
)
from jaxpt.state import reference_model
from jaxpt.step import LossOutput, StepContext
from jaxpt.tasks import _preference as pref
from jaxpt.tasks import common
from jaxpt.tasks.base import BuiltModel, RunContext, Task

log = logging.getLogger(__name__)

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
_TABLE_KEY = "dpo_reference_logps"  # in RunContext.cache: build -> sources/evaluator


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    # scale of the implicit reward beta * (log pi - log ref); simpo: of beta * logp / tokens
    # (the paper uses 2 to 2.5); orpo: the weight of the odds-ratio term (the paper's lambda)
    beta: float = 0.1
    loss_type: str = "sigmoid"  # sigmoid | ipo | hinge | simpo | orpo
    label_smoothing: float = 0.0  # sigmoid, simpo: the assumed label-flip rate, in [0, 0.5)
    simpo_gamma: float = 0.5  # simpo: the target reward margin
    ref_model: str | None = None  # None: the policy's initial weights
    precompute_ref: bool = False  # reference logprobs once per dataset, no reference model
    max_prompt_length: int | None = None  # prompt tokens kept when cutting; None: seq_len // 2

    def __post_init__(self):
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(
                f"config key 'dpo.loss_type' must be one of {DPO_LOSS_TYPES}, got {self.loss_type!r}"
            )
        if self.beta <= 0:
            raise ConfigError(f"config key 'dpo.beta' must be > 0, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(
                f"config key 'dpo.label_smoothing' must be in [0, 0.5), got {self.label_smoothing}"
            )
        if self.loss_type in REFERENCE_FREE_LOSS_TYPES and self.ref_model is not None:
            raise ConfigError(
                f"config key 'dpo.ref_model' is set, but dpo.loss_type {self.loss_type!r} "
                "uses no reference model"
            )


def reference_free(cfg: DpoConfig) -> bool:
    return cfg.loss_type in REFERENCE_FREE_LOSS_TYPES


def pair_logps(model, batch: dict, logits_chunk_size: int = 0):
    """Sequence log-probs (summed over response tokens, i.e. ``loss_mask``) of the chosen and
    rejected responses [B] each, from one forward pass over the stacked [2B, S] batch; the
    LM head runs ``logits_chunk_size`` positions at a time (0: all at once)."""
    return pref.split_pairs(pref.row_logps(model, pref.stack_pairs(batch), logits_chunk_size))


def dpo_task_loss(
    model,
    batch: dict,
    ctx: StepContext,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    logits_chunk_size: int = 0,
) -> LossOutput:
    """DPO summed over real pairs / number of real pairs. Reference log-probs come from the
    batch (precomputed) or from a forward pass with the reference params ``ctx.ref_params``;
    SimPO and ORPO use none, but each side's response length."""
    policy_chosen_b, policy_rejected_b = pair_logps(model, batch, logits_chunk_size)
    if loss_type in REFERENCE_FREE_LOSS_TYPES:
        tokens = (jnp.sum(batch[f"{side}_loss_mask"], axis=-1) for side in pref.SIDES)
        if loss_type == "simpo":
            loss_b, metrics_b = simpo_loss(policy_chosen_b, policy_rejected_b, *tokens,
                                           beta=beta, gamma=simpo_gamma,
                                           label_smoothing=label_smoothing)
        else:
            loss_b, metrics_b = orpo_loss(policy_chosen_b, policy_rejected_b, *tokens,
                                          beta=beta)
        return pref.pair_sums(loss_b, metrics_b, batch["pair_mask"])
    if REF_KEYS[0] in batch:
        ref_chosen_b, ref_rejected_b = batch[REF_KEYS[0]], batch[REF_KEYS[1]]
    else:
        ref_chosen_b, ref_rejected_b = pair_logps(
            reference_model(model, ctx.ref_params), batch, logits_chunk_size
        )
    loss_b, metrics_b = dpo_loss(
        policy_chosen_b,
        policy_rejected_b,
        jax.lax.stop_gradient(ref_chosen_b),
        jax.lax.stop_gradient(ref_rejected_b),
        beta=beta,
        loss_type=loss_type,
        label_smoothing=label_smoothing,
    )
    return pref.pair_sums(loss_b, metrics_b, batch["pair_mask"])


# ------------------------------------------------------------------- precomputed reference


def pair_key(batch: dict, i: int) -> bytes:
    """A pair's identity: a hash of its tokens and masks (what its log-probs depend on)."""
    h = hashlib.blake2b(digest_size=16)
    for side in pref.SIDES:
        for field in ("input_ids", "loss_mask"):
            h.update(np.ascontiguousarray(batch[f"{side}_{field}"][i]).tobytes())
    return h.digest()


def reference_table(ctx: RunContext, ref_model, sources) -> dict[bytes, tuple[float, float]]:
    """Reference (chosen, rejected) log-probs of every pair in ``sources`` ((source, split)
    pairs), one ordered pass over the full datasets on the run's mesh. Every process
    computes the whole table, so any process's shard of shuffled batches can look it up."""
    from jaxpt.sharding import batch_sharding, replicated

    graphdef, params, rest = nnx.split(ref_model, nnx.Param, ...)

    @functools.partial(jax.jit, out_shardings=replicated(ctx.mesh))
    def logps(params, batch):
        return pair_logps(nnx.merge(graphdef, params, rest), batch)

    def put(v):
        sharding = batch_sharding(ctx.mesh, v.ndim)
        return jax.make_array_from_callback(v.shape, sharding, lambda index: v[index])

    table = {}
    for source, split in sources:
        pipeline = pref.build_pipeline(
            ctx,
            source,
            train=False,
            split=split,
            batch_size=ctx.config.train.batch_size,
            shard_index=0,
            shard_count=1,
        )
        for batch in pipeline:
            chosen_b, rejected_b = logps(params, {k: put(v) for k, v in batch.items()})
            chosen_b = np.asarray(chosen_b.addressable_data(0))
            rejected_b = np.asarray(rejected_b.addressable_data(0))
            for i in np.flatnonzero(batch["pair_mask"]):
                table[pair_key(batch, i)] = (float(chosen_b[i]), float(rejected_b[i]))
        pipeline.close()
    return table


def attach_reference(batch: dict, table: dict) -> dict:
    """The batch plus ``ref_chosen_logps``/``ref_rejected_logps`` [B] looked up by pair."""
    values = np.zeros((len(batch["pair_mask"]), 2), np.float32)
    for i in np.flatnonzero(batch["pair_mask"]):
        key = pair_key(batch, i)
        if key not in table:
            raise KeyError("a batch holds a pair that the reference pass did not see")
        values[i] = table[key]
    return {**batch, REF_KEYS[0]: values[:, 0], REF_KEYS[1]: values[:, 1]}


class ReferenceSource(common.PipelineSource):
    """A pipeline source whose batches carry the precomputed reference log-probs."""

    def __init__(self, pipeline, table: dict):
        super().__init__(pipeline)
        self.table = table

    def next(self, state):
        batch, host_metrics = super().next(state)
        return attach_reference(batch, self.table), host_metrics


# ------------------------------------------------------------------- the Task


def uses_reference(config) -> bool:
    """Whether the train step runs the reference (else its log-probs are precomputed, or
    the loss is reference-free)."""
    return not config.dpo.precompute_ref and not reference_free(config.dpo)


def precomputes_reference(config) -> bool:
    return config.dpo.precompute_ref and not reference_free(config.dpo)


def build(ctx: RunContext) -> BuiltModel:
    """The policy (as SFT builds it) and the reference params, or, with ``precompute_ref``,
    the reference log-prob table (in ``ctx.cache``) and no reference params."""
    cfg = ctx.task_config
    model = common.build_causal_lm(ctx)
    if reference_free(cfg):
        return BuiltModel(model)
    if uses_reference(ctx.config):
        ref_params = common.reference_params(ctx, model, cfg.ref_model, "dpo.ref_model")
        return BuiltModel(model, ref_params=ref_params)
    reference = model  # the initial policy, unless a reference model is named
    if cfg.ref_model is not None or common.lora_enabled(ctx.config):  # LoRA: adapters off
        reference = reference_model(
            model, common.reference_params(ctx, model, cfg.ref_model, "dpo.ref_model")
        )
    d = ctx.config.data
    train, evaluation = common.data_sources(ctx, "preference")
    sources = [(train, d.train_split)]
    if evaluation is not None and ctx.config.train.eval_batches > 0:
        sources.append((evaluation, d.eval_split))
    table = reference_table(ctx, reference, sources)
    ctx.cache[_TABLE_KEY] = table
    ctx.summary["reference_pairs"] = len(table)
    log.info("precomputed reference log-probs of %d pairs", len(table))
    return BuiltModel(model)


def _table(ctx: RunContext):
    return ctx.cache.get(_TABLE_KEY) if precomputes_reference(ctx.config) else None


def make_train_source(ctx: RunContext):
    source = pref.make_train_source(ctx)
    table = _table(ctx)
    return source if table is None else ReferenceSource(source.pipeline, table)


def make_evaluator(ctx: RunContext):
    """eval_loss and eval_rewards/{chosen,rejected,margins,accuracy}, eval_logps/*."""
    batches = pref.make_eval_batches(ctx)
    if batches is None:
        return None
    table = _table(ctx)
    if table is not None:
        batches = [attach_reference(b, table) for b in batches]
    return common.batch_loss_evaluator(ctx, make_loss(ctx), batches)


def make_loss(ctx: RunContext):
    cfg = ctx.task_config
    return functools.partial(
        dpo_task_loss,
        beta=cfg.beta,
        loss_type=cfg.loss_type,
        label_smoothing=cfg.label_smoothing,
        simpo_gamma=cfg.simpo_gamma,
        logits_chunk_size=ctx.config.train.logits_chunk_size,
    )


def batch_spec(config) -> dict:
    """A preference batch (``_preference.batch_spec``), with ``precompute_ref`` also the
    pairs' reference log-probs (``REF_KEYS``, [B] each)."""
    spec = pref.batch_spec(config)
    if precomputes_reference(config):
        spec.update({key: ((config.train.batch_size,), np.float32) for key in REF_KEYS})
    return spec


TASK = Task(
    name="dpo",
    description="direct preference optimization (sigmoid/cDPO, ipo, hinge) vs a frozen "
    "reference; reference-free simpo, orpo",
    config_cls=DpoConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=make_train_source,
    make_evaluator=make_evaluator,
    export=common.export_causal_lm,
    uses_reference=uses_reference,
    batch_spec=batch_spec,
    build_abstract=common.abstract_causal_lm,
)
