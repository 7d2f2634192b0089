"""GRPO with verifiable rewards (and its variants: Dr. GRPO, DAPO, GSPO).

Each step samples ``num_generations`` completions per prompt with ``jaxpt.sampling`` on the
training mesh with the current weights (no copy, no server), scores them with the
configured reward functions, turns rewards into group-relative advantages, and updates the
policy with the clipped-ratio objective against the sampler's log-probs for
``num_iterations`` optimizer steps per rollout.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import json
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxpt.losses import (
    LOSS_TYPES,
    aggregate_token_loss,
    entropy_from_logits,
    group_advantages,
    policy_gradient_loss,
    token_logprobs,
)
from jaxpt.tasks import sft
from jaxpt.tasks.base import LossOutput, RunContext, StepContext, Task

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward function: a built-in name (math, accuracy, format, code) or an import path
    ``package.module:function`` in ``fn``; its weight in the total; keyword arguments."""

    name: str | None = None
    fn: str | None = None
    weight: float = 1.0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class GrpoConfig:
    num_generations: int = 4  # completions per prompt; train.batch_size counts completions
    num_iterations: int = 1  # optimizer steps per rollout batch (mu)
    max_prompt_length: int = 128  # longer prompts keep their end
    max_completion_length: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    beta: float = 0.0  # k3 KL to the frozen reference; 0 keeps no reference in memory
    epsilon_low: float = 0.2
    epsilon_high: float | None = None  # None: epsilon_low; DAPO's clip-higher uses 0.28
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo
    importance_level: str = "token"  # token | sequence (GSPO)
    scale_rewards: bool = True  # divide advantages by the group std (off for Dr. GRPO)
    mask_truncated_completions: bool = False
    dynamic_sampling: bool = False  # drop groups whose rewards are all equal
    rewards: list[RewardSpec] = dataclasses.field(
        default_factory=lambda: [RewardSpec(name="math")]
    )
    log_completions: int = 2  # completions per step appended to completions.jsonl
    eval_prompts: int = 128  # held-out prompts for greedy accuracy (0: no eval)


# ------------------------------------------------------------------------------ the loss


def grpo_loss(model, batch: dict, ctx: StepContext, *, cfg: GrpoConfig) -> LossOutput:
    """Clipped policy-gradient loss (+ beta * k3 KL) aggregated per ``cfg.loss_type``.

    The policy is ``softmax(logits / temperature)``, the distribution the sampler drew from
    (``old_logprobs`` are its log-probs), so the first iteration's ratio is exactly 1.
    """
    kwargs = {"positions": batch["positions"], "segment_ids": batch["segment_ids"]}
    logits_btv = model(batch["input_ids"], **kwargs) / cfg.temperature
    logp_bt = token_logprobs(logits_btv, batch["target_ids"])
    mask_bt = batch["completion_mask"]
    ref_logp_bt = None
    if cfg.beta:
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        reference = nnx.merge(graphdef, ctx.extras["ref_params"], rest)
        ref_logits_btv = reference(batch["input_ids"], **kwargs) / cfg.temperature
        ref_logp_bt = jax.lax.stop_gradient(token_logprobs(ref_logits_btv, batch["target_ids"]))
    loss_bt, token_metrics = policy_gradient_loss(
        logp_bt, batch["old_logprobs"], batch["advantages"], mask_bt,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon_low,
        importance_level=cfg.importance_level, ref_logp_bt=ref_logp_bt, beta=cfg.beta,
    )
    aggregate = functools.partial(
        aggregate_token_loss, mask_bt=mask_bt, loss_type=cfg.loss_type,
        max_completion_length=cfg.max_completion_length,
    )
    numerator, denominator = aggregate(loss_bt)
    token_metrics["entropy"] = jax.lax.stop_gradient(entropy_from_logits(logits_btv))
    # Metrics aggregate like the loss, so "sum / denominator" is their mean in its unit.
    metrics = {name: aggregate(value)[0] for name, value in token_metrics.items()}
    return LossOutput(
        numerator=numerator,
        denominator=jax.lax.stop_gradient(denominator),
        metrics=metrics,
        totals={"completion_tokens": jnp.sum(mask_bt)},
    )


