"""``python -m jaxpt.generate --model DIR --prompt "..."``: stream a completion (or chat).

The tokenizer comes from the model directory; a preset model name (``jaxpt-tiny``) or a
directory without one uses jaxpt's shipped tokenizer. The chat template is applied when
the tokenizer has one (``--no-chat-template`` to send the raw prompt). ``--chat`` reads
user turns from stdin and keeps the conversation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m jaxpt.generate", description=__doc__)
    parser.add_argument("--model", required=True, help="HF model dir or preset (jaxpt-tiny)")
    parser.add_argument("--prompt", help="the prompt (or the first user turn with --chat)")
    parser.add_argument("--chat", action="store_true", help="interactive multi-turn chat")
    parser.add_argument("--system", help="system message for the chat template")
    parser.add_argument("--no-chat-template", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.prompt is None and not args.chat:
        parser.error("give --prompt, or --chat to read turns from stdin")
    return args


def _has_tokenizer(path: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, n)) for n in names)


def load_tokenizer_for(model_path: str):
    """The model dir's own tokenizer, else jaxpt's shipped one."""
    if _has_tokenizer(model_path):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(model_path)
    from jaxpt.data import load_tokenizer

    return load_tokenizer()


def eos_ids(tokenizer, model_path: str) -> list[int]:
    """eos ids from the tokenizer and, when present, the model's generation_config.json."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    path = os.path.join(model_path, "generation_config.json")
    if os.path.exists(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return sorted(ids)


def encode(tokenizer, messages, use_template: bool) -> list[int]:
    if use_template:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(messages[-1]["content"])["input_ids"]


def stream_reply(model, tokenizer, prompt_ids, args, eos, out=sys.stdout) -> str:
    """Print the reply as it is generated; returns its text (special tokens dropped)."""
    from jaxpt.sampling.stream import stream_tokens

    tokens, shown = [], ""
    for token in stream_tokens(
        model,
        prompt_ids,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        eos_token_id=eos,
        seed=args.seed,
    ):
        tokens.append(token)
        # Decode the whole reply each time: a token may complete a multi-byte character.
        text = tokenizer.decode(tokens, skip_special_tokens=True)
        out.write(text[len(shown) :])
        out.flush()
        shown = text
    out.write("\n")
    out.flush()
    return shown


def main(argv=None) -> None:
    args = parse_args(argv)
    from jaxpt.models import load_model

    model = load_model(args.model, seed=args.seed)
    tokenizer = load_tokenizer_for(args.model)
    use_template = bool(getattr(tokenizer, "chat_template", None)) and not args.no_chat_template
    eos = eos_ids(tokenizer, args.model)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    first = args.prompt
    while True:
        if first is not None:
            user, first = first, None
        else:
            if not args.chat:
                return
            sys.stdout.write("> ")
            sys.stdout.flush()
            user = sys.stdin.readline()
            if not user:  # end of input
                return
            user = user.rstrip("\n")
        messages.append({"role": "user", "content": user})
        reply = stream_reply(model, tokenizer, encode(tokenizer, messages, use_template), args, eos)
        messages.append({"role": "assistant", "content": reply})
        if not args.chat:
            return


if __name__ == "__main__":
    main()
