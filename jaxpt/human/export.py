"""Pairs of responses → one self-contained HTML page for human judges.

Each item's two responses are shown in a seeded random order (left/right); the order is
stored with the item, and every saved judgement names the models on the left and the
right and maps the choice back to a model, so annotators never see which model is which.
"""

from __future__ import annotations

import hashlib
import html
import json
import random

from jaxpt.human.jsonl import json_objects
from jaxpt.human.page_template import PAGE_TEMPLATE

REQUIRED = ("prompt", "response_a", "response_b")


def _text(value, where: str) -> str:
    """A prompt or response as display text (chat messages become "role: content" blocks)."""
    from jaxpt.judges.generator import question_text

    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        return question_text(value)
    raise ValueError(f"{where}: expected text or a list of chat messages, got {value!r:.80}")


def read_pairs(path: str) -> list[dict]:
    """Rows of a pairs .jsonl (``prompt``, ``response_a``, ``response_b``, optional ``id``,
    ``model_a``, ``model_b``), checked; errors name the file and line."""
    pairs, seen = [], set()
    for where, row in json_objects(path, REQUIRED):
        item_id = str(row.get("id", len(pairs)))
        if item_id in seen:
            raise ValueError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        model_a = str(row.get("model_a") or "model_a")
        model_b = str(row.get("model_b") or "model_b")
        if model_a == model_b:
            raise ValueError(f"{where}: model_a and model_b are both {model_a!r}")
        pairs.append({
            "id": item_id,
            "prompt": _text(row["prompt"], f"{where}: 'prompt'"),
            "response_a": _text(row["response_a"], f"{where}: 'response_a'"),
            "response_b": _text(row["response_b"], f"{where}: 'response_b'"),
            "model_a": model_a,
            "model_b": model_b,
        })
    if not pairs:
        raise ValueError(f"{path}: no pairs")
    return pairs


def page_items(pairs: list[dict], seed: int = 0) -> list[dict]:
    """The page's items: each pair with its responses placed left/right at random
    (``swapped``: model B is on the left), reproducible from ``seed``."""
    rng = random.Random(seed)
    items = []
    for pair in pairs:
        swapped = rng.random() < 0.5
        a = {"model": pair["model_a"], "text": pair["response_a"]}
        b = {"model": pair["model_b"], "text": pair["response_b"]}
        left, right = (b, a) if swapped else (a, b)
        items.append({
            "id": pair["id"], "prompt": pair["prompt"], "left": left, "right": right,
            "model_a": pair["model_a"], "model_b": pair["model_b"], "swapped": swapped,
        })
    return items


def render_page(items: list[dict], *, title: str = "Which response is better?") -> str:
    """The HTML page (inline CSS and JS, no network) for ``items``."""
    payload = json.dumps(items, ensure_ascii=False, sort_keys=True)
    page_id = hashlib.sha256(payload.encode()).hexdigest()[:16]
    # Inside <script>, "</" could close the element early; "<\/" is the same JSON string.
    data = json.dumps({"page": page_id, "items": items}, ensure_ascii=False).replace("</", "<\\/")
    return (
        PAGE_TEMPLATE.replace("__TITLE__", html.escape(title)).replace("__DATA__", data)
    )


def export_page(pairs_path: str, out_path: str, *, seed: int = 0, title: str | None = None) -> int:
    """Write the page for a pairs file; returns the number of items."""
    items = page_items(read_pairs(pairs_path), seed)
    text = render_page(items, title=title or "Which response is better?")
    with open(out_path, "w", encoding="utf-8") as f:
        f.write(text)
    return len(items)
