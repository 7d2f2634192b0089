"""``python -m jaxpt.serve --model M``: an OpenAI-compatible HTTP server for a model.

Serves ``/v1/chat/completions`` (the model's chat template, ``tools`` rendered as it
defines them), ``/v1/completions`` and ``/v1/models``, whole or streamed, with ``n``,
``logprobs``/``top_logprobs``, ``stop``, ``max_tokens``, ``temperature``, ``top_p`` and
``seed``. Token ids in and out without re-tokenizing: ``prompt_token_ids`` (chat) or a
token-id ``prompt`` (completions) in, ``"return_token_ids": true`` for the reply's ids.
``--model`` is anything ``jaxpt.generate`` takes (a preset, an HF dir or hub name, a
``.gguf`` file, ``pkg:``); the tokenizer comes with it (or ``--tokenizer``), and
``--adapter`` serves a PEFT LoRA adapter on top of it. Concurrent requests decode together
in a continuous-batching engine over a paged KV cache (``--slots``, ``--kv-tokens``).
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
    parser.add_argument("--slots", type=int, default=32,
                        help="requests (samples) decoding together in one batch")
    parser.add_argument("--max-seq-len", type=int, default=None,
                        help="the longest prompt + reply served (default: the model's context)")
    parser.add_argument("--kv-tokens", type=int, default=None,
                        help="tokens the paged KV pool holds over all requests (default: "
                        "every slot at 1024 tokens, or at --max-seq-len if shorter); when it "
                        "runs out the newest request is paused and resumed later")
    parser.add_argument("--page-size", type=int, default=None, help="tokens per KV page")
    parser.add_argument("--adapter", help="a PEFT LoRA adapter dir served on top of --model "
                        "(not merged)")
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
    if args.adapter:
        from jaxpt.models.peft_io import attach_adapter

        attach_adapter(model, args.adapter)
    context = model.config.max_position_embeddings
    max_seq_len = min(args.max_seq_len or context, context)
    kv_tokens = args.kv_tokens or args.slots * min(1024, max_seq_len)
    return Backend(model, tokenizer, eos_token_ids(tokenizer, args.model),
                   model_name=args.served_model_name or args.model,
                   max_tokens_limit=args.max_tokens_limit, slots=args.slots,
                   max_seq_len=max_seq_len, kv_tokens=kv_tokens, page_size=args.page_size)


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
