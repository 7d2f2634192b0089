"""A judge served elsewhere: judge prompts sent to an OpenAI-compatible chat endpoint
(vLLM, SGLang, another ``python -m jaxpt.serve``) instead of a model in this process.

A judge whose model is a URL (``http://host:8000/v1``, ``?model=NAME`` to pick one of the
server's models) uses it: the same templates, verdict parsing and batching as an
in-process judge, with bounded concurrency, a timeout and retries per request, and a cache
of replies (a judge asked the same prompt again, greedy, gets the same reply free).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence

RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}


class EndpointError(RuntimeError):
    """The endpoint could not answer (after the retries); the message names the URL."""


def is_endpoint(model) -> bool:
    return isinstance(model, str) and model.startswith(("http://", "https://"))


class EndpointGenerator:
    """Judge prompts in, replies out, over ``POST {base_url}/chat/completions``.

    Each text is one user turn (after ``system_prompt``, when given); replies are the
    message contents. ``api_key_env`` names the environment variable holding the key (sent
    as a bearer token when set). ``max_concurrency`` requests are in flight at once; each
    gets ``timeout_s`` and ``retries`` more tries on a connection error or a retryable
    status (429, 5xx), with exponential backoff.
    """

    def __init__(self, url: str, *, max_new_tokens: int = 256, temperature: float = 0.0,
                 seed: int = 0, system_prompt: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout_s: float = 120.0,
                 retries: int = 3, max_concurrency: int = 8, backoff_s: float = 0.5):
        parsed = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parsed.query)
        self.base_url = urllib.parse.urlunsplit(parsed._replace(query="")).rstrip("/")
        self._model = (query.get("model") or [None])[0]
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self.system_prompt = system_prompt
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        self.timeout_s, self.retries, self.backoff_s = timeout_s, retries, backoff_s
        self.max_concurrency = max(1, max_concurrency)
        self.cache: dict[str, str] = {}
        self.requests = 0  # HTTP requests sent, retries included

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = f"{self.base_url}{path}"
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        for attempt in range(self.retries + 1):
            self.requests += 1
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as reply:
                    return json.loads(reply.read())
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:500]
                if error.code not in RETRY_STATUSES or attempt == self.retries:
                    raise EndpointError(f"{url}: HTTP {error.code}: {detail}") from None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as error:
                if attempt == self.retries:
                    raise EndpointError(
                        f"{url}: no answer after {self.retries + 1} tries: {error}"
                    ) from None
            time.sleep(self.backoff_s * 2**attempt)
        raise AssertionError("unreachable")

    @property
    def model(self) -> str:
        """The model name sent: ``?model=`` of the URL, else the server's first model."""
        if self._model is None:
            models = self._call("GET", "/models").get("data") or []
            if not models:
                raise EndpointError(f"{self.base_url}/models lists no model")
            self._model = models[0]["id"]
        return self._model

    def _body(self, text: str) -> dict:
        messages = [{"role": "user", "content": text}]
        if self.system_prompt is not None:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return {"model": self.model, "messages": messages, "max_tokens": self.max_new_tokens,
                "temperature": self.temperature, "seed": self.seed}

    def _reply(self, text: str) -> str:
        body = self._body(text)
        key = json.dumps(body, sort_keys=True)
        if key not in self.cache:
            reply = self._call("POST", "/chat/completions", body)
            try:
                self.cache[key] = reply["choices"][0]["message"]["content"] or ""
            except (KeyError, IndexError, TypeError):
                raise EndpointError(
                    f"{self.base_url}/chat/completions: a reply without choices[0].message: "
                    f"{json.dumps(reply)[:300]}"
                ) from None
        return self.cache[key]

    def __call__(self, texts: Sequence[str]) -> list[str]:
        if not texts:
            return []
        self.model  # noqa: B018 - resolved once, before the requests fan out
        with concurrent.futures.ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(self._reply, texts))
