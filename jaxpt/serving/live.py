"""A server running beside other work in this process: ``serve_in_thread`` starts
``jaxpt.serve``'s app on a background thread and returns a handle with its URL, a way to
swap in new weights (a trainer serving its live policy to environments and judges) and a
way to stop it."""

from __future__ import annotations

import threading
import time

from jaxpt.serving.backend import Backend


class RunningServer:
    """A server started by ``serve_in_thread``: ``url`` is its OpenAI base URL
    (``http://host:port/v1``)."""

    def __init__(self, backend: Backend, server, thread: threading.Thread):
        self.backend, self._server, self._thread = backend, server, thread
        host, port = server.servers[0].sockets[0].getsockname()[:2]
        self.base = f"http://{host}:{port}"
        self.url = self.base + "/v1"

    def set_weights(self, state) -> None:
        """Serve ``state`` (the same structure as the weights served so far) from the
        engine's next round on."""
        self.backend.loop.set_weights(state)

    def close(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


def serve_in_thread(backend: Backend, *, host: str = "127.0.0.1", port: int = 0,
                    timeout_s: float = 60.0) -> RunningServer:
    """Start the app over ``backend`` (``port`` 0: a free one) and wait until it listens."""
    import uvicorn

    from jaxpt.serving import build_app

    server = uvicorn.Server(uvicorn.Config(build_app(backend), host=host, port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, name="jaxpt-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on {host}:{port} did not start")
        time.sleep(0.05)
    return RunningServer(backend, server, thread)
