"""Build the shipped character-level tokenizer ("jaxpt-tiny") with the `tokenizers` library.

Every printable ASCII character, newline and tab is one token, so a tiny model sees each
digit of an arithmetic problem on its own. Rebuild the assets with::

    python -m jaxpt.data.tokenizer_builder [out_dir]
"""

import json
import string
import sys
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models

ASSET_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"

PAD, ENDOFTEXT, IM_START, IM_END, UNK = (
    "<|pad|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|unk|>",
)
SPECIAL_TOKENS = (PAD, ENDOFTEXT, IM_START, IM_END, UNK)  # ids 0..4, in this order
VOCAB_SIZE = 128  # a multiple of 8; spare ids are reserved "<|unused_k|>" tokens

# ChatML. Assistant content and its <|im_end|> sit inside {% generation %} so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks exactly what is trained.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{ message['content'] + '<|im_end|>' }}"
    "{%- endif %}"
    "{{ '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)


def base_characters() -> list[str]:
    """The plain-text alphabet: tab, newline and printable ASCII (space to '~')."""
    printable = [chr(c) for c in range(0x20, 0x7F)]
    assert "".join(printable[16:26]) == string.digits
    return ["\t", "\n", *printable]


def build_tokenizer() -> Tokenizer:
    """Return the `tokenizers.Tokenizer` for jaxpt-tiny (special tokens first, then chars)."""
    chars = base_characters()
    n_unused = VOCAB_SIZE - len(SPECIAL_TOKENS) - len(chars)
    unused = [f"<|unused_{k}|>" for k in range(n_unused)]
    specials = [*SPECIAL_TOKENS, *unused]
    vocab = {tok: i for i, tok in enumerate([*specials, *chars])}
    # BPE with no merges splits text into single characters and gives exact char offsets
    # (needed for assistant masks); Fuse joins tokens back without inserting spaces.
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    assert tok.get_vocab_size() == VOCAB_SIZE
    return tok


def tokenizer_config() -> dict:
    """The tokenizer_config.json that lets `AutoTokenizer.from_pretrained` load the assets."""
    vocab = build_tokenizer().get_vocab()
    added = {
        str(vocab[t]): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in sorted(vocab, key=vocab.get)
        if t.startswith("<|")
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": [ENDOFTEXT, IM_START],
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "padding_side": "right",
        "chat_template": CHAT_TEMPLATE,
    }


def write_tokenizer_assets(out_dir: str | Path = ASSET_DIR) -> Path:
    """(Re)write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer().save(str(out / "tokenizer.json"), pretty=True)
    config = tokenizer_config()
    special_map = {
        k: config[k] for k in ("eos_token", "pad_token", "unk_token", "additional_special_tokens")
    }
    for name, payload in (
        ("tokenizer_config.json", config),
        ("special_tokens_map.json", special_map),
    ):
        (out / name).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return out


if __name__ == "__main__":
    print(write_tokenizer_assets(sys.argv[1] if len(sys.argv) > 1 else ASSET_DIR))