def make_loss(ctx: RunContext):
    cfg = ctx.task_config
    if cfg.loss_type not in LOSS_TYPES:
        raise ValueError(f"grpo.loss_type must be one of {LOSS_TYPES}, got {cfg.loss_type!r}")
    return functools.partial(grpo_loss, cfg=cfg)


# --------------------------------------------------------------------------- building


def build(ctx: RunContext):
    """The policy; with ``beta > 0`` also a frozen copy of its params as the reference."""
    cfg = ctx.task_config
    if ctx.config.train.batch_size % cfg.num_generations:
        raise ValueError(
            f"train.batch_size ({ctx.config.train.batch_size}) counts completions and must be "
            f"divisible by grpo.num_generations ({cfg.num_generations})"
        )
    if cfg.temperature <= 0:
        raise ValueError("grpo.temperature must be > 0 (rollouts sample)")
    model, _ = sft.build(ctx)
    if not cfg.beta:
        return model, None
    params = nnx.state(model, nnx.Param)
    # A real copy: the train state's buffers are donated every step.
    ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p))(params)
    return model, {"ref_params": ref_params}


def _prompt_rows(ctx: RunContext, split: str) -> list[dict]:
    from jaxpt.data import load_examples

    d = ctx.config.data
    source = d.train if split == "train" else d.eval
    if source == sft.ARITHMETIC:
        rows = sft._arithmetic_rows(ctx, "train" if split == "train" else "test")
    elif source is None:
        return []
    else:
        loaded = load_examples(source, "prompt", d.train_split if split == "train" else
                               d.eval_split, d.skip_invalid)
        ctx.summary.setdefault("data_skip_reasons", []).extend(loaded.skip_reasons)
        ctx.summary.setdefault("data", {})[f"{split}_skipped_invalid"] = loaded.num_skipped
        rows = loaded.rows
    return [{k: v for k, v in r.items() if k not in ("messages", "id")} for r in rows]


def _encode_npz(arrays: dict) -> str:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return base64.b64encode(buffer.getvalue()).decode()


def _decode_npz(text: str) -> dict:
    with np.load(io.BytesIO(base64.b64decode(text))) as data:
        return {k: data[k] for k in data.files}


