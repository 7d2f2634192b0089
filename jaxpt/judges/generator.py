"""The text-in, text-out model call both judges share: rendered judge prompts become user
turns, one ``jaxpt.sampling.PromptSampler`` launch per batch, replies decoded."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence

from jaxpt.rewards.text import completion_text

# A generator maps rendered judge prompts (texts) to the judge's replies, one call per batch.
Generator = Callable[[list[str]], list[str]]


def question_text(prompt) -> str:
    """A prompt (text or chat messages) as the text a judge template shows.

    A lone user message is its content; a longer conversation is one "role: content" line
    block per message.
    """
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Mapping):
        return completion_text(prompt)
    messages = [m for m in prompt if isinstance(m, Mapping)]
    if len(messages) == 1 and messages[0].get("role", "user") == "user":
        return completion_text(messages[0])
    return "\n\n".join(f"{m.get('role', 'user')}: {completion_text(m)}" for m in messages)


class ModelGenerator:
    """Judge prompts in, replies out: each text becomes a user turn (through the
    tokenizer's chat template, when it has one and ``chat_template``), the whole list is
    one launch of a ``jaxpt.sampling.PromptSampler``, replies are decoded without special
    tokens.

    ``model`` is a loaded jaxpt model (then ``tokenizer`` is required) or a path / preset /
    hub name, loaded on first use with ``jaxpt.models.load_model(model, **load_kwargs)``
    (tokenizer default: ``tokenizer_for_model``). Generation stops at ``eos_token_id``
    (default: ``jaxpt.data.eos_token_ids``: the tokenizer's eos, the chat template's end of
    turn and the model dir's ``generation_config.json`` ones).
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        eos_token_id: int | Sequence[int] | None = None,
        chat_template: bool = True,
        system_prompt: str | None = None,
        load_kwargs: Mapping | None = None,
    ):
        if model is None:
            raise ValueError("a judge needs a model (a loaded jaxpt model or a path)")
        self._path = os.fspath(model) if isinstance(model, (str, os.PathLike)) else None
        if self._path is None and (tokenizer is None or isinstance(tokenizer, str)):
            raise ValueError("a judge given a loaded model also needs its tokenizer object")
        self._model = None if self._path else model
        self._tokenizer = tokenizer
        self._eos = eos_token_id
        self._sampler = None
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.chat_template = chat_template
        self.system_prompt = system_prompt
        self.load_kwargs = dict(load_kwargs or {})

    def _ready(self):
        from jaxpt.data import tokenizer_for_model

        if self._tokenizer is None or isinstance(self._tokenizer, str):
            self._tokenizer = tokenizer_for_model(self._path, self._tokenizer)
        if self._model is None:
            from jaxpt.models import load_model

            self._model = load_model(self._path, **self.load_kwargs)
        return self._model, self._tokenizer

    @property
    def sampler(self):
        """The ``PromptSampler`` of the judge's replies (built on first use)."""
        from jaxpt.sampling import PromptSampler

        _, tokenizer = self._ready()
        if self._sampler is None:
            self._sampler = PromptSampler(
                tokenizer, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                model_path=self._path, eos_token_id=self._eos, chat=self.chat_template,
            )
        return self._sampler

    def encode(self, text: str) -> list[int]:
        """Token ids of one judge prompt."""
        _, tokenizer = self._ready()
        if self.system_prompt is not None and getattr(tokenizer, "chat_template", None):
            return self.sampler.encode([
                {"role": "system", "content": self.system_prompt},
                {"role": "user", "content": text},
            ])
        return self.sampler.encode(text)

    def __call__(self, texts: list[str]) -> list[str]:
        if not texts:
            return []
        model, _ = self._ready()
        prompts = [self.encode(t) for t in texts]
        (samples,) = self.sampler.sample_in_chunks(model, prompts, seed=self.seed)
        return samples.texts


def make_generator(model, tokenizer, generator: Generator | None, **settings) -> Generator:
    """``generator`` when given (e.g. a fake in tests, or another backend); for a ``model``
    that is a URL (``http://host:8000/v1``), an ``EndpointGenerator`` calling that
    OpenAI-compatible server; else a ``ModelGenerator`` of ``model``."""
    if generator is not None:
        return generator
    from jaxpt.judges.endpoint import EndpointGenerator, is_endpoint

    if is_endpoint(model):
        return EndpointGenerator(
            model, max_new_tokens=settings.get("max_new_tokens", 256),
            temperature=settings.get("temperature", 0.0), seed=settings.get("seed", 0),
            system_prompt=settings.get("system_prompt"),
        )
    return ModelGenerator(model, tokenizer, **settings)


def run_batched(generate_texts: Generator, texts: list[str], batch_size: int) -> list[str]:
    """Replies to ``texts``, ``batch_size`` per generator call, checked one per text."""
    replies = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        out = list(generate_texts(chunk))
        if len(out) != len(chunk):
            raise ValueError(f"the judge's generator returned {len(out)} replies for {len(chunk)}")
        replies.extend(out)
    return replies
