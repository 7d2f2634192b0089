"""What every task uses: the model and its tokenizer, the frozen reference, the data sources
with their eval split (files, the shipped arithmetic task or reasoning-gym problems),
pipeline batch sources, and the HF export."""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import numpy as np
from flax import nnx

from jaxpt.config import ConfigError
from jaxpt.tasks.base import BuiltModel, RunContext

log = logging.getLogger(__name__)

ARITHMETIC = "arithmetic"  # data.train / data.eval: the shipped, generated arithmetic task
REASONING_GYM = "reasoning_gym"  # data.train / data.eval: generated reasoning-gym problems

# Row kinds as `jaxpt.data.load_examples` names them, and the arithmetic generator of each.
_ARITHMETIC_FILES = {"sft": "arithmetic", "prompt": "arithmetic", "preference": "arithmetic_pref",
                     "unpaired": "arithmetic_pref", "steps": "arithmetic_steps"}


# ------------------------------------------------------------------------ model, tokenizer


def check_model_path(key: str, path: str) -> None:
    """A ConfigError when ``path`` (config key ``key``) is neither a preset, an existing
    directory or file, a ``pkg:`` file of an installed package, nor a hub name, saying
    which command creates it (or which package to install) when we know."""
    from jaxpt.data.tokenizer import is_hub_name
    from jaxpt.models import preset_config, resolve_checkpoint_path

    try:
        resolved = resolve_checkpoint_path(path)
    except (ImportError, OSError, ValueError) as error:
        raise ConfigError(f"config key '{key}': {error}") from None
    if preset_config(path) is not None or os.path.exists(resolved) or is_hub_name(path):
        return
    hint = ""
    if "quickstart" in os.path.normpath(path).split(os.sep):
        hint = (
            "; it is written by the quickstart: run `make quickstart` (or `python -m "
            "jaxpt.quickstart --stages sft`) first, or point the key at another model"
        )
    raise ConfigError(
        f"config key '{key}': {path!r} is not a preset, an existing model directory or a "
        f"hub name (org/name){hint}"
    )


def resolve_tokenizer(ctx: RunContext):
    """The run's tokenizer (``model.tokenizer``, else the model's own), loaded once."""
    from jaxpt.data import tokenizer_for_model

    if ctx.tokenizer is None:
        ctx.tokenizer = tokenizer_for_model(ctx.config.model.path, ctx.config.model.tokenizer)
    return ctx.tokenizer


def model_kwargs(ctx: RunContext) -> dict:
    """Keyword arguments of every model loader for this run (seed, mesh, dtypes, ...)."""
    cfg = ctx.config.model
    return {
        "seed": ctx.config.seed, "mesh": ctx.mesh, "rules": ctx.rules, "dtype": cfg.dtype,
        "param_dtype": cfg.param_dtype, "remat": cfg.remat, "attention_impl": cfg.attention_impl,
        "scan_layers": cfg.scan_layers,
    }


def check_vocab(tokenizer, model) -> None:
    """Every token id the tokenizer can produce must have an embedding row."""
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens but the model's vocab_size is "
            f"{model.config.vocab_size}"
        )


def build_causal_lm(ctx: RunContext):
    """The causal LM of ``model.path`` (preset random init or checkpoint) on the run's mesh."""
    from jaxpt.models import load_model

    check_model_path("model.path", ctx.config.model.path)
    model = load_model(ctx.config.model.path, **model_kwargs(ctx))
    check_vocab(resolve_tokenizer(ctx), model)
    attach_lora(ctx, model)
    return model


def lora_enabled(config) -> bool:
    """Whether the run trains LoRA adapters (``lora.rank`` or ``lora.init_adapter`` set);
    False for configs without a ``lora`` section (e.g. rejection sampling's)."""
    lora = getattr(config, "lora", None)
    return lora is not None and bool(lora.rank or lora.init_adapter)


