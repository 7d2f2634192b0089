"""On-policy rollouts for the RL tasks (GRPO, PPO): prompts -> samples -> rewards -> batch.

``RolloutSource`` is the BatchSource of every RL task. Each rollout draws the next prompts
(seeded order, epoch by epoch), samples ``samples_per_prompt`` completions of each with
``jaxpt.sampling`` on the training mesh with the current weights (no copy, no server),
scores them with the reward functions, and hands the ``Rollout`` to the task's
``make_batch`` hook, which turns it into train rows (advantages, masks) and metrics. The
batch is reused for ``reuse`` optimizer steps (GRPO's ``num_iterations``); its state goes
into every checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxpt.tasks import common
from jaxpt.tasks.base import RunContext


@dataclasses.dataclass(frozen=True)
class RewardSpec:
    """One reward function: a built-in name (math, accuracy, format, code) or an import path
    ``package.module:function`` in ``fn``; its weight in the total; keyword arguments."""

    name: str | None = None
    fn: str | None = None
    weight: float = 1.0
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_reward_settings(section: str, cfg) -> None:
    """A ConfigError naming ``<section>.rewards`` or ``<section>.eval_reward`` when a reward
    function cannot be built (an RL task's load-time check)."""
    from jaxpt.config import ConfigError
    from jaxpt.rewards import build_reward_fns, resolve_reward_fn

    for key, build in (("rewards", lambda: build_reward_fns(reward_specs(cfg))),
                       ("eval_reward", lambda: resolve_reward_fn(cfg.eval_reward))):
        try:
            build()
        except (ValueError, TypeError, ImportError, AttributeError) as error:
            raise ConfigError(f"config key '{section}.{key}': {error}") from None


def reward_specs(cfg) -> list[dict]:
    """A task section's ``rewards`` entries as ``jaxpt.rewards.build_reward_fns`` takes them."""
    return [
        {k: v for k, v in dataclasses.asdict(s).items() if v not in (None, {})}
        for s in cfg.rewards
    ]


@dataclasses.dataclass
class Rollout:
    """One rollout on the host, one row per completion (prompt-major, ``samples_per_prompt``
    consecutive rows per prompt)."""

    prompt_ids: np.ndarray  # [B, Lp] left-padded prompt ids
    prompt_mask: np.ndarray  # [B, Lp] 1 on real prompt tokens
    tokens: np.ndarray  # [B, Lc] sampled ids (padding after each completion's length)
    lengths: np.ndarray  # [B] completion lengths (eos included)
    # [B, Lc] the tokens' log-probs under the trained policy, log_softmax(logits / T) with
    # no sampling filters or penalty (SampleArrays.policy_logprobs_bn): a ratio's old side
    logprobs: np.ndarray
    truncated: np.ndarray  # [B] no eos within the budget
    texts: list[str]  # decoded completions
    rows: list[dict]  # the dataset row of each completion
    rewards: Any  # jaxpt.rewards.runner.RewardBatch: total [B], per-function scores
    num_prompts: int

    _ROW_ARRAYS = ("prompt_ids", "prompt_mask", "tokens", "lengths", "logprobs", "truncated")

    def take_groups(self, groups: Sequence[int]) -> Rollout:
        """The rows of prompts ``groups`` (indices into this rollout's prompts), in order."""
        g = len(self.lengths) // self.num_prompts
        rows = np.concatenate([np.arange(p * g, (p + 1) * g) for p in groups])
        return Rollout(
            **{name: getattr(self, name)[rows] for name in self._ROW_ARRAYS},
            texts=[self.texts[r] for r in rows], rows=[self.rows[r] for r in rows],
            rewards=self.rewards.take(rows), num_prompts=len(groups),
        )

    @staticmethod
    def concat(parts: Sequence[Rollout]) -> Rollout:
        """One rollout holding the prompts of ``parts`` in order."""
        return Rollout(
            **{name: np.concatenate([getattr(p, name) for p in parts])
               for name in Rollout._ROW_ARRAYS},
            texts=[t for p in parts for t in p.texts], rows=[r for p in parts for r in p.rows],
            rewards=type(parts[0].rewards).concat([p.rewards for p in parts]),
            num_prompts=sum(p.num_prompts for p in parts),
        )


def train_batch(rollout: Rollout, advantages_b: np.ndarray, keep_b: np.ndarray) -> dict:
    """Prompt + completion rows with next-token targets aligned to the loss.

    Position ``t`` predicts ``input_ids[t + 1]``; ``completion_mask[t]`` is 1 when that
    target is a generated token of a kept row, and ``old_logprobs[t]`` is its log-prob
    under the policy that sampled it (``Rollout.logprobs``).
    """
    prompt_ids, prompt_mask = rollout.prompt_ids, rollout.prompt_mask
    lp, lc = prompt_ids.shape[1], rollout.tokens.shape[1]
    completion_valid = np.arange(lc)[None, :] < rollout.lengths[:, None]
    input_ids = np.concatenate([prompt_ids, rollout.tokens.astype(np.int32)], axis=1)
    segment_ids = np.concatenate([prompt_mask, completion_valid.astype(np.int32)], axis=1)
    positions = np.maximum(np.cumsum(segment_ids, axis=1) - 1, 0).astype(np.int32)
    target_ids = np.zeros_like(input_ids)
    target_ids[:, :-1] = input_ids[:, 1:]
    completion_mask = np.zeros(input_ids.shape, np.float32)
    completion_mask[:, lp - 1 : lp - 1 + lc] = completion_valid * keep_b[:, None]
    old_logprobs = np.zeros(input_ids.shape, np.float32)
    old_logprobs[:, lp - 1 : lp - 1 + lc] = np.where(completion_valid, rollout.logprobs, 0.0)
    return {
        "input_ids": input_ids,
        "positions": positions,
        "segment_ids": segment_ids,
        "target_ids": target_ids,
        "completion_mask": completion_mask,
        "old_logprobs": old_logprobs,
        "advantages": advantages_b.astype(np.float32),
    }


def completion_window(row_length: int, max_completion_length: int) -> slice:
    """The positions of a ``train_batch`` row whose targets are completion tokens: the
    completion buffer is the last ``max_completion_length`` ids, each predicted by the
    position before it."""
    return slice(row_length - max_completion_length - 1, row_length - 1)


def completion_hidden(model, batch: dict, max_completion_length: int, group: int = 1):
    """Final hidden states [B, Lc, D] at the positions that predict completion tokens.

    With ``group`` > 1 the rows come in groups that share one prompt (a rollout's
    ``samples_per_prompt``): each prompt is run once into a KV cache that the group's
    completions then attend to, instead of once per completion. The math is the full
    forward's (the cache gradient sums over the group); with short completions after long
    prompts it is most of the forward and backward saved.
    """
    from jaxpt.models import KVCache

    ids, positions, segments = batch["input_ids"], batch["positions"], batch["segment_ids"]
    lp = ids.shape[1] - max_completion_length
    if group == 1:
        hidden_btd = model(ids, positions, segments, return_hidden=True)
        return hidden_btd[:, completion_window(ids.shape[1], max_completion_length)]
    cache = KVCache.init(model.config, ids.shape[0] // group, ids.shape[1], model.dtype)
    prompt_hidden, cache = model(
        ids[::group, :lp], positions[::group, :lp], segments[::group, :lp], cache=cache,
        return_hidden=True,
    )
    repeat = lambda x: jnp.repeat(x, group, axis=0)
    cache = KVCache(
        k=tuple(map(repeat, cache.k)), v=tuple(map(repeat, cache.v)),
        segment_ids=repeat(cache.segment_ids), positions=repeat(cache.positions),
        index=cache.index,
    )
    completion_hidden_btd, _ = model(
        ids[:, lp:], positions[:, lp:], segments[:, lp:], cache=cache, return_hidden=True
    )
    # The last prompt position predicts the first completion token.
    return jnp.concatenate(
        [repeat(prompt_hidden[:, -1:]), completion_hidden_btd[:, :-1]], axis=1
    )


def shares_prompts(batch: dict, max_completion_length: int, group: int) -> bool:
    """Whether each run of ``group`` rows of a host batch holds one prompt (ids and mask)."""
    if group <= 1 or len(batch["input_ids"]) % group:
        return False
    lp = batch["input_ids"].shape[1] - max_completion_length
    for key in ("input_ids", "segment_ids"):
        prompts = np.asarray(batch[key])[:, :lp].reshape(-1, group, lp)
        if not (prompts == prompts[:, :1]).all():
            return False
    return True


def minibatch_rows(
    num_rows: int, group: int, minibatches: int, iteration: int, *, seed
) -> np.ndarray:
    """Row indices of minibatch ``iteration % minibatches`` of epoch ``iteration //
    minibatches`` over a rollout of ``num_rows`` rows in groups of ``group``: each epoch is
    a fresh seeded shuffle of the groups (a group's rows stay together and in order), cut
    into ``minibatches`` equal parts, so an epoch visits every row exactly once."""
    epoch, part = divmod(iteration, minibatches)
    groups = num_rows // group
    order = np.random.default_rng((*np.atleast_1d(seed).tolist(), epoch)).permutation(groups)
    per_part = groups // minibatches
    picked = order[part * per_part : (part + 1) * per_part]
    return (picked[:, None] * group + np.arange(group)[None, :]).reshape(-1)


def prompt_rows(ctx: RunContext, split: str) -> list[dict]:
    """The run's RL prompts (rows with ``prompt`` and any reward columns) for ``split``
    (``train`` or ``eval``)."""
    train, evaluation = common.data_sources(ctx, "prompt")
    d = ctx.config.data
    source, data_split = (train, d.train_split) if split == "train" else (evaluation, d.eval_split)
    rows = common.load_rows(ctx, source, "prompt", data_split)
    return [{k: v for k, v in r.items() if k not in ("messages", "id")} for r in rows]


# A rollout's hook: (rollout) -> (train batch, metrics, per-row advantage for the log).
MakeBatch = Callable[[Rollout], tuple[dict, dict, np.ndarray]]
# The policy inside a train state, as the sampler takes it: (graphdef, params, rest).
PolicyView = Callable[[Any], tuple[Any, Any, Any]]


def whole_model(state) -> tuple[Any, Any, Any]:
    """The train state's model is the policy (GRPO)."""
    return state.graphdef, state.params, state.rest


class BatchFinisher(Protocol):
    """A hook that completes a rollout's train batch on device with the current state
    (PPO: reference log-probs, values, GAE): ``(state, batch) -> (batch, metrics,
    per-row advantage for the log)``. Its state is saved with every checkpoint."""

    def __call__(self, state, batch: dict) -> tuple[dict, dict, np.ndarray]: ...

    def get_state(self) -> dict: ...

    def set_state(self, state: dict) -> None: ...
class RolloutProgram:
    """``fn(state, device_batch, *args)``, jitted once, run on a rollout's host batch for a
    ``BatchFinisher``: every process holds the whole rollout and puts its own rows on the
    mesh; the outputs are replicated and come back as host arrays (same pytree)."""

    def __init__(self, ctx: RunContext, fn: Callable):
        self.ctx, self.fn = ctx, fn
        self._jitted = None

    def __call__(self, state, batch: dict, *args):
        from jaxpt.sharding import replicated
        from jaxpt.step import local_rows, put_batch

        mesh = self.ctx.mesh
        if self._jitted is None:
            self._jitted = jax.jit(self.fn, out_shardings=replicated(mesh))
        with jax.set_mesh(mesh):
            out = self._jitted(state, put_batch(local_rows(batch, mesh), mesh), *args)
        return jax.tree.map(_to_host, out)


# Dynamic sampling's test: (rollout) -> [num_prompts] bool, the prompts whose group trains.
GroupFilter = Callable[[Rollout], np.ndarray]


class RolloutSource:
    """A BatchSource that samples, scores and packs on-policy rollouts.

    Every process draws the same global prompt batch, the sampler runs on the global mesh,
    and each process returns its own rows of the result.

    With a ``group_filter`` (DAPO's dynamic sampling), a step samples up to ``max_rounds``
    rollouts of fresh prompts until it has a full batch of groups that pass the filter
    (groups whose rewards all agree carry no gradient); a batch still short after the last
    round is completed with the first groups that failed, which ``make_batch`` masks.

    With ``minibatches`` > 1 (PPO), a rollout holds ``minibatches`` train batches: each of
    its ``reuse`` optimizer steps takes the next minibatch of a seeded per-epoch shuffle of
    its prompt groups (a group's rows stay together). ``finish`` completes each rollout's
    batch on device with the state it was sampled with (see ``BatchFinisher``), and
    ``policy_view`` picks the policy out of a train state that holds more (PPO's critic).

    A reward function that fails on more than ``max_reward_error_frac`` of a rollout's
    completions stops the run (``jaxpt.rewards.RewardError``) instead of scoring them 0.
    """

    def __init__(
        self,
        ctx: RunContext,
        rows: list[dict],
        *,
        make_batch: MakeBatch,
        samples_per_prompt: int,
        max_prompt_length: int,
        max_completion_length: int,
        temperature: float,
        top_p: float,
        top_k: int | None,
        rewards: Sequence[Any],
        reuse: int = 1,
        log_completions: int = 2,
        group_filter: GroupFilter | None = None,
        max_rounds: int = 1,
        minibatches: int = 1,
        finish: BatchFinisher | None = None,
        policy_view: PolicyView = whole_model,
        max_reward_error_frac: float | None = 0.5,
    ):
        from jaxpt.data import eos_token_ids
        from jaxpt.rewards import RewardRunner, build_reward_fns
        from jaxpt.sampling import SamplingConfig

        if not rows:
            raise ValueError("RL needs at least one training prompt")
        self.ctx, self.rows, self.make_batch = ctx, rows, make_batch
        self.samples_per_prompt, self.reuse = samples_per_prompt, reuse
        self.group_filter, self.max_rounds = group_filter, max_rounds
        self.minibatches, self.finish, self.policy_view = minibatches, finish, policy_view
        self.max_prompt_length, self.log_completions = max_prompt_length, log_completions
        self.tokenizer = common.resolve_tokenizer(ctx)
        self.runner = RewardRunner(
            build_reward_fns(list(rewards)), max_error_frac=max_reward_error_frac
        )
        pad = self.tokenizer.pad_token_id
        self.pad_id = int(pad) if pad is not None else 0
        self.sampling = SamplingConfig.make(
            max_new_tokens=max_completion_length, temperature=temperature, top_p=top_p,
            top_k=top_k, eos_token_id=eos_token_ids(self.tokenizer, ctx.config.model.path),
            num_samples=samples_per_prompt, pad_token_id=self.pad_id,
        )
        rollout_rows = ctx.config.train.batch_size * minibatches
        if rollout_rows % (samples_per_prompt * minibatches):
            raise ValueError(
                f"a rollout of {rollout_rows} completions does not split into {minibatches} "
                f"minibatches of whole groups of {samples_per_prompt}"
            )
        self.prompts_per_step = rollout_rows // samples_per_prompt
        self.epoch, self.cursor = 0, 0
        self.rollouts = 0  # rollouts sampled so far: seeds the minibatch shuffles
        self.pending: dict | None = None  # the rollout batch being reused
        self.iteration = 0
        self.truncated_prompts = 0
        self._last_return = None
        self._encoded: dict[int, list[int]] = {}
        self.completions_path = os.path.join(ctx.output_dir, "completions.jsonl")

    # -- checkpointing
    def get_state(self) -> dict:
        state = {"epoch": self.epoch, "cursor": self.cursor, "iteration": self.iteration,
                 "rollouts": self.rollouts}
        if self.pending is not None and self.iteration < self.reuse:
            state["pending"] = _encode_npz(self.pending)
        if self.finish is not None:
            state["finish"] = self.finish.get_state()
        return state

    def set_state(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.iteration = int(state.get("iteration", 0))
        self.rollouts = int(state.get("rollouts", 0))
        self.pending = _decode_npz(state["pending"]) if "pending" in state else None
        if self.finish is not None and "finish" in state:
            self.finish.set_state(state["finish"])

    def close(self) -> None:
        pass

    # -- batches
    def next(self, state):
        if self.pending is not None and self.iteration < self.reuse:
            batch = self._minibatch(self.pending, self.iteration)
            self.iteration += 1
            return self._local_rows(batch), {}
        timings = {}
        if self._last_return is not None:  # the previous update ran while we were away
            jax.block_until_ready(state.params)
            timings["time/update_s"] = time.perf_counter() - self._last_return
        rollout, rollout_metrics = self.sample(state, self._next_prompt_indices())
        if self.group_filter is not None:
            rollout, fill_metrics = self._fill_with_passing_groups(state, rollout, rollout_metrics)
            rollout_metrics.update(fill_metrics)
        batch, metrics, advantages_b = self.make_batch(rollout)
        if self.finish is not None:
            start = time.perf_counter()
            batch, finish_metrics, advantages_b = self.finish(state, batch)
            metrics = {**metrics, **finish_metrics, "time/finish_s": time.perf_counter() - start}
        self.rollouts += 1
        self.pending, self.iteration = batch, 1
        self._log_samples(int(jax.device_get(state.step)) + 1, rollout, advantages_b)
        self._last_return = time.perf_counter()
        return (self._local_rows(self._minibatch(batch, 0)),
                {**rollout_metrics, **metrics, **timings})

    def _minibatch(self, batch: dict, iteration: int) -> dict:
        """The rows optimizer step ``iteration`` of the current rollout trains on."""
        if self.minibatches == 1:
            return batch
        rows = minibatch_rows(
            len(next(iter(batch.values()))), self.samples_per_prompt, self.minibatches,
            iteration, seed=(self.ctx.config.seed, self.rollouts),
        )
        return {k: v[rows] for k, v in batch.items()}

    def _fill_with_passing_groups(
        self, state, first: Rollout, first_metrics: dict
    ) -> tuple[Rollout, dict]:
        """A rollout of ``prompts_per_step`` groups, those passing the filter first (see the
        class docstring), and metrics over every round sampled for it: the reward is the
        policy's over all samples, not over the filtered batch."""
        parts, passing = [first], [self.group_filter(first)]
        timings = {k: first_metrics[k] for k in ("time/generate_s", "time/reward_s")}
        while sum(map(np.sum, passing)) < self.prompts_per_step and len(parts) < self.max_rounds:
            more, more_metrics = self.sample(
                state, self._next_prompt_indices(), round_index=len(parts)
            )
            parts.append(more)
            passing.append(self.group_filter(more))
            timings = {k: v + more_metrics[k] for k, v in timings.items()}
        sampled, passing_p = Rollout.concat(parts), np.concatenate(passing)
        order = np.concatenate([np.flatnonzero(passing_p), np.flatnonzero(~passing_p)])
        metrics = {
            **self._metrics(sampled), **timings, "sampling_rounds": float(len(parts)),
            "sampled_groups_passing_frac": float(passing_p.mean()),
        }
        return sampled.take_groups(order[: self.prompts_per_step]), metrics

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
            from jaxpt.data import encode_prompt

            ids = encode_prompt(self.tokenizer, self.rows[index]["prompt"])
            if len(ids) > self.max_prompt_length:  # keep the end: the question is last
                ids = ids[-self.max_prompt_length :]
                self.truncated_prompts += 1
            self._encoded[index] = ids
        return self._encoded[index]

    def _local_rows(self, batch: dict) -> dict:
        from jaxpt.step import local_rows

        return local_rows(batch, self.ctx.mesh)

    def sample(self, state, indices: list[int], round_index: int = 0) -> tuple[Rollout, dict]:
        """Sample and score completions of the prompts ``indices`` with ``state``'s params
        (``round_index`` > 0: another rollout for the same step, with its own key)."""
        from jaxpt.sampling import sample_arrays
        from jaxpt.sampling.api import left_pad

        g = self.samples_per_prompt
        prompts = [self._prompt_ids(i) for i in indices]
        prompt_ids, prompt_mask = left_pad(
            prompts, len(prompts), self.max_prompt_length, self.pad_id
        )
        start = time.perf_counter()
        key = jax.random.fold_in(
            jax.random.wrap_key_data(jax.device_get(state.rng)), int(jax.device_get(state.step))
        )
        if round_index:
            key = jax.random.fold_in(key, round_index)
        graphdef, params, rest = self.policy_view(state)
        out = sample_arrays(
            graphdef, (params, rest), jnp.asarray(prompt_ids),
            jnp.asarray(prompt_mask), key, self.sampling,
        )
        out = jax.tree.map(_to_host, out)
        generate_s = time.perf_counter() - start

        start = time.perf_counter()
        texts = [
            self.tokenizer.decode(out.tokens_bn[r, : out.lengths_b[r]].tolist(),
                                  skip_special_tokens=True)
            for r in range(len(out.tokens_bn))
        ]
        rows = [self.rows[i] for i in indices for _ in range(g)]
        columns = {k: [row.get(k) for row in rows] for k in rows[0] if k != "prompt"}
        rewards = self.runner([row["prompt"] for row in rows], texts, **columns)
        reward_s = time.perf_counter() - start

        rollout = Rollout(
            prompt_ids=np.repeat(prompt_ids, g, axis=0),
            prompt_mask=np.repeat(prompt_mask, g, axis=0),
            tokens=out.tokens_bn, lengths=out.lengths_b, logprobs=out.policy_logprobs_bn,
            truncated=out.truncated_b.astype(bool), texts=texts, rows=rows, rewards=rewards,
            num_prompts=len(indices),
        )
        return rollout, {
            **self._metrics(rollout), "time/generate_s": generate_s, "time/reward_s": reward_s
        }

    def _metrics(self, rollout: Rollout) -> dict:
        rewards = rollout.rewards
        metrics = {
            "reward": float(rewards.total.mean()),
            "reward_std": float(rewards.total.std()),
            **rewards.metrics(),
            "completion_length/mean": float(rollout.lengths.mean()),
            "completion_length/max": float(rollout.lengths.max()),
            "completion_length/truncated_frac": float(rollout.truncated.mean()),
            "prompts_truncated": float(self.truncated_prompts),
        }
        for name in ("math", "accuracy"):
            if name in rewards.scores:
                metrics["accuracy"] = float(np.nan_to_num(rewards.scores[name]).mean())
                break
        return metrics

    def _log_samples(self, step: int, rollout: Rollout, advantages_b: np.ndarray) -> None:
        count = min(self.log_completions, len(rollout.rows))
        if not count or not self.ctx.is_main_process:
            return
        samples = [
            {"step": step, "prompt": rollout.rows[r]["prompt"], "completion": rollout.texts[r],
             "rewards": {k: _finite(v[r]) for k, v in rollout.rewards.scores.items()},
             "advantage": float(advantages_b[r])}
            for r in range(count)
        ]
        os.makedirs(os.path.dirname(self.completions_path), exist_ok=True)
        with open(self.completions_path, "a") as f:
            f.writelines(json.dumps(sample) + "\n" for sample in samples)


def accuracy_evaluator(ctx: RunContext, cfg, policy_of: Callable = lambda state: state.model()):
    """Greedy held-out accuracy (``eval_accuracy``) of the policy on the eval prompts that
    have an ``answer`` column, scored by ``cfg.eval_reward`` (1.0 = correct); None when
    ``cfg.eval_prompts`` is 0 or no eval prompt has an answer. ``policy_of(state)`` is the
    policy module of a train state."""
    from jaxpt.data import eos_token_ids
    from jaxpt.evals import verifiable_accuracy
    from jaxpt.rewards import resolve_reward_fn

    if not cfg.eval_prompts:
        return None
    rows = [r for r in prompt_rows(ctx, "eval") if "answer" in r][: cfg.eval_prompts]
    if not rows:
        return None
    tokenizer = common.resolve_tokenizer(ctx)
    eos = eos_token_ids(tokenizer, ctx.config.model.path)  # where rollouts stop
    scorer = resolve_reward_fn(cfg.eval_reward)

    def evaluate(state) -> dict[str, float]:
        result = verifiable_accuracy(
            policy_of(state), tokenizer, rows,
            max_new_tokens=cfg.eval_max_new_tokens or cfg.max_completion_length, scorer=scorer,
            eos_token_id=eos,
        )
        return {"eval_accuracy": result["accuracy"], "eval_n": float(result["n"]),
                "eval_completion_tokens": result["mean_completion_tokens"]}

    return evaluate


def _encode_npz(arrays: dict) -> str:
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return base64.b64encode(buffer.getvalue()).decode()


def _decode_npz(text: str) -> dict:
    with np.load(io.BytesIO(base64.b64decode(text))) as data:
        return {k: data[k] for k in data.files}


def _to_host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x))


def _finite(value) -> float | None:
    return None if np.isnan(value) else float(value)