class RolloutSource:
    """A BatchSource that samples, scores and packs on-policy rollouts.

    Every process draws the same global prompt batch (seeded order, epoch by epoch), the
    sampler runs on the global mesh, and each process returns its own rows of the result.
    Its state (epoch, cursor, and a rollout still being reused for ``num_iterations``)
    goes into every checkpoint, so a resumed run continues exactly.
    """

    def __init__(self, ctx: RunContext, rows: list[dict]):
        from jaxpt.rewards import RewardRunner, build_reward_fns
        from jaxpt.sampling import SamplingConfig

        if not rows:
            raise ValueError("grpo needs at least one training prompt")
        self.ctx, self.cfg, self.rows = ctx, ctx.task_config, rows
        self.tokenizer = sft.resolve_tokenizer(ctx)
        specs = [
            {k: v for k, v in dataclasses.asdict(s).items() if v not in (None, {})}
            for s in self.cfg.rewards
        ]
        self.runner = RewardRunner(build_reward_fns(specs))
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.sampling = SamplingConfig.make(
            max_new_tokens=self.cfg.max_completion_length, temperature=self.cfg.temperature,
            top_p=self.cfg.top_p, top_k=self.cfg.top_k, eos_token_id=self.tokenizer.eos_token_id,
            num_samples=self.cfg.num_generations, pad_token_id=self.pad_id,
        )
        self.prompts_per_step = ctx.config.train.batch_size // self.cfg.num_generations
        self.epoch, self.cursor = 0, 0
        self.pending: dict | None = None  # the rollout batch being reused
        self.iteration = 0
        self.truncated_prompts = 0
        self._last_return = None
        self._encoded: dict[int, list[int]] = {}
        self.completions_path = os.path.join(ctx.output_dir, "completions.jsonl")

    # -- checkpointing
    def get_state(self) -> dict:
        state = {"epoch": self.epoch, "cursor": self.cursor, "iteration": self.iteration}
        if self.pending is not None and self.iteration < self.cfg.num_iterations:
            state["pending"] = _encode_npz(self.pending)
        return state

    def set_state(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.iteration = int(state.get("iteration", 0))
        self.pending = _decode_npz(state["pending"]) if "pending" in state else None

    def close(self) -> None:
        pass

    # -- batches
    def _next_prompt_indices(self) -> list[int]:
        picked = []
        while len(picked) < self.prompts_per_step:
            order = np.random.default_rng((self.ctx.config.seed, self.epoch)).permutation(
                len(self.rows)
            )
            take = min(self.prompts_per_step - len(picked), len(order) - self.cursor)
            picked.extend(int(i) for i in order[self.cursor : self.cursor + take])
            self.cursor += take
            if self.cursor == len(order):
                self.epoch, self.cursor = self.epoch + 1, 0
        return picked

    def _prompt_ids(self, index: int) -> list[int]:
        if index not in self._encoded:
            from jaxpt.evaluation import prompt_token_ids

            ids = prompt_token_ids(self.tokenizer, self.rows[index]["prompt"])
            if len(ids) > self.cfg.max_prompt_length:
                ids = ids[-self.cfg.max_prompt_length :]
                self.truncated_prompts += 1
            self._encoded[index] = ids
        return self._encoded[index]

    def next(self, state):
        if self.pending is not None and self.iteration < self.cfg.num_iterations:
            self.iteration += 1
            return self._local_rows(self.pending), {}
        timings = {}
        if self._last_return is not None:  # the previous update ran while we were away
            jax.block_until_ready(state.params)
            timings["time/update_s"] = time.perf_counter() - self._last_return
        indices = self._next_prompt_indices()
        batch, host_metrics, samples = self._rollout(state, indices)
        self.pending, self.iteration = batch, 1
        self._log_completions(int(jax.device_get(state.step)) + 1, samples)
        self._last_return = time.perf_counter()
        return self._local_rows(batch), {**host_metrics, **timings}

    def _local_rows(self, batch: dict) -> dict:
        processes = jax.process_count()
        if processes == 1:
            return batch
        rows = len(next(iter(batch.values()))) // processes
        start = jax.process_index() * rows
        return {k: v[start : start + rows] for k, v in batch.items()}

    def _rollout(self, state, indices: list[int]):
        from jaxpt.sampling import sample_arrays

        cfg, g = self.cfg, self.cfg.num_generations
        lp = cfg.max_prompt_length
        prompts = [self._prompt_ids(i) for i in indices]
        prompt_ids = np.full((len(prompts), lp), self.pad_id, np.int32)
        prompt_mask = np.zeros((len(prompts), lp), np.int32)
        for r, ids in enumerate(prompts):
            prompt_ids[r, lp - len(ids) :] = ids
            prompt_mask[r, lp - len(ids) :] = 1

        start = time.perf_counter()
        key = jax.random.fold_in(jax.random.wrap_key_data(jax.device_get(state.rng)),
                                 int(jax.device_get(state.step)))
        out = sample_arrays(state.graphdef, (state.params, state.rest), jnp.asarray(prompt_ids),
                            jnp.asarray(prompt_mask), key, self.sampling)
        out = jax.tree.map(_to_host, out)
        generate_s = time.perf_counter() - start

        start = time.perf_counter()
        tokens_bn, lengths_b = out.tokens_bn, out.lengths_b
        texts = [
            self.tokenizer.decode(tokens_bn[r, : lengths_b[r]].tolist(), skip_special_tokens=True)
            for r in range(len(tokens_bn))
        ]
        rows = [self.rows[i] for i in indices for _ in range(g)]
        columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
        rewards = self.runner([row["prompt"] for row in rows], texts, **columns)
        reward_s = time.perf_counter() - start

        rewards_pg = rewards.total.reshape(len(indices), g)
        advantages_pg, spread_p = group_advantages(
            jnp.asarray(rewards_pg), scale_by_std=cfg.scale_rewards
        )
        advantages_b = np.asarray(advantages_pg).reshape(-1)
        keep_b = np.ones(len(rows), bool)
        if cfg.dynamic_sampling:
            keep_b &= np.repeat(np.asarray(spread_p), g)
        if cfg.mask_truncated_completions:
            keep_b &= ~out.truncated_b.astype(bool)

        batch = _train_batch(
            np.repeat(prompt_ids, g, axis=0), np.repeat(prompt_mask, g, axis=0), tokens_bn,
            lengths_b, out.logprobs_bn, advantages_b, keep_b,
        )
        metrics = {
            "reward": float(rewards.total.mean()),
            "reward_std": float(rewards.total.std()),
            **rewards.metrics(),
            "completion_length/mean": float(lengths_b.mean()),
            "completion_length/max": float(lengths_b.max()),
            "completion_length/truncated_frac": float(out.truncated_b.mean()),
            "groups_with_spread_frac": float(np.mean(spread_p)),
            "prompts_truncated": float(self.truncated_prompts),
            "time/generate_s": generate_s,
            "time/reward_s": reward_s,
        }
        for name in ("math", "accuracy"):
            if name in rewards.scores:
                metrics["accuracy"] = float(np.nan_to_num(rewards.scores[name]).mean())
                break
        samples = [
            {"prompt": rows[r]["prompt"], "completion": texts[r],
             "rewards": {k: _finite(v[r]) for k, v in rewards.scores.items()},
             "advantage": float(advantages_b[r])}
            for r in range(min(cfg.log_completions, len(rows)))
        ]
        return batch, metrics, samples

    def _log_completions(self, step: int, samples: list[dict]) -> None:
        if not samples or not self.ctx.is_main_process:
            return
        os.makedirs(os.path.dirname(self.completions_path), exist_ok=True)
        with open(self.completions_path, "a") as f:
            f.writelines(json.dumps({"step": step, **sample}) + "\n" for sample in samples)


def _to_host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _finite(value) -> float | None:
    return None if np.isnan(value) else float(value)


def _train_batch(prompt_ids, prompt_mask, tokens_bn, lengths_b, logprobs_bn, advantages_b, keep_b):
    """Left-padded prompt + completion rows with next-token targets aligned to the loss.

    Position ``t`` predicts ``input_ids[t + 1]``; ``completion_mask[t]`` is 1 when that
    target is a generated token (of a kept row), and ``old_logprobs[t]`` is its sampler
    log-prob.
    """
    lp = prompt_ids.shape[1]
    lc = tokens_bn.shape[1]
    completion_valid = np.arange(lc)[None, :] < lengths_b[:, None]
    input_ids = np.concatenate([prompt_ids, tokens_bn.astype(np.int32)], axis=1)
    segment_ids = np.concatenate([prompt_mask, completion_valid.astype(np.int32)], axis=1)
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    target_ids = np.zeros_like(input_ids)
    target_ids[:, :-1] = input_ids[:, 1:]
    completion_mask = np.zeros(input_ids.shape, np.float32)
    completion_mask[:, lp - 1 : lp - 1 + lc] = completion_valid * keep_b[:, None]
    old_logprobs = np.zeros(input_ids.shape, np.float32)
    old_logprobs[:, lp - 1 : lp - 1 + lc] = np.where(completion_valid, logprobs_bn, 0.0)
    return {
        "input_ids": input_ids,
        "positions": positions,
        "segment_ids": segment_ids,
        "target_ids": target_ids,
        "completion_mask": completion_mask,
        "old_logprobs": old_logprobs,
        "advantages": advantages_b.astype(np.float32),
    }


def make_train_source(ctx: RunContext) -> RolloutSource:
    return RolloutSource(ctx, _prompt_rows(ctx, "train"))


def make_evaluator(ctx: RunContext):
    """Greedy held-out accuracy (``eval_accuracy``) on prompts with an ``answer`` column."""
    from jaxpt.evaluation import verifiable_accuracy

    cfg = ctx.task_config
    rows = [r for r in _prompt_rows(ctx, "eval") if "answer" in r][: cfg.eval_prompts]
    if not rows:
        return None
    tokenizer = sft.resolve_tokenizer(ctx)

    def evaluate(state) -> dict[str, float]:
        result = verifiable_accuracy(
            state.model(), tokenizer, rows, max_new_tokens=cfg.max_completion_length
        )
        return {"eval_accuracy": result["accuracy"], "eval_n": float(result["n"]),
                "eval_completion_tokens": result["mean_completion_tokens"]}

    return evaluate


TASK = Task(
    name="grpo",
    description="GRPO / Dr. GRPO / DAPO / GSPO with verifiable rewards (on-policy rollouts)",
    config_cls=GrpoConfig,
    build=build,
    make_loss=make_loss,
    make_train_source=make_train_source,
    make_evaluator=make_evaluator,
    export=sft.export,
)