def attach_lora(ctx: RunContext, model) -> None:
    """Add the ``lora`` section's adapters to ``model`` (fresh, or read from
    ``lora.init_adapter``); a ConfigError naming the key when they do not fit it."""
    from jaxpt.models.lora import DEFAULT_TARGETS, LoRASpec, add_adapters, projections, select
    from jaxpt.models.peft_io import AdapterError, load_adapter_weights, read_adapter

    if not lora_enabled(ctx.config):
        return
    cfg = ctx.config.lora
    targets = cfg.targets
    targets = tuple(targets) if isinstance(targets, (list, tuple)) else targets
    adapter = paths = None
    rank, alpha = cfg.rank, cfg.alpha
    if cfg.init_adapter:
        try:
            adapter = read_adapter(cfg.init_adapter)
        except AdapterError as error:
            raise ConfigError(f"config key 'lora.init_adapter': {error}") from None
        for key, ours, theirs in (("lora.rank", rank, adapter.rank),
                                  ("lora.alpha", alpha, adapter.alpha)):
            if ours and ours != theirs:
                raise ConfigError(
                    f"config key '{key}' ({ours}) differs from the adapter's ({theirs}) in "
                    f"{cfg.init_adapter}; leave it unset to take the adapter's"
                )
        rank, alpha = adapter.rank, adapter.alpha
        if targets is None:
            paths = list(adapter.weights)
            unknown = sorted(set(paths) - set(projections(model)))
            if unknown:
                raise ConfigError(
                    f"config key 'lora.init_adapter': {cfg.init_adapter} adapts {unknown[0]}, "
                    "which is not a projection of this model"
                )
    spec = LoRASpec(rank, float(alpha or rank), cfg.dropout, targets or DEFAULT_TARGETS)
    try:
        if paths is None:
            paths = select(model, spec)
        add_adapters(model, spec, seed=ctx.config.seed if cfg.seed is None else cfg.seed,
                     mesh=ctx.mesh, rules=ctx.rules, paths=paths)
    except (ValueError, KeyError) as error:
        raise ConfigError(f"config key 'lora.targets': {error}") from None
    _check_peft_exportable(model, paths, cfg.export)
    if adapter is not None:
        try:
            load_adapter_weights(model, adapter)
        except AdapterError as error:
            raise ConfigError(f"config key 'lora.init_adapter': {error}") from None


def keeps_reference(config) -> bool:
    """Whether a run of ``config`` keeps a frozen copy of the weights as its reference
    (``TrainState.ref_params``): its task's loss uses a reference (``Task.uses_reference``)
    and LoRA is off (under LoRA the reference is the base with its adapters off), or the
    reference is another model (``Task.reference_is_policy`` False: a teacher). The one
    rule that task builds, memory plans and benchmarks follow."""
    from jaxpt.tasks import get_task

    task = get_task(config.task)
    uses = task.uses_reference
    if uses is None or not uses(config):
        return False
    return not lora_enabled(config) or not task.reference_is_policy


def hf_config_dict(path: str, key: str = "model.path") -> dict:
    """The HF config (a dict) of a preset, a model directory's ``config.json`` or such a
    file: a model's architecture without its weights. ``key`` names the config key in
    errors."""
    from jaxpt.models import preset_config

    config = preset_config(path)
    if config is not None:
        return config
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not (file.endswith(".json") and os.path.isfile(file)):
        raise ConfigError(
            f"config key '{key}': {path!r} is neither a preset nor a directory with a "
            "config.json (sizing a run needs the architecture only, not the weights)"
        )
    with open(file) as f:
        return json.load(f)


def abstract_causal_lm(ctx: RunContext, hf_config: dict) -> BuiltModel:
    """``build`` of a causal-LM task (``build_causal_lm`` plus, per ``keeps_reference``, a
    copy of its params as the reference) from the architecture ``hf_config`` alone, for
    ``nnx.eval_shape``: a ``BuiltModel`` of abstract variables."""
    from jaxpt.models import init_model

    model = init_model(hf_config, **model_kwargs(ctx))
    # Adapters are placed by their logical axes afterwards, not on the (maybe remote) mesh.
    attach_lora(dataclasses.replace(ctx, mesh=None), model)
    return BuiltModel(model, ref_params=abstract_reference(ctx.config, model))


def abstract_reference(config, policy):
    """The reference params ``reference_params`` gives a run of ``config`` for ``policy``
    (a copy of its params, or None per ``keeps_reference``), as ``build_abstract`` returns
    them."""
    return nnx.state(policy, nnx.Param) if keeps_reference(config) else None


def reference_source(config) -> str:
    """Where a run (re-)reads its frozen weights from, for messages: the task's
    ``ref_model`` when set, else ``model.path`` (the policy's initial weights, the base)."""
    section = getattr(config, config.task, None)
    for key in ("ref_model", "teacher"):  # distillation's teacher sits in the reference's place
        value = getattr(section, key, None)
        if value is not None:
            return f"config key '{config.task}.{key}' ({value})"
    return f"config key 'model.path' ({config.model.path})"


