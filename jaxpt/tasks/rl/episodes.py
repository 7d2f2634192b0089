"""Multi-turn episodes on the continuous-batching engine: the policy's turns are sampled,
the environment answers (tool results, user messages), and decoding resumes on the same
pages until the environment says the episode is done or a limit ends it.

Many episodes are in flight at once: when one of them ends a turn its slot is free for the
others while its environment step (a tool call) runs on a bounded thread pool; the
environment's answer is rendered with the model's own chat template and appended, and the
episode's pages are extended by those tokens alone (``Engine.resume``). The policy's tokens
are kept exactly as sampled (never re-tokenized), with their log-probs; the environment's
tokens carry a 0 in ``policy_mask`` so they get no loss (and PPO's GAE passes over them).

Every random draw is keyed by the episode and the turn (``fold_in(fold_in(key, episode),
turn)``) and every environment is seeded by the row and episode, so a rollout's episodes
do not depend on scheduling: a resumed run samples them again identically.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import jax
import numpy as np

from jaxpt.envs.base import AssistantTurn, Environment, EnvStep

log = logging.getLogger(__name__)

_PROBE = "JAXPT-PROBE-7f3a"  # placeholder content for rendering a template's turn layout
# No tokenizer packs more characters than this into a token of ordinary text: answers whose
# text is longer than this many times the room left cannot fit and are not rendered.
_CHARS_PER_TOKEN = 64


@dataclasses.dataclass(frozen=True)
class EpisodeLimits:
    """Where an episode stops when its environment does not: ``max_turns`` assistant turns,
    ``max_turn_tokens`` per turn (None: whatever the episode's budget leaves), and the
    episode's token budget after its prompt (the task's ``max_completion_length``).
    ``max_parallel`` environment steps (tool calls) run at once."""

    max_turns: int = 8
    max_turn_tokens: int | None = None
    max_parallel: int = 8


@dataclasses.dataclass
class Episode:
    """One episode: its prompt, then every token after it (the policy's and the
    environment's, in order) with the policy's log-probs and a mask of which are the
    policy's, the transcript, the rewards and how it ended."""

    row: dict
    seed: int
    env: Environment | None = None
    messages: list[dict] = dataclasses.field(default_factory=list)  # the first messages
    prompt_ids: list[int] = dataclasses.field(default_factory=list)
    tokens: list[int] = dataclasses.field(default_factory=list)
    policy_mask: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    # {"role", "content", ("tool_calls"), "tokens": [start, end) in ``tokens``}
    transcript: list[dict] = dataclasses.field(default_factory=list)
    final_text: str = ""  # the last assistant turn without its tool calls (what rewards read)
    turn_rewards: list[float] = dataclasses.field(default_factory=list)
    turns: int = 0
    tool_calls: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    tool_errors: int = 0
    parse_errors: int = 0
    # "done" (the environment ended it), "max_turns", "tokens" (the token budget), "env_error"
    end: str | None = None
    request_id: int | None = None
    metrics: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    last_turn: AssistantTurn | None = None  # the turn the environment is answering
    pending_ids: list[int] = dataclasses.field(default_factory=list)  # its answer's tokens

    @property
    def reward(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def truncated(self) -> bool:
        """Ended by a limit, not by its environment."""
        return self.end != "done"


class TurnRenderer:
    """What the chat template puts between turns, as token ids: after the policy's
    end-of-turn token, the environment's messages and the next assistant header.

    The template renders a probe conversation with and without the new messages; the
    difference is what follows the assistant's turn (``glue``: what the template writes
    after the turn's end token, e.g. ChatML's newline, then the messages and the
    generation prompt). Only the environment's text is tokenized: the policy's own
    tokens stay as sampled."""

    def __init__(self, tokenizer, tools: Sequence[dict] | None, eos_ids: Sequence[int]):
        self.tokenizer, self.tools = tokenizer, list(tools) or None
        self.eos_texts = [t for t in tokenizer.convert_ids_to_tokens(list(eos_ids)) if t]

    def _render(self, messages: list[dict], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tools=self.tools, tokenize=False, add_generation_prompt=generation_prompt
        )

    def continuation_ids(self, assistant: dict, messages: list[dict]) -> list[int]:
        probe = [{"role": "user", "content": _PROBE}, {**assistant, "content": _PROBE}]
        base = self._render(probe, False)
        full = self._render(probe + list(messages), True)
        if not full.startswith(base):
            raise ValueError("the chat template renders a conversation's earlier turns "
                             "differently once a message follows them; cannot append turns")
        glue = ""
        ends = [(base.rfind(t), t) for t in self.eos_texts if base.rfind(t) >= 0]
        if ends:
            at, text = max(ends)
            if at > base.rfind(_PROBE):
                glue = base[at + len(text):]
        return list(self.tokenizer.encode(glue + full[len(base):], add_special_tokens=False))


def _openai_calls(turn: AssistantTurn) -> list[dict]:
    import json

    return [{"type": "function", "id": call.id or f"call{i:05d}",
             "function": {"name": call.name, "arguments": json.dumps(call.arguments)}}
            for i, call in enumerate(turn.tool_calls)]


class EpisodeRunner:
    """Runs a batch of episodes with one policy on the engine (see the module docstring).

    ``make_env()`` builds one environment (one per episode); ``parser`` turns a turn's
    text into an ``AssistantTurn`` (``jaxpt.envs.parsers``); ``sampling`` is the
    rollout's ``SamplingConfig`` (temperature, filters, eos ids); prompts longer than
    ``max_prompt_length`` keep their end; an episode holds at most
    ``max_completion_length`` tokens after its prompt."""

    def __init__(self, tokenizer, make_env: Callable[[], Environment], *, sampling,
                 max_prompt_length: int, max_completion_length: int,
                 limits: EpisodeLimits = EpisodeLimits(), parser: str = "auto"):
        from jaxpt.data.tokenizer import end_of_turn_id
        from jaxpt.envs.parsers import parser_for

        self.tokenizer, self.make_env, self.sampling = tokenizer, make_env, sampling
        self.lp, self.lc, self.limits = max_prompt_length, max_completion_length, limits
        self.parser = parser_for(getattr(tokenizer, "chat_template", None), parser)
        self.eos = set(sampling.eos_token_ids)
        # What closes a turn cut at max_turn_tokens before the environment answers it.
        self.end_of_turn = end_of_turn_id(tokenizer)
        if self.end_of_turn is None and sampling.eos_token_ids:
            self.end_of_turn = sampling.eos_token_ids[0]
        self.truncated_prompts = 0
        self._renderers: dict[Any, TurnRenderer] = {}
        self._pool = futures.ThreadPoolExecutor(limits.max_parallel,
                                                thread_name_prefix="jaxpt-env")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- one batch
    def run(self, policy, rows: Sequence[dict], seeds: Sequence[int], key) -> list[Episode]:
        """Episodes of ``rows`` (one each; repeat a row for a group), environment ``i``
        reset with ``seeds[i]``, sampled by ``policy`` ((graphdef, state)) from ``key``."""
        from jaxpt.sampling.continuous import engine_for, sample_key_data

        graphdef, state = policy
        episodes = [Episode(row=row, seed=int(seed)) for row, seed in zip(rows, seeds)]
        for episode, started in zip(episodes, self._pool.map(self._reset, episodes)):
            episode.env, episode.messages, episode.prompt_ids = started
        engine = engine_for(graphdef, state, self.sampling, rows=len(episodes),
                            max_seq_len=self.lp + self.lc)
        episode_keys = sample_key_data(key, len(episodes))
        turn_keys = [None] * len(episodes)

        def turn_key(i: int, turn: int) -> np.ndarray:
            if turn_keys[i] is None:
                turn_keys[i] = sample_key_data(jax.random.wrap_key_data(episode_keys[i]),
                                               self.limits.max_turns)
            return turn_keys[i][turn : turn + 1]

        waiting = collections.deque(range(len(episodes)))
        by_request: dict[int, int] = {}
        stepping: dict[futures.Future, int] = {}
        in_flight = 0
        try:
            while waiting or by_request or stepping:
                while waiting and in_flight < engine.slots:
                    i = waiting.popleft()
                    episode = episodes[i]
                    episode.request_id = engine.add(
                        episode.prompt_ids, self._turn_budget(episode), turn_key(i, 0), hold=True)
                    by_request[episode.request_id] = i
                    in_flight += 1
                if engine.pending():
                    for completion in engine.step():  # a completion may be listed twice
                        if completion.finished and completion.request_id in by_request:
                            i = by_request.pop(completion.request_id)
                            if self._end_turn(episodes[i], completion):
                                stepping[self._pool.submit(self._env_step, episodes[i])] = i
                            else:
                                engine.release(completion.request_id)
                                in_flight -= 1
                    ready = [f for f in stepping if f.done()]
                else:
                    ready, _ = futures.wait(stepping, return_when=futures.FIRST_COMPLETED)
                for future in ready:
                    i = stepping.pop(future)
                    episode = episodes[i]
                    if self._continue(episode, future.result()):
                        episode.request_id = engine.resume(
                            episode.request_id, episode.pending_ids,
                            self._turn_budget(episode), turn_key(i, episode.turns))
                        by_request[episode.request_id] = i
                    else:
                        engine.release(episode.request_id)
                        in_flight -= 1
        finally:
            for request_id in list(by_request):
                engine.cancel(request_id)
            for episode in episodes:
                if episode.request_id is not None:
                    engine.release(episode.request_id)
            for future in stepping:
                future.cancel()
            self._pool.map(_close_env, episodes)
        return episodes

    # -- the steps of an episode
    def _reset(self, episode: Episode):
        env = self.make_env()
        try:
            messages = env.reset(episode.row, episode.seed)
        except Exception as error:
            raise RuntimeError(
                f"{type(env).__name__}.reset failed on the row {_row_repr(episode.row)}: "
                f"{type(error).__name__}: {error}") from error
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        from jaxpt.data import encode_prompt

        ids = encode_prompt(self.tokenizer, messages,
                            tools=[_schema(t) for t in env.tools] or None)
        if len(ids) > self.lp:
            ids = ids[-self.lp:]
            self.truncated_prompts += 1
        return env, list(messages), list(ids)

    def _renderer(self, env: Environment) -> TurnRenderer:
        schemas = tuple(_schema(t) for t in env.tools)
        key = tuple(_freeze(s) for s in schemas)
        if key not in self._renderers:
            self._renderers[key] = TurnRenderer(self.tokenizer, schemas,
                                                self.sampling.eos_token_ids)
        return self._renderers[key]

    def _turn_budget(self, episode: Episode) -> int:
        left = self.lc - len(episode.tokens)
        if self.limits.max_turn_tokens is not None:
            left = min(left, self.limits.max_turn_tokens)
        return max(left, 1)

    def _end_turn(self, episode: Episode, completion) -> bool:
        """Record a finished turn; whether the environment should answer it. A turn cut at
        ``max_turn_tokens`` with room left in the episode is closed with the end-of-turn
        token (not the policy's: no loss) and answered; one that used up the episode's
        budget ends the episode."""
        start = len(episode.tokens)
        episode.tokens += completion.tokens
        episode.policy_mask += [1] * len(completion.tokens)
        episode.logprobs += completion.policy_logprobs
        episode.turns += 1
        ids = list(completion.tokens)
        ended = completion.finish_reason == "stop"
        if ended and ids and ids[-1] in self.eos:
            ids = ids[:-1]
        closable = self.end_of_turn is not None and len(episode.tokens) < self.lc - 1
        episode.pending_ids = []
        if not ended and closable:
            episode.pending_ids = [self.end_of_turn]  # the engine has not seen it yet
            episode.tokens.append(self.end_of_turn)
            episode.policy_mask.append(0)
            episode.logprobs.append(0.0)
            episode.metrics["turns_cut"] += 1
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        turn = self.parser(text)
        turn.truncated = not ended
        ended = ended or closable
        episode.parse_errors += len(turn.parse_errors)
        episode.final_text = turn.content
        entry = {"role": "assistant", "content": turn.content, "text": text,
                 "tokens": [start, len(episode.tokens)]}
        if turn.tool_calls:
            entry["tool_calls"] = [{"name": c.name, "arguments": c.arguments}
                                   for c in turn.tool_calls]
        episode.transcript.append(entry)
        episode.last_turn = turn
        if not ended:  # out of tokens mid-turn: nothing to answer
            episode.end = "tokens"
            return False
        return True

    def _env_step(self, episode: Episode) -> EnvStep | BaseException:
        try:
            return episode.env.step(episode.last_turn)
        except Exception as error:  # noqa: BLE001 - an environment bug must not end the run
            log.warning("%s.step failed (episode ended): %s: %s", type(episode.env).__name__,
                        type(error).__name__, error)
            return error

    def _continue(self, episode: Episode, result) -> bool:
        """Take the environment's answer; whether the episode goes on."""
        if isinstance(result, BaseException):
            episode.end = "env_error"
            episode.metrics["env_errors"] += 1
            return False
        episode.turn_rewards.append(float(result.reward))
        info = result.info or {}
        for name, count in (info.get("tool_calls") or {}).items():
            episode.tool_calls[name] += int(count)
        episode.tool_errors += int(info.get("tool_errors", 0))
        for name, value in (info.get("metrics") or {}).items():
            episode.metrics[name] += float(value)
        if result.done:
            episode.end = "done"
            episode.transcript += [_logged(m) for m in result.messages]
            return False
        if episode.turns >= self.limits.max_turns:
            episode.end = "max_turns"
            return False
        room = self.lc - len(episode.tokens)
        if sum(len(str(m.get("content", ""))) for m in result.messages) > _CHARS_PER_TOKEN * room:
            episode.end = "tokens"  # cannot fit: not worth rendering (a flood of results)
            return False
        assistant = {"role": "assistant", "content": episode.last_turn.content}
        if episode.last_turn.tool_calls:
            assistant["tool_calls"] = _openai_calls(episode.last_turn)
        ids = self._renderer(episode.env).continuation_ids(assistant, result.messages)
        if len(episode.tokens) + len(ids) >= self.lc:  # no room left for another turn
            episode.end = "tokens"
            return False
        start = len(episode.tokens)
        episode.tokens += ids
        episode.policy_mask += [0] * len(ids)
        episode.logprobs += [0.0] * len(ids)
        episode.transcript += [{**_logged(m), "tokens": [start, len(episode.tokens)]}
                               for m in result.messages]
        episode.pending_ids = episode.pending_ids + ids
        return True


def episode_runner(ctx, tokenizer, sampling, max_prompt_length: int,
                   max_completion_length: int, *, without_tools: bool = False) -> EpisodeRunner:
    """The run's ``EpisodeRunner``: its ``envs`` section's environment, limits and parser."""
    from jaxpt.envs.registry import env_factory

    envs = ctx.config.envs
    limits = EpisodeLimits(max_turns=envs.max_turns, max_turn_tokens=envs.max_turn_tokens,
                           max_parallel=envs.max_parallel)
    return EpisodeRunner(tokenizer, env_factory(envs, without_tools=without_tools),
                         sampling=sampling, max_prompt_length=max_prompt_length,
                         max_completion_length=max_completion_length, limits=limits,
                         parser=envs.parser)


def check_envs(config) -> None:
    """A ConfigError naming the ``envs`` key when its environment, tools or parser cannot
    be built (an RL task's load-time check)."""
    from jaxpt.config import ConfigError
    from jaxpt.envs.parsers import parser_for
    from jaxpt.envs.registry import env_factory

    envs = config.envs
    if not envs.enabled():
        return
    try:
        env_factory(envs)
    except (ValueError, TypeError, ImportError, AttributeError) as error:
        raise ConfigError(f"config section 'envs' (spec {envs.spec!r}, tools "
                          f"{list(envs.tools)}): {error}") from None
    try:
        parser_for(None, envs.parser)
    except ValueError as error:
        raise ConfigError(f"config key 'envs.parser': {error}") from None


def episode_seeds(key, count: int) -> list[int]:
    """The environments' seeds of a rollout's ``count`` episodes, from its sampling key
    (a rerun of the rollout seeds them alike)."""
    base = int(np.asarray(jax.random.key_data(key)).ravel()[-1]) & 0x7FFFFFFF
    return [(base * 1_000_003 + i) & 0x7FFFFFFF for i in range(count)]


def episodes_rollout(episodes: Sequence[Episode], rows: Sequence[dict], group: int, rewards,
                     max_prompt_length: int, max_completion_length: int, pad_id: int = 0):
    """Episodes (``group`` per row, row-major) as a ``Rollout``: prompts left-padded, every
    token after the prompt in the completion buffer with ``policy_mask`` marking the
    policy's; the environments' rewards become the ``env`` score beside the reward
    functions' (``rewards``, a ``RewardBatch`` of the final answers)."""
    from jaxpt.rewards.runner import RewardBatch
    from jaxpt.sampling.api import left_pad
    from jaxpt.tasks.rl.batch import Rollout

    n, lc = len(episodes), max_completion_length
    prompt_ids, prompt_mask = left_pad([e.prompt_ids for e in episodes], n, max_prompt_length,
                                       pad_id)
    tokens = np.full((n, lc), pad_id, np.int32)
    policy_mask = np.zeros((n, lc), np.int32)
    logprobs = np.zeros((n, lc), np.float32)
    for r, e in enumerate(episodes):
        k = min(len(e.tokens), lc)
        tokens[r, :k], policy_mask[r, :k], logprobs[r, :k] = (
            e.tokens[:k], e.policy_mask[:k], e.logprobs[:k])
    env_n = np.array([e.reward for e in episodes], np.float32)
    scores = {**rewards.scores, "env": env_n}
    from jaxpt.rewards.runner import _COUNTER_KEYS

    counters = {**rewards.counters, "env": {k: int(k == "calls") for k in _COUNTER_KEYS}}
    rewards = RewardBatch(scores=scores, total=rewards.total + env_n, counters=counters)
    return Rollout(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, tokens=tokens,
        lengths=np.array([min(len(e.tokens), lc) for e in episodes], np.int32),
        logprobs=logprobs, truncated=np.array([e.truncated for e in episodes]),
        texts=[e.final_text for e in episodes], rows=[row for row in rows for _ in range(group)],
        rewards=rewards, num_prompts=len(rows), policy_mask=policy_mask,
        transcripts=[e.transcript for e in episodes],
    )


def episode_metrics(episodes: Sequence[Episode], prefix: str = "episode/") -> dict[str, float]:
    """Per-episode means: turns, tokens (all, the policy's), tool calls per tool, tool and
    parse errors, how episodes ended; and the share that called any tool."""
    n = max(len(episodes), 1)
    calls = collections.Counter()
    for e in episodes:
        calls.update(e.tool_calls)
    total_calls = sum(calls.values())
    errors = sum(e.tool_errors for e in episodes)
    metrics = {
        "turns": sum(e.turns for e in episodes) / n,
        "length": sum(len(e.tokens) for e in episodes) / n,
        "policy_tokens": sum(sum(e.policy_mask) for e in episodes) / n,
        "tool_call_rate": sum(bool(e.tool_calls) for e in episodes) / n,
        "tool_calls": total_calls / n,
        "tool_errors": errors / n,
        "tool_error_rate": errors / max(total_calls, 1),
        "parse_errors": sum(e.parse_errors for e in episodes) / n,
        "truncated_frac": sum(e.truncated for e in episodes) / n,
        "reward_env": sum(e.reward for e in episodes) / n,
    }
    metrics.update({f"tool_calls/{name}": count / n for name, count in calls.items()})
    for end in ("done", "max_turns", "tokens", "env_error"):
        metrics[f"end/{end}"] = sum(e.end == end for e in episodes) / n
    extra = collections.Counter()
    for e in episodes:
        extra.update(e.metrics)
    metrics.update({name: value / n for name, value in extra.items()})
    return {prefix + k: float(v) for k, v in metrics.items()}


def _schema(tool) -> dict:
    return tool.schema if hasattr(tool, "schema") else dict(tool)


def _freeze(value):
    import json

    return json.dumps(value, sort_keys=True)


def _logged(message: dict) -> dict:
    return {k: v for k, v in message.items() if k in ("role", "name", "content", "tool_call_id")}


def _row_repr(row: dict) -> str:
    text = repr({k: row[k] for k in list(row)[:3]})
    return text if len(text) < 200 else text[:197] + "..."


def _close_env(episode: Episode) -> None:
    if episode.env is not None:
        try:
            episode.env.close()
        except Exception as error:  # noqa: BLE001 - closing must not hide the rollout's result
            log.warning("closing %s failed: %s", type(episode.env).__name__, error)
