"""``OpenEnvEnvironment``: a jaxpt environment played on an OpenEnv server.

An OpenEnv server (the ``openenv-core`` package) wraps an environment behind reset/step
with typed actions and observations. Its HTTP ``/reset`` and ``/step`` endpoints build a
fresh environment per request, so an episode of several steps needs a session: this
adapter opens one per episode with openenv-core's own client (``GenericEnvClient``, a
WebSocket on ``<base_url>/ws``), so the server keeps the episode's state between turns.

Each turn becomes an action: by default ``{"message": turn.text}`` (``action`` names
another field, or is a callable ``(turn) -> dict`` or its import path). Each observation
becomes a message: by default a user turn with its ``prompt``, ``text`` or ``message``
field (``observation_field`` names another; ``observation_to_messages`` replaces the
mapping). The observation's reward (None: 0) and done flag are the step's.

A server that cannot be reached at ``reset`` is an error naming the URL; a step that fails
(the connection drops, the server answers with an error, the action cannot be built) ends
the episode with no reward and ``env_errors`` counted in ``info["metrics"]``, so one
broken episode never stops a run.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable

from jaxpt.envs.base import AssistantTurn, Environment, EnvStep
from jaxpt.envs.imports import import_object

log = logging.getLogger(__name__)

DEFAULT_ACTION_FIELD = "message"
TEXT_FIELDS = ("prompt", "text", "message")  # tried in order when no field is named


def import_openenv_client():
    """openenv-core's ``GenericEnvClient``, or an ImportError saying how to install it."""
    try:
        from openenv.core.generic_client import GenericEnvClient
    except ImportError as error:
        raise ImportError(
            "OpenEnv environments need the openenv-core package: pip install 'jaxpt[openenv]' "
            "(or pip install openenv-core)"
        ) from error
    return GenericEnvClient


class OpenEnvEnvironment(Environment):
    """One episode on the OpenEnv server at ``base_url`` (see the module docstring).

    ``action``: the action's text field, or ``(turn) -> action dict`` (a callable or
    ``"package.module:function"``); ``observation_to_messages``: ``(observation dict,
    first: bool) -> messages``, replacing the default mapping (``observation_field`` and
    ``role``); ``reset_kwargs``: passed to the server's ``reset`` with the seed (a row's
    ``reset_kwargs`` column adds to them); ``timeout_s``: the longest wait for one answer
    of the server; ``connect_timeout_s``: for opening the session.
    """

    def __init__(
        self,
        base_url: str,
        *,
        action: str | Callable[[AssistantTurn], dict] = DEFAULT_ACTION_FIELD,
        observation_to_messages: str | Callable[[dict, bool], list[dict]] | None = None,
        observation_field: str | None = None,
        role: str = "user",
        reset_kwargs: dict | None = None,
        timeout_s: float = 60.0,
        connect_timeout_s: float = 10.0,
    ):
        self._client_class = import_openenv_client()  # fails when the env is built
        self.base_url = base_url.rstrip("/")
        self.make_action = _action_builder(action)
        self.to_messages = (_resolve(observation_to_messages, "observation_to_messages")
                            if observation_to_messages is not None else self._messages)
        self.observation_field = observation_field
        self.role = role
        self.reset_kwargs = dict(reset_kwargs or {})
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.client = None

    def reset(self, row: dict, seed: int) -> list[dict]:
        self.close()
        client = self._client_class(
            base_url=self.base_url, connect_timeout_s=self.connect_timeout_s,
            message_timeout_s=self.timeout_s,
        ).sync()
        kwargs = {**self.reset_kwargs, **(row.get("reset_kwargs") or {}), "seed": int(seed)}
        try:
            result = client.reset(**kwargs)
        except Exception as error:
            _close_quietly(client)
            raise ConnectionError(
                f"OpenEnv server at {self.base_url} could not start an episode: {error}. Is "
                "it running, and does it allow as many sessions as episodes run at once "
                "(its max_concurrent_envs)?"
            ) from error
        self.client = client
        return _join_user_turns(_prompt_messages(row) + self.to_messages(result.observation, True))

    def step(self, turn: AssistantTurn) -> EnvStep:
        try:
            result = self.client.step(self.make_action(turn))
        except Exception as error:  # noqa: BLE001 - server, network or action: end, count, go on
            self.close()
            message = f"OpenEnv step failed ({self.base_url}): {type(error).__name__}: {error}"
            log.warning("%s (the episode ends, counted in episode/env_errors)", message)
            return EnvStep(done=True, info={"error": message, "metrics": {"env_errors": 1}})
        reward = 0.0 if result.reward is None else float(result.reward)
        messages = self.to_messages(result.observation, False)
        if result.done:  # free the server's session now: it serves a bounded number at once
            self.close()
        return EnvStep(messages, reward, bool(result.done))

    def close(self) -> None:
        if self.client is not None:
            _close_quietly(self.client)
            self.client = None

    def _messages(self, observation: dict, first: bool) -> list[dict]:
        """The default mapping: one ``role`` turn with the observation's text (none if empty)."""
        text = observation_text(observation, self.observation_field)
        return [{"role": self.role, "content": text}] if text else []


def observation_text(observation: dict, field: str | None = None) -> str:
    """The text of an observation: ``field``; else its first of ``TEXT_FIELDS``; else its only
    string field; else the whole observation as JSON."""
    if field is not None:
        value = observation.get(field)
        return "" if value is None else value if isinstance(value, str) else json.dumps(value)
    for name in TEXT_FIELDS:
        if isinstance(observation.get(name), str):
            return observation[name]
    texts = [value for value in observation.values() if isinstance(value, str)]
    if len(texts) == 1:
        return texts[0]
    return json.dumps(observation, sort_keys=True) if observation else ""


def _action_builder(action) -> Callable[[AssistantTurn], dict]:
    if callable(action) or ":" in action:
        return _resolve(action, "action")
    return lambda turn: {action: turn.text}


def _resolve(ref, key: str) -> Callable:
    """A callable, or one named ``"package.module:attribute"``."""
    if callable(ref):
        return ref
    value = import_object(ref, f"OpenEnvEnvironment {key}")
    if not callable(value):
        raise TypeError(f"OpenEnvEnvironment {key}={ref!r} is not callable")
    return value


def _prompt_messages(row: dict) -> list[dict]:
    """The row's own prompt (instructions before the first observation), if it has one."""
    prompt = row.get("prompt")
    if not prompt:
        return []
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


def _join_user_turns(messages: list[dict]) -> list[dict]:
    """Consecutive user turns as one: some chat templates require roles to alternate."""
    out: list[dict] = []
    for message in messages:
        if out and message.get("role") == "user" == out[-1].get("role"):
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n\n{message['content']}"}
        else:
            out.append(dict(message))
    return out


def _close_quietly(client) -> None:
    with contextlib.suppress(Exception):  # closing a dead session must not fail the episode
        client.close()
