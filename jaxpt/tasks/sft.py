"""Supervised fine-tuning: masked next-token cross-entropy on (packed) chat examples."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.tasks.base import LossOutput, RunContext, StepContext, Task, loss_evaluator

log = logging.getLogger(__name__)

ARITHMETIC = "arithmetic"


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


def sft_loss(model, batch: dict, ctx: StepContext, z_loss: float = 0.0) -> LossOutput:
    """Sum of CE over trained tokens / number of trained tokens (see the loss contract).

    Packed documents never attend across each other (segment_ids) and restart positions,
    and targets never cross a document boundary, so packing does not change the loss.
    """
    logits_btv = model(
        batch["input_ids"], positions=batch["positions"], segment_ids=batch["segment_ids"]
    )
    mask_bt = batch["loss_mask"].astype(jnp.float32)
    ce_bt, logz_bt, correct_bt = token_cross_entropy(logits_btv, batch["target_ids"])
    numerator = jnp.sum(ce_bt * mask_bt)
    if z_loss:
        numerator = numerator + z_loss * jnp.sum(jnp.square(logz_bt) * mask_bt)
    tokens = jnp.sum(mask_bt)
    return LossOutput(
        numerator=numerator,
        denominator=tokens,
        metrics={"accuracy": jnp.sum(correct_bt * mask_bt)},
        totals={"tokens": tokens},
    )


# ----------------------------------------------------------------------------- building


def resolve_tokenizer(ctx: RunContext):
    """The configured tokenizer, the model dir's own, or the shipped char-level one."""
    from jaxpt.data import load_tokenizer

    if ctx.tokenizer is None:
        cfg = ctx.config.model
        name = cfg.tokenizer
        if name is None and os.path.isdir(cfg.path):
            has_tokenizer = any(
                os.path.exists(os.path.join(cfg.path, f))
                for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
            )
            name = cfg.path if has_tokenizer else None
        ctx.tokenizer = load_tokenizer(name)
    return ctx.tokenizer


def model_kwargs(ctx: RunContext) -> dict:
    """Keyword arguments of every model loader for this run (seed, mesh, dtypes, ...)."""
    cfg = ctx.config.model
    return {
        "seed": ctx.config.seed, "mesh": ctx.mesh, "rules": ctx.rules, "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype, "remat": cfg.remat, "attention_impl": cfg.attention_impl,
    }


def check_vocab(tokenizer, model) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}"
        )


def build(ctx: RunContext):
    """The causal LM (preset random init or HF checkpoint) on the run's mesh; no extras."""
    from jaxpt.models import load_model

    model = load_model(ctx.config.model.path, **model_kwargs(ctx))
    check_vocab(resolve_tokenizer(ctx), model)
    return model, None


def generated_arithmetic(ctx: RunContext, split: str, generator, name: str) -> list[dict]:
    """Rows of the shipped arithmetic task from ``generator`` (examples or preference
    pairs), also written to ``<output_dir>/data/<name>_<split>.jsonl`` for inspection."""
    from jaxpt.data import write_jsonl

    a = ctx.config.data.arithmetic
    n = a.num_train if split == "train" else a.num_test
    rows = generator(n, a.seed, split, min_digits=a.min_digits, max_digits=a.max_digits)
    if ctx.is_main_process:  # every process generates the same rows
        path = os.path.join(ctx.output_dir, "data", f"{name}_{split}.jsonl")
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_jsonl(path, rows)
    return rows


def _arithmetic_rows(ctx: RunContext, split: str) -> list[dict]:
    from jaxpt.data import generate_examples

    return generated_arithmetic(ctx, split, generate_examples, "arithmetic")


def _sources(ctx: RunContext):
    """(train source, eval source or None) for the data pipeline (made once per run)."""
    if "sft_sources" not in ctx.cache:
        ctx.cache["sft_sources"] = _make_sources(ctx)
    return ctx.cache["sft_sources"]


