"""Serving a model over HTTP: an OpenAI-compatible API (``python -m jaxpt.serve``).

``protocol`` parses requests and builds responses, ``backend`` generates with jaxpt's
sampler, ``app`` is the FastAPI app over them.
"""

from jaxpt.serving.backend import Backend
from jaxpt.serving.protocol import Request, RequestError

__all__ = ["Backend", "Request", "RequestError", "build_app"]


def build_app(backend):
    """The ASGI app serving ``backend`` (needs the ``serve`` extra: FastAPI)."""
    from jaxpt.serving.app import build_app as build

    return build(backend)
