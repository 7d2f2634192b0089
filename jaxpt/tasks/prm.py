"""Process reward modeling: a token classifier that labels each step of a solution right or
wrong, trained on step-labelled solutions.

Rows are in the stepwise format (``{"prompt", "completions": [steps], "labels": [bool]}``,
as TRL's PRM trainer reads them); each step is followed by ``prm.step_separator`` and its
label is read at the step's last token, so the model has seen the whole step. The model is
a ``TokenClassifier`` with two labels (class 1: the step is right) initialized from a
causal-LM checkpoint (its ``lm_head`` ignored, the head seeded), a
``...ForTokenClassification`` checkpoint or a preset. Export writes the
``...ForTokenClassification`` layout that ``transformers.AutoModelForTokenClassification``
loads, with the separator and ``prm.aggregate`` in its config: ``jaxpt.rewards``'s
``load_reward_model`` then scores a completion as the minimum, product or last of its steps'
probabilities of being right (a reward for GRPO/PPO, a reranker for best-of-n).
"""

from __future__ import annotations

import dataclasses
import functools

import jax.numpy as jnp
import numpy as np

from jaxpt.config import ConfigError
from jaxpt.losses import first_bad_step, step_label_loss
from jaxpt.losses.process import AGGREGATES, READINGS
from jaxpt.step import LossOutput, StepContext, safe_ratio
from jaxpt.tasks import common
from jaxpt.tasks.base import BuiltModel, RunContext, Task

NUM_LABELS = 2  # bad, good


@dataclasses.dataclass(frozen=True)
class PrmConfig:
    step_separator: str = "\n"  # follows every step; the step's label is read at its end
    aggregate: str = "min"  # a solution's reward from its step scores: min | prod | last
    # How a step's probability of being right is read: step_end (at its last token, as
    # TRL and published PRMs do) | token_product (every reply token's, multiplied up to it)
    reading: str = "step_end"
    # Train on each solution's last label only (its outcome): an outcome reward model on
    # the same rows, head and reading, to compare with the process one
    train_on_last_step_only: bool = False
    max_prompt_length: int | None = None  # prompt tokens kept when cutting; None: seq_len // 2

    def __post_init__(self):
        if not self.step_separator:
            raise ConfigError("config key 'prm.step_separator' must be a non-empty string")
        if self.reading not in READINGS:
            raise ConfigError(f"config key 'prm.reading' must be one of {READINGS}, "
                              f"got {self.reading!r}")
        if self.aggregate not in AGGREGATES:
            raise ConfigError(f"config key 'prm.aggregate' must be one of {AGGREGATES}, "
                              f"got {self.aggregate!r}")


def prm_loss(model, batch: dict, ctx: StepContext, *, reading: str = "step_end",
             last_step_only: bool = False) -> LossOutput:
    """Cross-entropy of each step's label summed over labelled steps / number of steps;
    metrics ``step_accuracy`` (the step's label predicted at p >= 0.5) and totals
    ``solutions`` and ``first_bad_step_hits`` (solutions whose predicted first bad step, or
    none, is the labelled one)."""
    logits_btl = model(
        batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )
    # Rows that pad a short batch are all zeros: their segment ids say they hold no steps.
    labels_bt = jnp.where(batch["segment_ids"] > 0, batch["step_labels"], -1)
    if last_step_only:
        t_bt = jnp.broadcast_to(jnp.arange(labels_bt.shape[1]), labels_bt.shape)
        last_b = jnp.max(jnp.where(labels_bt >= 0, t_bt, -1), axis=1)
        labels_bt = jnp.where(t_bt == last_b[:, None], labels_bt, -1)
    loss_bt, mask_bt, p_good_bt = step_label_loss(logits_btl, labels_bt,
                                                  batch.get("response_mask"), reading)
    right_bt = ((p_good_bt >= 0.5) == (labels_bt == 1)) & mask_bt
    predicted_b = first_bad_step(p_good_bt < 0.5, mask_bt)
    labelled_b = first_bad_step(labels_bt == 0, mask_bt)
    solution_b = batch["example_mask"] > 0
    return LossOutput(
        numerator=jnp.sum(loss_bt),
        denominator=jnp.sum(mask_bt.astype(jnp.float32)),
        metrics={"step_accuracy": jnp.sum(right_bt.astype(jnp.float32))},
        totals={"solutions": jnp.sum(solution_b.astype(jnp.float32)),
                "first_bad_step_hits": jnp.sum(
                    ((predicted_b == labelled_b) & solution_b).astype(jnp.float32))},
    )


