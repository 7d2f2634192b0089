"""Reward modeling: a Bradley-Terry loss on a scalar head read at the last real token.

The model is a ``SequenceClassifier`` (decoder + ``score``) initialized from a causal-LM
checkpoint (its ``lm_head`` ignored, the head seeded), a ``...ForSequenceClassification``
checkpoint, or a preset (random init). Export writes the ``...ForSequenceClassification``
layout that ``transformers.AutoModelForSequenceClassification`` loads.
"""

from __future__ import annotations

import dataclasses
import functools

from jaxpt.config import ConfigError
from jaxpt.losses import bradley_terry_loss
from jaxpt.step import LossOutput, StepContext
from jaxpt.tasks import _preference as pref
from jaxpt.tasks import common
from jaxpt.tasks.base import BuiltModel, RunContext, Task


@dataclasses.dataclass(frozen=True)
class RmConfig:
    center_coef: float = 0.0  # adds center_coef * (r_c + r_r)^2: keeps rewards near zero
    use_margin: bool = True  # subtract the data's `margin` column inside the sigmoid
    max_prompt_length: int | None = None  # prompt tokens kept when cutting; None: seq_len // 2

    def __post_init__(self):
        if self.center_coef < 0:
            raise ConfigError(f"config key 'rm.center_coef' must be >= 0, got {self.center_coef}")


def pair_rewards(model, batch: dict):
    """(chosen rewards [B], rejected rewards [B]) from one forward pass over both sides."""
    rows = pref.stack_pairs(batch)
    scores_2b1 = model(
        rows["input_ids"], positions=rows["positions"], segment_ids=rows["segment_ids"]
    )
    return pref.split_pairs(scores_2b1[:, 0])


def rm_loss(
    model, batch: dict, ctx: StepContext, *, center_coef: float = 0.0, use_margin: bool = True
) -> LossOutput:
    """Bradley-Terry ``-log sigmoid(r_c - r_r - margin)`` (+ centering) summed over real
    pairs / number of real pairs; metrics accuracy, margin, reward_chosen, reward_rejected."""
    reward_chosen_b, reward_rejected_b = pair_rewards(model, batch)
    margin_b = batch["margin"] if use_margin else None
    loss_b, metrics_b = bradley_terry_loss(
        reward_chosen_b, reward_rejected_b, margin_b, center_coef
    )
    return pref.pair_sums(loss_b, metrics_b, batch["pair_mask"])


def build(ctx: RunContext) -> BuiltModel:
    """The classifier on the run's mesh (pad id from the tokenizer, so scores are read where
    transformers reads them)."""
    from jaxpt.models.classifier import load_classifier

    common.check_model_path("model.path", ctx.config.model.path)
    tokenizer = common.resolve_tokenizer(ctx)
    model = load_classifier(
        ctx.config.model.path, num_labels=1, pad_token_id=tokenizer.pad_token_id,
        **common.model_kwargs(ctx),
    )
    common.check_vocab(tokenizer, model)
    return BuiltModel(model)


def make_loss(ctx: RunContext):
    cfg = ctx.task_config
    return functools.partial(rm_loss, center_coef=cfg.center_coef, use_margin=cfg.use_margin)


def make_evaluator(ctx: RunContext):
    """eval_loss, eval_accuracy (pairwise), eval_margin, eval_reward_chosen/rejected."""
    batches = pref.make_eval_batches(ctx)
    return common.batch_loss_evaluator(ctx, make_loss(ctx), batches)


def export(ctx: RunContext, state, out_dir: str) -> None:
    """A ``...ForSequenceClassification`` HF checkpoint plus the tokenizer files."""
    from jaxpt.models.classifier import save_classifier

    common.export_with_tokenizer(ctx, state, out_dir, save_classifier)


def build_abstract(ctx: RunContext, hf_config: dict) -> BuiltModel:
    """``build`` from the architecture alone (for ``nnx.eval_shape``): the classifier of
    ``hf_config``, its pad id the config's (the tokenizer's only moves where scores are
    read)."""
    from jaxpt.models.classifier import init_classifier

    return BuiltModel(init_classifier(hf_config, num_labels=1, **common.model_kwargs(ctx)))


TASK = Task(
    name="rm",
    description="reward modeling (Bradley-Terry on a scalar head, optional margin/centering)",
    config_cls=RmConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=pref.make_train_source,
    make_evaluator=make_evaluator,
    export=export,
    batch_spec=pref.batch_spec,
    build_abstract=build_abstract,
)
