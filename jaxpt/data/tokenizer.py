"""Load a Hugging Face tokenizer: the shipped jaxpt-tiny one, a local directory, a hub name,
or the one inside a GGUF model file."""

import logging
import os
from pathlib import Path

from jaxpt.data.tokenizer_builder import ASSET_DIR

SHIPPED_NAME = "jaxpt-tiny"

log = logging.getLogger(__name__)


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
    name, GGUF model or preset), else the model dir's own files, the GGUF file's for a GGUF
    model (a ``.gguf``, a ``pkg:`` spec, a dir holding one), the hub repo's for a hub name,
    and the shipped one for the presets (``jaxpt-tiny``, ``bench-tiny``, ...: random-init
    models that have no tokenizer of their own).

    Anything else raises ``FileNotFoundError`` naming the path: a model dir without
    tokenizer files, or a path that does not exist. A tokenizer that does not match the
    model's vocabulary trains garbage, so none is guessed.
    """
    from jaxpt.models.checkpoint_path import find_gguf, resolve_checkpoint_path

    spec = str(tokenizer if tokenizer is not None else model_path)
    path = resolve_checkpoint_path(spec)
    has_files = os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in TOKENIZER_FILES
    )
    gguf_path = None if has_files else find_gguf(path)
    if gguf_path is not None:
        return gguf_tokenizer(gguf_path)
    if has_files:
        return load_tokenizer(path)
    if not os.path.exists(path) and is_preset(spec):
        return load_tokenizer(None)
    if is_hub_name(path):
        return load_tokenizer(path)
    flag = "the tokenizer" if tokenizer is not None else "the model"
    if os.path.isdir(path):
        raise FileNotFoundError(
            f"{path}: {flag} directory has no tokenizer files ({', '.join(TOKENIZER_FILES)}) "
            "and no GGUF file; save the tokenizer there (tokenizer.save_pretrained) or name "
            "one (config key 'model.tokenizer', CLI --tokenizer)"
        )
    raise FileNotFoundError(
        f"{path}: {flag} path does not exist and is no preset ({', '.join(preset_names())}) "
        "or hub name (org/name)"
    )


def preset_names() -> list[str]:
    """The model names that need no files: the shipped model and the named presets."""
    from jaxpt.models.presets import PRESETS

    return [SHIPPED_NAME, *PRESETS]


def is_preset(name: str) -> bool:
    """Whether ``name`` is a preset model (random init from a config jaxpt ships), whose
    tokenizer is the shipped one."""
    from jaxpt.models.presets import preset_config

    return str(name) == SHIPPED_NAME or preset_config(str(name)) is not None


def eos_token_ids(tokenizer, model_path: str | None = None) -> list[int]:
    """Every id that ends a reply, the one policy of every path that generates (RL
    rollouts, evals, judges, rejection sampling, the generate CLI):

    - the tokenizer's eos;
    - when ``model_path`` is a dir with a ``generation_config.json``, its ``eos_token_id``
      (an int or a list; chat models often stop on an end-of-turn token that is not the
      tokenizer's eos, e.g. Llama 3's ``<|eot_id|>``);
    - the special token the chat template puts right after an assistant reply
      (``end_of_turn_id``: ChatML's ``<|im_end|>``, Llama 3's ``<|eot_id|>``), for a model
      whose files say neither.

    A GGUF model has no generation config: its tokenizer's eos and template say it all.
    """
    import json

    from jaxpt.models.checkpoint_path import resolve_checkpoint_path

    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    turn_end = end_of_turn_id(tokenizer)
    if turn_end is not None:
        ids.add(turn_end)
    model_dir = resolve_checkpoint_path(model_path) if model_path else None
    path = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if path and os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)


_PROBE = "JAXPT_REPLY_PROBE"  # assistant content no template rewrites


def end_of_turn_id(tokenizer) -> int | None:
    """The id of the special token the chat template writes right after an assistant
    reply's content (whitespace between them allowed), or None: no template, or one that
    ends a reply with plain text.

    Found by rendering a one-exchange conversation, not from a list of known names, so it
    holds for any template (ChatML ``<|im_end|>``, Llama 3 ``<|eot_id|>``, Gemma
    ``<end_of_turn>``, Mistral's ``</s>``).
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as error:  # noqa: BLE001 -- templates raise anything (jinja, ValueError)
        log.warning("chat template cannot render a user/assistant exchange (%s): replies "
                    "end only at the eos ids", error)
        return None
    at = text.rfind(_PROBE)
    if at < 0:
        return None
    after = text[at + len(_PROBE) :].lstrip()
    specials = {str(t) for t in tokenizer.all_special_tokens}
    specials.update(
        str(t) for t in getattr(tokenizer, "added_tokens_decoder", {}).values()
        if getattr(t, "special", False)
    )
    # The longest match: one special token may begin with another.
    for token in sorted(specials, key=len, reverse=True):
        if token and after.startswith(token):
            token_id = tokenizer.convert_tokens_to_ids(token)
            return None if token_id is None else int(token_id)
    return None
