"""Load a Hugging Face tokenizer: the shipped jaxpt-tiny one, a local directory, or a hub name."""

import os
from pathlib import Path

from jaxpt.data.tokenizer_builder import ASSET_DIR

SHIPPED_NAME = "jaxpt-tiny"


def load_tokenizer(name_or_path: str | Path | None = None):
    """Return `AutoTokenizer.from_pretrained` for `name_or_path`.

    None or "jaxpt-tiny" gives the shipped character-level ChatML tokenizer (works offline);
    anything else is passed through, so a local directory or a hub name both work.
    """
    from transformers import AutoTokenizer  # heavy import, only when a tokenizer is needed

    if name_or_path is None or str(name_or_path) == SHIPPED_NAME:
        return AutoTokenizer.from_pretrained(str(ASSET_DIR))
    tokenizer = AutoTokenizer.from_pretrained(str(name_or_path))
    if tokenizer.pad_token_id is None:
        # Batches pad with pad_token_id; many base models ship without one.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_hub_name(name: str) -> bool:
    """``org/name`` as the Hugging Face Hub spells repo ids (not a local path)."""
    parts = str(name).split("/")
    return (
        len(parts) == 2 and all(parts) and not str(name).startswith((".", "~"))
        and not os.path.exists(name)
    )


def tokenizer_for_model(model_path: str, tokenizer: str | None = None):
    """The tokenizer that goes with ``model_path``: ``tokenizer`` when given, else the model
    dir's own files, the hub repo's for a hub name, and the shipped one for presets (and for
    dirs that carry no tokenizer files)."""
    if tokenizer is not None:
        return load_tokenizer(tokenizer)
    path = str(model_path)
    if os.path.isdir(path):
        has_files = any(os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES)
        return load_tokenizer(path if has_files else None)
    return load_tokenizer(path if is_hub_name(path) else None)


def eos_token_ids(tokenizer, model_path: str | None = None) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos and, when ``model_path`` is a dir with
    a ``generation_config.json``, its ``eos_token_id`` (an int or a list; chat models often
    stop on an end-of-turn token that is not the tokenizer's eos)."""
    import json

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = os.path.join(str(model_path), "generation_config.json") if model_path else None
    if path and os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)