def reference_params(
    ctx: RunContext, policy, ref_model: str | None = None, key: str = "ref_model"
) -> nnx.State:
    """Frozen reference params for ``policy``: loaded from ``ref_model`` (config key ``key``,
    named in errors) when set, else a copy of the policy's initial params. Sharded like the
    policy, in their own buffers (the train state's are donated every step). None under
    LoRA: the reference is the policy with its adapters off, so no second copy of the
    weights is kept (see ``keeps_reference``). Checkpoints leave them out: a resumed run
    calls this again, and the checkpoint's fingerprint of them catches a changed source."""
    from jaxpt.models import load_model
    from jaxpt.state import copy_params

    if lora_enabled(ctx.config):
        if ref_model is not None:
            raise ConfigError(
                f"config key '{key}': with LoRA the reference is the base model (adapters "
                "off); unset it or set lora.rank=0"
            )
        return None  # the reference forward drops the adapters (jaxpt.state.reference_model)
    if ref_model is None:
        return copy_params(policy)
    check_model_path(key, ref_model)
    # The reference is never differentiated: no remat.
    ref = load_model(ref_model, **{**model_kwargs(ctx), "remat": "none"})
    policy_params, ref_params = nnx.state(policy, nnx.Param), nnx.state(ref, nnx.Param)
    shapes = lambda s: jax.tree.map(lambda x: (x.shape, x.dtype), s)
    if jax.tree.structure(policy_params) != jax.tree.structure(ref_params) or shapes(
        policy_params
    ) != shapes(ref_params):
        raise ConfigError(f"config key '{key}' ({ref_model}) does not have the policy's architecture")
    return ref_params


# ---------------------------------------------------------------------------------- data


def arithmetic_rows(ctx: RunContext, split: str, kind: str) -> list[dict]:
    """Rows of the shipped arithmetic task: examples (``sft``, ``prompt``), preference
    pairs or step-labelled solutions (``steps``), ``split`` train or test; also written to
    ``<output_dir>/data/<name>_<split>.jsonl`` for inspection."""
    from jaxpt.data import generate_examples, generate_preference_pairs, generate_step_rows

    a = ctx.config.data.arithmetic
    # KTO's unpaired rows: the pairs, each read as a desirable and an undesirable example.
    pairs = kind in ("preference", "unpaired")
    generator = generate_preference_pairs if pairs else generate_examples
    if kind == "steps":
        generator = functools.partial(generate_step_rows, error_rate=a.step_error_rate,
                                      mistakes=a.step_mistakes)
    n = a.num_train if split == "train" else a.num_test
    try:
        task = a.task()
        rows = generator(n, a.seed, split, task=task)
    except ValueError as error:
        raise ConfigError(f"config section 'data.arithmetic': {error}") from None
    _write_generated(ctx, f"{_ARITHMETIC_FILES[kind]}_{split}.jsonl", rows)
    return rows