def _make_sources(ctx: RunContext):
    from jaxpt.data import LoadedExamples, load_examples

    d = ctx.config.data
    if d.train == ARITHMETIC:
        train = _arithmetic_rows(ctx, "train")
    else:
        train = d.train
    if d.eval is not None:
        if d.eval == ARITHMETIC:
            return train, _arithmetic_rows(ctx, "test")
        return train, d.eval
    if d.eval_fraction > 0:
        loaded = load_examples(train, "sft", d.train_split, d.skip_invalid)
        order = np.random.default_rng(ctx.config.seed).permutation(len(loaded.rows))
        n_eval = max(1, round(d.eval_fraction * len(order)))
        if n_eval >= len(order):
            raise ValueError(f"data.eval_fraction={d.eval_fraction} leaves no training rows")
        pick = lambda idx: [loaded.rows[i] for i in sorted(idx)]
        train_part = LoadedExamples(
            pick(order[n_eval:]), loaded.source, loaded.num_read, loaded.num_skipped,
            loaded.skip_reasons,
        )
        eval_part = LoadedExamples(pick(order[:n_eval]), loaded.source + " (eval)", n_eval, 0, [])
        return train_part, eval_part
    return train, None


def _pipeline_kwargs(ctx: RunContext) -> dict:
    d = ctx.config.data
    return {
        "seq_len": d.seq_len, "packing": d.packing, "completion_only": d.completion_only,
        "max_length": d.max_length, "overflow": d.truncation, "skip_invalid": d.skip_invalid,
    }


def local_batch_size(ctx: RunContext) -> int:
    batch_size, processes = ctx.config.train.batch_size, jax.process_count()
    if batch_size % processes:
        raise ValueError(f"train.batch_size={batch_size} must divide over {processes} processes")
    return batch_size // processes


class PipelineSource:
    """A BatchSource over a Grain pipeline (SFT, RM, DPO): ignores the train state."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def next(self, state):
        return next(self.pipeline), {}

    def get_state(self) -> dict:
        return self.pipeline.get_state()

    def set_state(self, state: dict) -> None:
        self.pipeline.set_state(state)

    def close(self) -> None:
        self.pipeline.close()


def make_train_source(ctx: RunContext) -> PipelineSource:
    from jaxpt.data import build_sft_pipeline

    train, _ = _sources(ctx)
    d = ctx.config.data
    pipeline = build_sft_pipeline(
        train, resolve_tokenizer(ctx), batch_size=local_batch_size(ctx), seed=ctx.config.seed,
        split=d.train_split, shuffle=d.shuffle, num_workers=d.num_workers, **_pipeline_kwargs(ctx),
    )
    ctx.summary["data"] = pipeline.stats.as_dict()
    ctx.summary["data_skip_reasons"] = list(pipeline.skip_reasons)
    return PipelineSource(pipeline)


def make_eval_batches(ctx: RunContext) -> list[dict] | None:
    from jaxpt.data import build_sft_pipeline, eval_batches

    _, source = _sources(ctx)
    if source is None or ctx.config.train.eval_batches < 1:
        return None
    d = ctx.config.data
    pipeline = build_sft_pipeline(
        source, resolve_tokenizer(ctx), batch_size=local_batch_size(ctx), seed=0,
        split=d.eval_split, shuffle=False, num_epochs=1, **_pipeline_kwargs(ctx),
    )
    ctx.summary["eval_data"] = pipeline.stats.as_dict()
    return eval_batches(pipeline, ctx.config.train.eval_batches)


def make_evaluator(ctx: RunContext):
    batches = make_eval_batches(ctx)
    return None if batches is None else loss_evaluator(ctx, make_loss(ctx), batches)


def make_loss(ctx: RunContext):
    """The SFT loss with this run's options bound."""
    return functools.partial(sft_loss, z_loss=ctx.task_config.z_loss)


def export_with_tokenizer(ctx: RunContext, state, out_dir: str, save_fn) -> None:
    """``save_fn(model, out_dir, dtype=...)`` (an HF checkpoint) plus the tokenizer files."""
    save_fn(state.model(), out_dir, dtype=ctx.config.export.dtype)
    if ctx.is_main_process:
        resolve_tokenizer(ctx).save_pretrained(out_dir)


def export(ctx: RunContext, state, out_dir: str) -> None:
    """An HF causal-LM checkpoint (safetensors + config) plus the tokenizer files."""
    from jaxpt.models import save_pretrained

    export_with_tokenizer(ctx, state, out_dir, save_pretrained)


TASK = Task(
    name="sft",
    description="supervised fine-tuning (masked next-token cross-entropy, packed)",
    config_cls=SftConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=make_train_source,
    make_evaluator=make_evaluator,
    export=export,
)
