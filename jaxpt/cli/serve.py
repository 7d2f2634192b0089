"""``python -m jaxpt.serve --model M``: an OpenAI-compatible HTTP server for a model.

Serves ``/v1/chat/completions`` (the model's chat template, ``tools`` rendered as it
defines them), ``/v1/completions`` and ``/v1/models``, whole or streamed, with ``n``,
``logprobs``/``top_logprobs``, ``stop``, ``max_tokens``, ``temperature``, ``top_p`` and
``seed``. Token ids in and out without re-tokenizing: ``prompt_token_ids`` (chat) or a
token-id ``prompt`` (completions) in, ``"return_token_ids": true`` for the reply's ids.
``--model`` is anything ``jaxpt.generate`` takes (a preset, an HF dir or hub name, a
``.gguf`` file, ``pkg:``); the tokenizer comes with it (or ``--tokenizer``).
"""

from __future__ import annotations

import argparse
import sys

from jaxpt.cli import command


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(prog="python -m jaxpt.serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="preset, HF dir or hub name, .gguf, pkg:")
    parser.add_argument("--tokenizer", help="default: the model's own (the shipped one for presets)")
    parser.add_argument("--served-model-name", help="the name clients send (default: --model)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-tokens-limit", type=int, default=4096,
                        help="the largest max_tokens a request may ask for")
    parser.add_argument("--seed", type=int, default=0, help="init seed of a preset model")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


def load_backend(args: argparse.Namespace):
    """The model, tokenizer and stop ids ``args`` name, as the server's backend."""
    from jaxpt.data import eos_token_ids, tokenizer_for_model
    from jaxpt.models import load_model
    from jaxpt.serving import Backend

    tokenizer = tokenizer_for_model(args.model, args.tokenizer)  # first: it names a bad path
    model = load_model(args.model, seed=args.seed)
    return Backend(model, tokenizer, eos_token_ids(tokenizer, args.model),
                   model_name=args.served_model_name or args.model,
                   max_tokens_limit=args.max_tokens_limit)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    import uvicorn

    from jaxpt.serving import build_app

    app = build_app(load_backend(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
