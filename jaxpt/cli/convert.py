"""``python -m jaxpt.convert SRC OUT_DIR``: write a model as a Hugging Face checkpoint dir.

SRC is a GGUF file, ``pkg:<module>/<path>`` (a file inside an installed package), or any
model dir, hub name or preset jaxpt loads. OUT_DIR gets ``config.json``, safetensors, the
tokenizer files and ``generation_config.json``: what ``AutoModelForCausalLM`` and
``AutoTokenizer`` load. A GGUF's tensors are dequantized and written one at a time,
without building the model.
"""

from __future__ import annotations

import argparse
import os
import sys

from jaxpt.cli import command

DTYPES = ("float32", "bfloat16", "float16")


def build_parser() -> argparse.ArgumentParser:
    """This command's argument parser; building it runs nothing."""
    parser = argparse.ArgumentParser(
        prog="python -m jaxpt.convert",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("src", help="a .gguf, pkg:<module>/<path>, a model dir or hub name")
    parser.add_argument("out_dir", help="the Hugging Face checkpoint dir to write")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="float32",
        help="dtype of the written weights (default: float32)",
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line as this command reads it; a usage error exits with status 2."""
    return build_parser().parse_args(argv)


def _write(src: str, out_dir: str, dtype: str):
    """Weights and config in ``out_dir``; (HF config, tokenizer)."""
    from jaxpt.data import tokenizer_for_model
    from jaxpt.models import gguf_of_spec, hf_config_of, load_model, save_pretrained
    from jaxpt.models.gguf_io import read_gguf
    from jaxpt.models.hf_export import write_gguf_as_hf

    gguf_path = gguf_of_spec(src)
    if gguf_path is not None:
        hf_config = write_gguf_as_hf(read_gguf(gguf_path), out_dir, dtype)
    else:
        model = load_model(src)
        hf_config = hf_config_of(model)
        save_pretrained(model, out_dir, dtype=dtype)
    return hf_config, tokenizer_for_model(src)


@command
def main(argv=None) -> int:
    args = parse_args(argv)
    from jaxpt.models import UnsupportedArchitectureError, resolve_checkpoint_path
    from jaxpt.models.hf_export import write_generation_config

    try:
        src = resolve_checkpoint_path(args.src)
        hf_config, tokenizer = _write(src, args.out_dir, args.dtype)
    except (UnsupportedArchitectureError, ImportError, OSError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    tokenizer.save_pretrained(args.out_dir)
    write_generation_config(args.out_dir, hf_config, tokenizer, src if os.path.isdir(src) else None)
    print(f"wrote {args.out_dir} ({args.dtype} weights)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
