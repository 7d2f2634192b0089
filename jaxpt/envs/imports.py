"""Objects named by an import path ``package.module:name``: environments, tools and
OpenEnv mappings given in a config."""

from __future__ import annotations

import importlib


def import_object(path: str, what: str):
    """What an import path ``package.module:attribute`` (dots after the colon walk
    attributes) names; a ValueError naming ``what`` and the path when it cannot be found."""
    module_name, _, attributes = str(path).partition(":")
    try:
        value = importlib.import_module(module_name)
        for name in attributes.split("."):
            value = getattr(value, name)
    except (ImportError, AttributeError, ValueError) as error:
        raise ValueError(f"{what} {path!r} cannot be imported as 'package.module:name': "
                         f"{error}") from None
    return value
