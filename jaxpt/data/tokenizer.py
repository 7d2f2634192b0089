"""Load a Hugging Face tokenizer: the shipped jaxpt-tiny one, a local directory, a hub name,
or the one inside a GGUF model file."""

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
    return _with_pad_token(AutoTokenizer.from_pretrained(str(name_or_path)))


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def is_hub_name(name: str) -> bool:
    """``org/name`` as the Hugging Face Hub spells repo ids (not a local path, not a
    ``pkg:`` spec: repo ids have no colon)."""
    parts = str(name).split("/")
    return (
        len(parts) == 2 and all(parts) and not str(name).startswith((".", "~"))
        and ":" not in str(name) and not os.path.exists(name)
    )


def gguf_tokenizer(gguf_path: str):
    """The tokenizer a GGUF file carries, built as transformers builds it for ``gguf_file=``
    (without needing torch)."""
    from jaxpt.models.gguf_io import read_gguf

    return _with_pad_token(read_gguf(gguf_path).tokenizer())


def _with_pad_token(tokenizer):
    if tokenizer.pad_token_id is None:
        # Batches pad with pad_token_id; many base models ship without one.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_for_model(model_path: str, tokenizer: str | None = None):
    """The tokenizer that goes with ``model_path``: ``tokenizer`` when given (a path, hub
    name or GGUF model), else the model dir's own files, the GGUF file's for a GGUF model
    (a ``.gguf``, a ``pkg:`` spec, a dir holding one), the hub repo's for a hub name, and
    the shipped one for presets (and for dirs that carry no tokenizer files)."""
    from jaxpt.models.checkpoint_path import find_gguf, resolve_checkpoint_path

    path = resolve_checkpoint_path(tokenizer if tokenizer is not None else model_path)
    has_files = os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES
    )
    gguf_path = None if has_files else find_gguf(path)
    if gguf_path is not None:
        return gguf_tokenizer(gguf_path)
    if tokenizer is not None:
        return load_tokenizer(path)
    if os.path.isdir(path):
        return load_tokenizer(path if has_files else None)
    return load_tokenizer(path if is_hub_name(path) else None)


def eos_token_ids(tokenizer, model_path: str | None = None) -> list[int]:
    """Every id that ends a reply: the tokenizer's eos and, when ``model_path`` is a dir with
    a ``generation_config.json``, its ``eos_token_id`` (an int or a list; chat models often
    stop on an end-of-turn token that is not the tokenizer's eos). A GGUF model has no such
    file: its tokenizer's eos is its end of turn."""
    import json

    from jaxpt.models.checkpoint_path import resolve_checkpoint_path

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    model_dir = resolve_checkpoint_path(model_path) if model_path else None
    path = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)
