"""Load a Hugging Face tokenizer: the shipped jaxpt-tiny one, a local directory, or a hub name."""

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
