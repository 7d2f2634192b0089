"""On-policy rollouts for the RL tasks (GRPO, PPO): prompts -> samples -> rewards -> batch.

``RolloutSource`` is the BatchSource of every RL task. Each rollout draws the next prompts
(seeded order, epoch by epoch), samples ``samples_per_prompt`` completions of each with a
``jaxpt.sampling.PromptSampler`` on the training mesh with the current weights (no copy, no
server), scores them with the reward functions, and hands the ``Rollout`` to the task's
``make_batch`` hook, which turns it into train rows (advantages, masks) and metrics. The
batch is reused for ``reuse`` optimizer steps (GRPO's ``num_iterations``); its state goes
into every checkpoint, so a resumed run continues exactly.

With ``rl.max_staleness`` > 0 or a split placement (``rl.rollout_devices``) the rollouts are
produced ahead on a worker thread, on the rollout mesh, with the weights of an earlier
policy version (``jaxpt.tasks.rl.pipeline``), or by other processes when the rollout
devices are theirs (``jaxpt.tasks.rl.remote``).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxpt.tasks import common
from jaxpt.tasks.base import RunContext
from jaxpt.tasks.rl.batch import Rollout, decode_arrays, encode_arrays, minibatch_rows
from jaxpt.tasks.rl.pipeline import Produced, RolloutPipeline, WeightSync
from jaxpt.tasks.rl.placement import rollout_mesh
from jaxpt.tasks.rl.program import BatchFinisher
from jaxpt.tasks.rl.remote import trainer_pipeline
from jaxpt.tasks.rl.replay import routing_shape
from jaxpt.tasks.rl.rewards import score_completions

log = logging.getLogger(__name__)


def prompt_rows(ctx: RunContext, split: str, reference_completions: bool = False) -> list[dict]:
    """The run's RL prompts (rows with ``prompt`` and any reward columns) for ``split``
    (``train`` or ``eval``). With ``reference_completions`` each row's own completion, where
    it has one, becomes its ``completion`` text (what ``dataset_rollout`` trains on): its
    ``completion`` (text, or its last assistant message's), else the last assistant turn of
    its ``messages``."""
    train, evaluation = common.data_sources(ctx, "prompt")
    d = ctx.config.data
    source, data_split = (train, d.train_split) if split == "train" else (evaluation, d.eval_split)
    rows = common.load_rows(ctx, source, "prompt", data_split)
    out = []
    for row in rows:
        kept = {k: v for k, v in row.items() if k not in ("messages", "id")}
        if reference_completions:
            completion = row.get("completion")
            if isinstance(completion, list):
                completion = _last_assistant(completion)
            if completion is None and isinstance(row.get("messages"), list):
                completion = _last_assistant(row["messages"])
            kept.pop("completion", None)
            if completion is not None:
                kept["completion"] = completion
        out.append(kept)
    return out


def _last_assistant(messages: list) -> str | None:
    replies = [m.get("content") for m in messages if isinstance(m, dict)
               and m.get("role") == "assistant" and isinstance(m.get("content"), str)]
    return replies[-1] if replies else None


# A rollout's hook: (rollout) -> (train batch, metrics, per-row advantage for the log).
MakeBatch = Callable[[Rollout], tuple[dict, dict, np.ndarray]]
# The policy inside a train state, as the sampler takes it: (graphdef, params, rest).
PolicyView = Callable[[Any], tuple[Any, Any, Any]]
# Dynamic sampling's test: (rollout) -> [num_prompts] bool, the prompts whose group trains.
GroupFilter = Callable[[Rollout], np.ndarray]


def whole_model(state) -> tuple[Any, Any, Any]:
    """The train state's model is the policy (GRPO)."""
    return state.graphdef, state.params, state.rest


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

    With ``on_policy_frac`` < 1 (GKD's lambda) each rollout is sampled with that
    probability (a coin seeded by the run's seed and the rollout count, so a resumed run
    draws the same) and is otherwise the rows' own ``completion`` text, laid out as a
    sampled one would be (``dataset_rollout``).
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
        sampler: str = "auto",
        serve_port: int | None = None,
        reuse: int = 1,
        log_completions: int = 2,
        group_filter: GroupFilter | None = None,
        max_rounds: int = 1,
        minibatches: int = 1,
        finish: BatchFinisher | None = None,
        policy_view: PolicyView = whole_model,
        max_reward_error_frac: float | None = 0.5,
        on_policy_frac: float = 1.0,
        episodes: bool = False,
    ):
        from jaxpt.rewards import RewardRunner, build_reward_fns
        from jaxpt.sampling import PromptSampler

        if not rows:
            raise ValueError("RL needs at least one training prompt")
        self.ctx, self.rows, self.make_batch = ctx, rows, make_batch
        self.samples_per_prompt, self.reuse = samples_per_prompt, reuse
        self.group_filter, self.max_rounds = group_filter, max_rounds
        self.minibatches, self.finish, self.policy_view = minibatches, finish, policy_view
        self.log_completions, self.on_policy_frac = log_completions, on_policy_frac
        self.tokenizer = common.resolve_tokenizer(ctx)
        rl = ctx.config.rl
        self.rollout_mesh = rollout_mesh(ctx.config)  # None: the train mesh samples
        pipelined = rl.max_staleness > 0 or self.rollout_mesh is not None
        if pipelined:  # the worker thread encodes and decodes while the trainer evaluates
            self.tokenizer = copy.deepcopy(self.tokenizer)
        self.runner = RewardRunner(
            build_reward_fns(list(rewards)), max_error_frac=max_reward_error_frac
        )
        rollout_rows = ctx.config.train.batch_size * minibatches
        if rollout_rows % (samples_per_prompt * minibatches):
            raise ValueError(
                f"a rollout of {rollout_rows} completions does not split into {minibatches} "
                f"minibatches of whole groups of {samples_per_prompt}"
            )
        self.prompts_per_step = rollout_rows // samples_per_prompt
        self.routing_shape = routing_shape(ctx.config)  # (layers, k) with rl.routing_replay
        # Train rows have one layout: prompts always padded to max_prompt_length.
        self.sampler = PromptSampler(
            self.tokenizer, model_path=ctx.config.model.path,
            max_new_tokens=max_completion_length, temperature=temperature, top_p=top_p,
            top_k=top_k, num_samples=samples_per_prompt, max_prompt_length=max_prompt_length,
            pad_to_max_prompt_length=True, batch_size=self.prompts_per_step,
            mesh=self.rollout_mesh or ctx.mesh,
            sampler=sampler, record_routing=self.routing_shape is not None,
        )
        # Multi-turn episodes (the run's ``envs`` section) instead of single completions.
        self.episodes = None
        if episodes:
            from jaxpt.tasks.rl.episodes import episode_runner

            self.episodes = episode_runner(ctx, self.tokenizer, self.sampler.sampling,
                                           max_prompt_length, max_completion_length)
        self.pipeline = None
        if pipelined:  # rollouts from other processes (remote), else from a worker thread
            self.pipeline = trainer_pipeline(self) or RolloutPipeline(
                self._produce, rl.max_staleness, WeightSync(self.rollout_mesh))
        self._base_key = None  # the run's key data (state.rng), which never changes
        self.serve_port, self.server = serve_port, None
        self.epoch, self.cursor = 0, 0
        self.rollouts = 0  # rollouts sampled so far: seeds the minibatch shuffles
        self.pending: dict | None = None  # the rollout batch being reused
        self.iteration = 0
        self._last_return = None
        self._encoded: dict[int, list[int]] = {}
        self.completions_path = os.path.join(ctx.output_dir, "completions.jsonl")

    # -- checkpointing
    def get_state(self) -> dict:
        # The rollouts sampled ahead first: the prompt position is theirs once they finish.
        queue = None if self.pipeline is None else self.pipeline.finished()
        state = {"epoch": self.epoch, "cursor": self.cursor, "iteration": self.iteration,
                 "rollouts": self.rollouts}
        if self.pending is not None and self.iteration < self.reuse:
            state["pending"] = encode_arrays(self.pending)
        if self.finish is not None:
            state["finish"] = self.finish.get_state()
        if queue is not None:
            state.update(queue=[p.to_state() for p in queue], submitted=self.pipeline.submitted)
        return state

    def set_state(self, state: dict) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.iteration = int(state.get("iteration", 0))
        self.rollouts = int(state.get("rollouts", 0))
        self.pending = decode_arrays(state["pending"]) if "pending" in state else None
        if self.finish is not None and "finish" in state:
            self.finish.set_state(state["finish"])
        if self.pipeline is not None:
            self.pipeline.restore([Produced.from_state(p) for p in state.get("queue", [])],
                                  submitted=int(state.get("submitted", self.rollouts)))

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
        if self.episodes is not None:
            self.episodes.close()
        if self.server is not None:
            self.server.close()
            self.server = None

    def _serve(self, graphdef, params, rest) -> None:
        """Serve the policy being trained over HTTP (``serve_port``), its weights replaced
        before each rollout: environments, judges and tools reach it at the URL in
        ``JAXPT_POLICY_URL``."""
        if self.serve_port is None:
            return
        if self.server is not None:
            self.server.set_weights((params, rest))
            return
        from jaxpt.serving import Backend
        from jaxpt.serving.live import serve_in_thread

        sampling = self.sampler.sampling
        backend = Backend((graphdef, (params, rest)), self.tokenizer, sampling.eos_token_ids,
                          model_name="policy", slots=32,
                          kv_tokens=32 * (self.sampler.max_prompt_length + sampling.max_new_tokens))
        self.server = serve_in_thread(backend, port=self.serve_port)
        os.environ["JAXPT_POLICY_URL"] = self.server.url
        log.info("serving the policy at %s (JAXPT_POLICY_URL)", self.server.url)

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
        if self.pipeline is not None:
            if self._base_key is None:
                self._base_key = jax.device_get(state.rng)
            produced, pipeline_metrics = self.pipeline.take(self.rollouts, self.policy_view(state))
            batch, advantages_b, log_rows = produced.batch, produced.advantages, produced.log_rows
            rollout_metrics, metrics = {**produced.metrics, **pipeline_metrics}, {}
        else:
            produced = self._rollout(self.rollouts, self.rollouts, self.policy_view(state),
                                     self._step_key(state))
            batch, advantages_b, log_rows = produced.batch, produced.advantages, produced.log_rows
            rollout_metrics, metrics = produced.metrics, {}
        if self.finish is not None:
            start = time.perf_counter()
            batch, finish_metrics, advantages_b = self.finish(state, batch)
            metrics = {**metrics, **finish_metrics, "time/finish_s": time.perf_counter() - start}
        self.rollouts += 1
        self.pending, self.iteration = batch, 1
        self._log_samples(int(jax.device_get(state.step)) + 1, log_rows, advantages_b)
        self._last_return = time.perf_counter()
        return (self._local_rows(self._minibatch(batch, 0)),
                {**rollout_metrics, **metrics, **timings})

    def _produce(self, index: int, version: int, policy: tuple) -> Produced:
        """Rollout ``index`` with the rollout side's ``policy`` (graphdef, params, rest) of
        ``version``, on the worker thread, drawing with the key the synchronous run gives the
        step that trains it."""
        key = jax.random.fold_in(jax.random.wrap_key_data(self._base_key), index * self.reuse)
        return self._rollout(index, version, policy, key)

    def _rollout(self, index: int, version: int, policy: tuple, key) -> Produced:
        """Rollout ``index`` sampled by ``policy`` (graphdef, params, rest) of ``version``
        with ``key``: prompts, samples (more rounds with dynamic sampling) or the rows' own
        completions, rewards and train rows, on the mesh that samples."""
        from jaxpt.sharding import use_rules

        mesh = self.rollout_mesh or self.ctx.mesh
        with jax.set_mesh(mesh), use_rules(self.ctx.rules):
            indices = self._next_prompt_indices()
            if self._samples_this_rollout(index):
                rollout, metrics = self._sample(policy, indices, key)
            else:
                rollout, metrics = self.dataset_rollout(indices)
            if self.group_filter is not None:
                rollout, fill_metrics = self._fill_with_passing_groups(
                    rollout, metrics, lambda r: self._sample(
                        policy, self._next_prompt_indices(), jax.random.fold_in(key, r)),
                )
                metrics.update(fill_metrics)
            batch, batch_metrics, advantages_b = self.make_batch(rollout)
        return Produced(index, version, batch, {**metrics, **batch_metrics},
                        self._log_rows(rollout), advantages_b)

    def _samples_this_rollout(self, index: int) -> bool:
        if self.on_policy_frac >= 1:
            return True
        coin = np.random.default_rng((self.ctx.config.seed, index, 0x6B64)).random()
        return bool(coin < self.on_policy_frac)

    def dataset_rollout(self, indices: list[int]) -> tuple[Rollout, dict]:
        """The rows ``indices`` with their own ``completion`` text instead of samples: its
        tokens (as the chat template renders an assistant turn, or the text and eos),
        cut at the completion budget, in a rollout's layout (log-probs 0: nothing sampled
        them), scored by the reward functions for the metrics."""
        from jaxpt.data.chat import encode_text, eos_id, tokenize_unpaired

        g, lc = self.samples_per_prompt, self.sampler.sampling.max_new_tokens
        lp = self.sampler.max_prompt_length
        n = len(indices) * g
        prompt_ids, prompt_mask = np.zeros((n, lp), np.int32), np.zeros((n, lp), np.int32)
        tokens, lengths = np.zeros((n, lc), np.int32), np.zeros(n, np.int32)
        truncated = np.zeros(n, bool)
        for k, i in enumerate(indices):
            row, prompt = self.rows[i], self._prompt_ids(i)
            if row.get("completion") is None:
                raise ValueError(f"prompt row {i} has no 'completion' text to train on")
            if self.sampler.chat and getattr(self.tokenizer, "chat_template", None):
                messages = row["prompt"]
                if isinstance(messages, str):
                    messages = [{"role": "user", "content": messages}]
                reply = [{"role": "assistant", "content": row["completion"]}]
                ids = tokenize_unpaired({"prompt": messages, "completion": reply, "label": True},
                                        self.tokenizer)["completion_ids"]
            else:
                ids = encode_text(self.tokenizer, row["completion"]) + [eos_id(self.tokenizer)]
            for r in range(k * g, (k + 1) * g):
                prompt_ids[r, lp - len(prompt):], prompt_mask[r, lp - len(prompt):] = prompt, 1
                tokens[r, : min(len(ids), lc)] = ids[:lc]
                lengths[r], truncated[r] = min(len(ids), lc), len(ids) > lc
        texts = [self.tokenizer.decode(tokens[r, : lengths[r]]) for r in range(n)]
        rows = [self.rows[i] for i in indices]
        start = time.perf_counter()
        rewards = score_completions(self.runner, rows, texts, g)
        routing = None
        if self.routing_shape is not None:  # nothing sampled them: the trainer routes itself
            routing = np.full((n, lp + lc, *self.routing_shape), -1, np.int32)
        rollout = Rollout(
            prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=tokens, lengths=lengths,
            logprobs=np.zeros((n, lc), np.float32), truncated=truncated, texts=texts,
            rows=[row for row in rows for _ in range(g)], rewards=rewards,
            num_prompts=len(indices), routing=routing,
        )
        return rollout, {**self._metrics(rollout), "on_policy": 0.0, "time/generate_s": 0.0,
                         "time/reward_s": time.perf_counter() - start}

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
        self, first: Rollout, first_metrics: dict,
        sample_round: Callable[[int], tuple[Rollout, dict]],
    ) -> tuple[Rollout, dict]:
        """A rollout of ``prompts_per_step`` groups, those passing the filter first (see the
        class docstring), and metrics over every round sampled for it: the reward is the
        policy's over all samples, not over the filtered batch."""
        parts, passing = [first], [self.group_filter(first)]
        timings = {k: first_metrics[k] for k in ("time/generate_s", "time/reward_s")}
        while sum(map(np.sum, passing)) < self.prompts_per_step and len(parts) < self.max_rounds:
            more, more_metrics = sample_round(len(parts))
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
        if index not in self._encoded:  # encoded (and counted if truncated) once
            self._encoded[index] = self.sampler.encode(self.rows[index]["prompt"])
        return self._encoded[index]

    def _local_rows(self, batch: dict) -> dict:
        from jaxpt.step import local_rows

        return local_rows(batch, self.ctx.mesh)

    def sample(self, state, indices: list[int], round_index: int = 0) -> tuple[Rollout, dict]:
        """Sample and score completions of the prompts ``indices`` with ``state``'s params
        (``round_index`` > 0: another rollout for the same step, with its own key)."""
        key = self._step_key(state)
        if round_index:
            key = jax.random.fold_in(key, round_index)
        return self._sample(self.policy_view(state), indices, key)

    @staticmethod
    def _step_key(state):
        """The sampling key of the step ``state`` is at (synchronous rollouts)."""
        return jax.random.fold_in(
            jax.random.wrap_key_data(jax.device_get(state.rng)), int(jax.device_get(state.step))
        )

    def _sample(self, policy: tuple, indices: list[int], key) -> tuple[Rollout, dict]:
        """Sample and score completions of the prompts ``indices`` with ``policy`` (graphdef,
        params, rest) and ``key``."""
        if self.episodes is not None:
            return self._sample_episodes(policy, indices, key)
        g = self.samples_per_prompt
        prompts = [self._prompt_ids(i) for i in indices]
        start = time.perf_counter()
        graphdef, params, rest = policy
        self._serve(graphdef, params, rest)
        samples = self.sampler.sample((graphdef, (params, rest)), prompts, key)
        generate_s = time.perf_counter() - start

        start = time.perf_counter()
        rows = [self.rows[i] for i in indices]
        rewards = score_completions(self.runner, rows, samples.texts, g)
        reward_s = time.perf_counter() - start

        out = samples.arrays
        rollout = Rollout(
            prompt_ids=np.repeat(samples.prompt_ids, g, axis=0),
            prompt_mask=np.repeat(samples.prompt_mask, g, axis=0),
            tokens=out.tokens_bn, lengths=out.lengths_b, logprobs=out.policy_logprobs_bn,
            truncated=out.truncated_b.astype(bool), texts=samples.texts,
            rows=[row for row in rows for _ in range(g)], rewards=rewards,
            num_prompts=len(indices), routing=out.routing_btlk,
        )
        metrics = {**self._metrics(rollout), "time/generate_s": generate_s,
                   "time/reward_s": reward_s}
        if self.on_policy_frac < 1:
            metrics["on_policy"] = 1.0
        return rollout, metrics

    def _sample_episodes(self, policy: tuple, indices: list[int], key) -> tuple[Rollout, dict]:
        """One episode per row and sample (``jaxpt.tasks.rl.episodes``), scored by the
        environment's rewards plus the reward functions on each episode's final answer."""
        from jaxpt.tasks.rl.episodes import episode_metrics, episode_seeds, episodes_rollout

        g, rows = self.samples_per_prompt, [self.rows[i] for i in indices]
        graphdef, params, rest = policy
        start = time.perf_counter()
        episodes = self.episodes.run((graphdef, (params, rest)),
                                     [row for row in rows for _ in range(g)],
                                     episode_seeds(key, len(rows) * g), key)
        generate_s = time.perf_counter() - start
        start = time.perf_counter()
        rewards = score_completions(self.runner, rows, [e.final_text for e in episodes], g)
        rollout = episodes_rollout(episodes, rows, g, rewards, self.sampler.max_prompt_length,
                                   self.sampler.sampling.max_new_tokens, self.sampler.pad_id)
        metrics = {**self._metrics(rollout), **episode_metrics(episodes),
                   "time/generate_s": generate_s, "time/reward_s": time.perf_counter() - start,
                   "prompts_truncated": float(self.episodes.truncated_prompts)}
        return rollout, metrics

    def _metrics(self, rollout: Rollout) -> dict:
        rewards = rollout.rewards
        metrics = {
            "reward": float(rewards.total.mean()),
            "reward_std": float(rewards.total.std()),
            **rewards.metrics(),
            "completion_length/mean": float(rollout.lengths.mean()),
            "completion_length/max": float(rollout.lengths.max()),
            "completion_length/truncated_frac": float(rollout.truncated.mean()),
            "prompts_truncated": float(self.sampler.truncated_prompts),
        }
        for name in ("math", "accuracy"):
            if name in rewards.scores:
                metrics["accuracy"] = float(np.nan_to_num(rewards.scores[name]).mean())
                break
        return metrics

    def _log_rows(self, rollout: Rollout) -> list[dict]:
        """The rows of ``rollout`` that completions.jsonl shows (``log_completions``)."""
        return [
            {"prompt": rollout.rows[r]["prompt"], "completion": rollout.texts[r],
             "rewards": {k: _finite(v[r]) for k, v in rollout.rewards.scores.items()},
             **({} if rollout.transcripts is None else {"episode": rollout.transcripts[r]})}
            for r in range(min(self.log_completions, len(rollout.rows)))
        ]

    def _log_samples(self, step: int, log_rows: list[dict], advantages_b: np.ndarray) -> None:
        if not log_rows or not self.ctx.is_main_process:
            return
        samples = [{"step": step, **row, "advantage": float(advantages_b[r])}
                   for r, row in enumerate(log_rows)]
        os.makedirs(os.path.dirname(self.completions_path), exist_ok=True)
        with open(self.completions_path, "a") as f:
            f.writelines(json.dumps(sample) + "\n" for sample in samples)


def _finite(value) -> float | None:
    return None if np.isnan(value) else float(value)
