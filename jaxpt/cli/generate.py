"""``python -m jaxpt.generate --model DIR --prompt "..."``: stream a completion (or chat).

The tokenizer comes from the model directory (or ``--tokenizer``); a preset model name
(``jaxpt-tiny``) uses jaxpt's shipped tokenizer, and a directory without one is an error.
The chat template is applied when the tokenizer has one (``--no-chat-template`` to send
the raw prompt). ``--chat`` reads user turns from stdin and keeps the conversation.
"""

from __future__ import annotations

import argparse
import sys

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(prog="python -m jaxpt.generate", description=__doc__)
    parser.add_argument("--model", required=True, help="HF model dir or preset (jaxpt-tiny)")
    parser.add_argument("--tokenizer", help="default: the model's own (the shipped one for presets)")
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
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.prompt is None and not args.chat:
        parser.error("give --prompt, or --chat to read turns from stdin")
    return args


def _user_turns(args, stdin):
    """The first ``--prompt`` and, with ``--chat``, one line of stdin per turn."""
    if args.prompt is not None:
        yield args.prompt
    if not args.chat:
        return
    while True:
        sys.stdout.write("> ")
        sys.stdout.flush()
        line = stdin.readline()
        if not line:  # end of input
            return
        yield line.rstrip("\n")


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxpt.data import encode_prompt, eos_token_ids, tokenizer_for_model
    from jaxpt.models import load_model
    from jaxpt.sampling.stream import stream_text

    tokenizer = tokenizer_for_model(args.model, args.tokenizer)  # first: it names a bad path
    model = load_model(args.model, seed=args.seed)
    sampling = {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "min_p": args.min_p,
        "eos_token_id": eos_token_ids(tokenizer, args.model),
        "seed": args.seed,
    }
    use_template = bool(getattr(tokenizer, "chat_template", None)) and not args.no_chat_template
    messages = [{"role": "system", "content": args.system}] if args.system else []
    for user in _user_turns(args, sys.stdin):
        messages.append({"role": "user", "content": user})
        if use_template:
            prompt_ids = encode_prompt(tokenizer, messages)
        else:  # the raw text of this turn, as the model saw text in pretraining
            prompt_ids = encode_prompt(tokenizer, user, chat_template=False)
        pieces = []
        for piece in stream_text(model, tokenizer, prompt_ids, **sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
            pieces.append(piece)
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(pieces)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