def _write_generated(ctx: RunContext, name: str, rows: list[dict]) -> None:
    """Generated rows into ``<output_dir>/data/<name>`` for inspection, once (every process
    generates the same rows; the main one writes them)."""
    from jaxpt.data import write_jsonl

    if ctx.is_main_process:
        path = os.path.join(ctx.output_dir, "data", name)
        if not os.path.exists(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_jsonl(path, rows)


def reasoning_gym_source_rows(ctx: RunContext, split: str, kind: str) -> list[dict]:
    """Prompt rows of the ``data.reasoning_gym`` task: ``size`` problems from ``seed`` for
    ``train``, ``eval_size`` from ``eval_seed`` otherwise; also written to
    ``<output_dir>/data/reasoning_gym_<split>.jsonl`` for inspection."""
    from jaxpt.data.reasoning_gym import HELD_OUT_SEED, reasoning_gym_rows

    if kind != "prompt":
        raise ConfigError(f"config key 'data.train': reasoning_gym gives RL prompt rows (tasks "
                          f"grpo, ppo, rejection sampling), not {kind} rows")
    r = ctx.config.data.reasoning_gym
    if split == "train":
        seed, size = r.seed, r.size
    else:
        seed, size = HELD_OUT_SEED if r.eval_seed is None else r.eval_seed, r.eval_size
    try:
        rows = reasoning_gym_rows(r.task, size=size, seed=seed, options=r.options,
                                  instruction=r.instruction, system=r.system)
    except (ImportError, ValueError) as error:
        raise ConfigError(f"config section 'data.reasoning_gym': {error}") from None
    _write_generated(ctx, f"reasoning_gym_{split}.jsonl", rows)
    return rows


def generated_or_named(ctx: RunContext, name: str, split: str, kind: str):
    """The rows of a generated task (``arithmetic``, ``reasoning_gym``), else ``name``
    itself (a path or hub name, loaded later)."""
    if name == ARITHMETIC:
        return arithmetic_rows(ctx, split, kind)
    if name == REASONING_GYM:
        return reasoning_gym_source_rows(ctx, split, kind)
    return name


def data_sources(ctx: RunContext, kind: str):
    """(train source, eval source or None) of ``kind`` rows for this run, made once.

    A source is what the pipelines and ``load_rows`` take: a path or hub name, generated
    arithmetic or reasoning-gym rows, or already loaded rows. ``data.eval`` names the eval
    data; without it, ``data.eval_fraction`` of the train rows (a seeded choice) is held out.
    """
    key = f"data_sources/{kind}"
    if key not in ctx.cache:
        ctx.cache[key] = _make_sources(ctx, kind)
    return ctx.cache[key]


def _make_sources(ctx: RunContext, kind: str):
    from jaxpt.data import LoadedExamples, load_examples

    d = ctx.config.data
    train = generated_or_named(ctx, d.train, "train", kind)
    if d.eval is not None:
        return train, generated_or_named(ctx, d.eval, "test", kind)
    if d.eval_fraction <= 0:
        return train, None
    loaded = load_examples(train, kind, d.train_split, d.skip_invalid)
    order = np.random.default_rng(ctx.config.seed).permutation(len(loaded.rows))
    n_eval = max(1, round(d.eval_fraction * len(order)))
    if n_eval >= len(order):
        raise ConfigError(
            f"config key 'data.eval_fraction' ({d.eval_fraction}) leaves no training rows "
            f"of {loaded.source}"
        )

    def pick(indices):
        return [loaded.rows[i] for i in sorted(indices)]

    train_part = LoadedExamples(
        pick(order[n_eval:]), loaded.source, loaded.num_read, loaded.num_skipped,
        loaded.skip_reasons,
    )
    eval_part = LoadedExamples(pick(order[:n_eval]), f"{loaded.source} (eval)", n_eval, 0, [])
    return train_part, eval_part


def load_rows(ctx: RunContext, source, kind: str, split: str) -> list[dict]:
    """The validated rows of a source from ``data_sources``; skipped rows are counted in
    the run summary (``data.skip_invalid``), any other bad row is a DataError naming it."""
    from jaxpt.data import LoadedExamples, load_examples

    if source is None:
        return []
    if not isinstance(source, LoadedExamples):
        source = load_examples(source, kind, split, ctx.config.data.skip_invalid)
    if source.num_skipped:
        ctx.summary.setdefault("data_skip_reasons", []).extend(source.skip_reasons)
        data = ctx.summary.setdefault("data", {})
        data[f"{split}_skipped_invalid"] = data.get(f"{split}_skipped_invalid", 0) + (
            source.num_skipped
        )
    return source.rows


def pipeline_options(ctx: RunContext, *, train: bool) -> dict:
    """Options every data pipeline takes from the run's config: shuffled and repeated for
    training, one ordered pass for evaluation.

    Every process reads the whole global batch and keeps its own rows (``PipelineSource``):
    packing and shuffling then see the same stream as a single-process run, so a run's
    batches, and its steps, do not depend on the number of hosts.
    """
    d = ctx.config.data
    options = {
        "seq_len": d.seq_len, "batch_size": ctx.config.train.batch_size,
        "overflow": d.truncation, "skip_invalid": d.skip_invalid,
        "shard_index": 0, "shard_count": 1,
    }
    if train:
        options.update(seed=ctx.config.seed, split=d.train_split, shuffle=d.shuffle,
                       num_workers=d.num_workers)
    else:
        options.update(seed=0, split=d.eval_split, shuffle=False, num_epochs=1)
    return options


class PipelineSource:
    """A BatchSource over a Grain pipeline of global batches (SFT, RM, DPO): returns this
    process's rows of each (on the current mesh); ignores the train state."""

    def __init__(self, pipeline):
        self.pipeline = pipeline

    def next(self, state):
        from jaxpt.step import local_rows

        return local_rows(next(self.pipeline)), {}

    def get_state(self) -> dict:
        return self.pipeline.get_state()

    def set_state(self, state: dict) -> None:
        self.pipeline.set_state(state)

    def close(self) -> None:
        self.pipeline.close()


def train_pipeline_source(ctx: RunContext, kind: str, make_pipeline) -> PipelineSource:
    """The train source over ``make_pipeline(ctx, source, train=True)`` of the run's ``kind``
    train data; its data counts go to the run summary."""
    train, _ = data_sources(ctx, kind)
    pipeline = make_pipeline(ctx, train, train=True)
    ctx.summary["data"] = {**ctx.summary.get("data", {}), **pipeline.stats.as_dict()}
    ctx.summary.setdefault("data_skip_reasons", []).extend(pipeline.skip_reasons)
    return PipelineSource(pipeline)


def eval_pipeline_batches(ctx: RunContext, kind: str, make_pipeline) -> list[dict] | None:
    """Up to ``train.eval_batches`` fixed host batches of the run's ``kind`` eval data, or
    None without eval data."""
    from jaxpt.data import eval_batches

    _, source = data_sources(ctx, kind)
    if source is None or ctx.config.train.eval_batches < 1:
        return None
    from jaxpt.step import local_rows

    pipeline = make_pipeline(ctx, source, train=False)
    ctx.summary["eval_data"] = pipeline.stats.as_dict()
    return [local_rows(b, ctx.mesh) for b in eval_batches(pipeline, ctx.config.train.eval_batches)]


def batch_loss_evaluator(ctx: RunContext, loss_fn, batches: list[dict] | None):
    """An evaluator of ``loss_fn``'s sums over fixed eval batches, or None without any."""
    from jaxpt.step import loss_evaluator

    if batches is None:
        return None
    return loss_evaluator(ctx.mesh, ctx.state_shardings, loss_fn, batches)


# -------------------------------------------------------------------------------- export


def export_with_tokenizer(ctx: RunContext, state, out_dir: str, save_fn) -> None:
    """``save_fn(model, out_dir, dtype=...)`` (an HF checkpoint) plus the tokenizer files.

    Under LoRA ``lora.export`` picks what is written: ``merged`` (adapters folded into the
    weights, an HF checkpoint in ``out_dir``), ``peft`` (a PEFT adapter dir in ``out_dir``)
    or ``both`` (merged in ``out_dir``, the adapter in ``adapter`` beside it).
    """
    from jaxpt.models.lora import has_adapters, merge_adapters
    from jaxpt.models.peft_io import write_adapter

    model = state.model()
    lora = ctx.config.lora
    if has_adapters(model) and lora.export in ("peft", "both"):
        adapter_dir = out_dir if lora.export == "peft" else os.path.join(
            os.path.dirname(out_dir), "adapter"
        )
        write_adapter(model, adapter_dir, base_model=ctx.config.model.path, dropout=lora.dropout)
        if ctx.is_main_process:
            resolve_tokenizer(ctx).save_pretrained(adapter_dir)
        if lora.export == "peft":
            return
    if has_adapters(model):
        model = merge_adapters(model)
    save_fn(model, out_dir, dtype=ctx.config.export.dtype)
    if ctx.is_main_process:
        resolve_tokenizer(ctx).save_pretrained(out_dir)


def _check_peft_exportable(model, paths, export: str) -> None:
    """Fail before training, not at export, when ``lora.export`` asks for a PEFT adapter
    that ``peft_io.write_adapter`` cannot write (LoRA on MoE experts)."""
    from jaxpt.models.lora import projections
    from jaxpt.models.moe import ExpertLinear

    if export not in ("peft", "both"):
        return
    linears = projections(model)
    experts = [p for p in paths if isinstance(linears[p], ExpertLinear)]
    if experts:
        raise ConfigError(
            f"config key 'lora.export': {export!r} writes a PEFT adapter, which jaxpt cannot "
            f"write for LoRA on MoE experts ({experts[0]}, ...); use lora.export=merged or "
            "lora.targets without the experts' gate_proj/up_proj/down_proj"
        )


def export_causal_lm(ctx: RunContext, state, out_dir: str) -> None:
    """An HF causal-LM checkpoint (safetensors + config) plus the tokenizer files."""
    from jaxpt.models import save_pretrained

    export_with_tokenizer(ctx, state, out_dir, save_pretrained)