def build_pipeline(ctx: RunContext, source, *, train: bool):
    from jaxpt.data import build_step_pipeline

    cfg = ctx.task_config
    return build_step_pipeline(
        source, common.resolve_tokenizer(ctx), separator=cfg.step_separator,
        max_prompt_length=cfg.max_prompt_length, **common.pipeline_options(ctx, train=train),
    )


def build(ctx: RunContext) -> BuiltModel:
    from jaxpt.models.classifier import load_classifier

    common.check_model_path("model.path", ctx.config.model.path)
    tokenizer = common.resolve_tokenizer(ctx)
    model = load_classifier(
        ctx.config.model.path, num_labels=NUM_LABELS, kind="token",
        pad_token_id=tokenizer.pad_token_id, **common.model_kwargs(ctx),
    )
    common.check_vocab(tokenizer, model)
    return BuiltModel(model)


def make_loss(ctx: RunContext):
    cfg = ctx.task_config
    return functools.partial(prm_loss, reading=cfg.reading,
                             last_step_only=cfg.train_on_last_step_only)


def make_train_source(ctx: RunContext) -> common.PipelineSource:
    return common.train_pipeline_source(ctx, "steps", build_pipeline)


def make_evaluator(ctx: RunContext):
    """eval_loss, eval_step_accuracy and eval_first_bad_step_accuracy (the share of held-out
    solutions whose first bad step, or its absence, the model finds)."""
    batches = common.eval_pipeline_batches(ctx, "steps", build_pipeline)
    evaluate = common.batch_loss_evaluator(ctx, make_loss(ctx), batches)
    if evaluate is None:
        return None

    def with_first_bad_step(state) -> dict[str, float]:
        out = evaluate(state)
        hits, solutions = out.pop("eval_first_bad_step_hits"), out["eval_solutions"]
        out["eval_first_bad_step_accuracy"] = float(safe_ratio(hits, solutions))
        return out

    return with_first_bad_step


def export(ctx: RunContext, state, out_dir: str) -> None:
    """A ``...ForTokenClassification`` HF checkpoint plus the tokenizer files; its config
    also holds ``step_separator``, ``step_reading`` and ``step_aggregate`` for
    ``load_reward_model``."""
    from jaxpt.models.classifier import save_classifier

    cfg = ctx.task_config
    extra = {"step_separator": cfg.step_separator, "step_reading": cfg.reading,
             "step_aggregate": cfg.aggregate}
    common.export_with_tokenizer(
        ctx, state, out_dir, functools.partial(save_classifier, extra_config=extra)
    )


def build_abstract(ctx: RunContext, hf_config: dict) -> BuiltModel:
    from jaxpt.models.classifier import init_classifier

    return BuiltModel(init_classifier(hf_config, num_labels=NUM_LABELS, kind="token",
                                      **common.model_kwargs(ctx)))


def batch_spec(config) -> dict:
    """A step batch: ``train.batch_size`` solutions, one per row of ``data.seq_len``
    (``jaxpt.data.features.step_row``)."""
    rows = (config.train.batch_size, config.data.seq_len)
    spec = {k: (rows, np.int32) for k in ("input_ids", "positions", "segment_ids",
                                          "step_labels")}
    return {**spec, "response_mask": (rows, np.float32),
            "example_mask": ((config.train.batch_size,), np.float32)}


TASK = Task(
    name="prm",
    description="process reward modeling (a token classifier labels each step right or wrong)",
    config_cls=PrmConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=make_train_source,
    make_evaluator=make_evaluator,
    export=export,
    batch_spec=batch_spec,
    build_abstract=build_abstract,
)
