"""The OpenAI-compatible HTTP API (FastAPI): ``/v1/models``, ``/v1/chat/completions`` and
``/v1/completions``, whole or streamed as server-sent events.

A request the server cannot serve gets a 4xx with an OpenAI-style error body naming the
field; a client that leaves mid-stream stops its sampling at the next token.
"""

import asyncio
import json
import threading
import time

from jaxpt.serving import protocol
from jaxpt.serving.backend import Backend


def build_app(backend: Backend):
    """The ASGI app serving ``backend``'s model (run it with uvicorn). No postponed
    annotations in this module: FastAPI reads the handlers' ``Request`` annotation."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI(title="jaxpt", docs_url=None, redoc_url=None)

    def refuse(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse(protocol.error_body(message), status_code=status)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [
            {"id": backend.model_name, "object": "model", "created": int(time.time()),
             "owned_by": "jaxpt"}
        ]}

    async def body_of(request: Request):
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise protocol.RequestError(f"the request body is not JSON: {error}") from None

    async def serve(request: Request, parse):
        try:
            parsed = parse(await body_of(request), vocab_size=backend.vocab_size,
                           max_tokens_limit=backend.max_tokens_limit)
            backend.check(parsed)
            if parsed.stream:
                return StreamingResponse(_events(backend, parsed),
                                         media_type="text/event-stream")
            choices = await asyncio.to_thread(backend.complete, parsed)
        except protocol.RequestError as error:
            return refuse(str(error))
        return protocol.response(parsed, backend.model_name, choices)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await serve(request, lambda body, **kw: protocol.parse_chat(
            body, backend.encode_chat, **kw))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await serve(request, lambda body, **kw: protocol.parse_completion(
            body, backend.encode_text, **kw))

    return app


async def _events(backend: Backend, parsed: protocol.Request):
    """Server-sent events of one streamed reply. The sampling runs in a thread that hands
    pieces over a queue; leaving (a disconnect cancels this generator) stops that thread
    at its next token, so the model is free for the next request."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()
    done = object()

    def produce():
        try:
            for piece in backend.stream(parsed, cancelled):
                loop.call_soon_threadsafe(queue.put_nowait, piece)
        except Exception as error:  # noqa: BLE001 - reported to the client, not lost
            loop.call_soon_threadsafe(queue.put_nowait, error)
        finally:
            loop.call_soon_threadsafe(queue.put_nowait, done)

    worker = threading.Thread(target=produce, name="jaxpt-serve-stream", daemon=True)
    worker.start()
    stream_id = protocol.new_id(parsed.kind)

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload)}\n\n"

    try:
        first = set(range(parsed.n))  # choices whose first chunk (the role) is still due
        while True:
            piece = await queue.get()
            if piece is done:
                break
            if isinstance(piece, Exception):
                message = str(piece) if isinstance(piece, protocol.RequestError) else (
                    f"generation failed: {type(piece).__name__}")
                yield event(protocol.error_body(message, "server_error"))
                break
            starts = piece.index in first
            if (piece.text or piece.finish_reason or starts or parsed.echo_token_ids
                    or piece.logprobs is not None):
                yield event(protocol.chunk(
                    parsed, backend.model_name, stream_id, text=piece.text,
                    token_ids=piece.token_ids, finish_reason=piece.finish_reason, first=starts,
                    index=piece.index, logprobs=piece.logprobs))
                first.discard(piece.index)
        yield "data: [DONE]\n\n"
    finally:
        cancelled.set()
