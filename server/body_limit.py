"""Reject oversized or stalled request bodies before any handler parses them."""

from __future__ import annotations

import asyncio

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimitMiddleware:
    """Answer 413 to an HTTP body over ``max_bytes``, and 408 to one that stalls for
    ``stall_seconds`` between two chunks; other bodies are read once and replayed.

    Our REST bodies are tiny commands, so buffering them is cheap, and a lying or missing
    ``Content-Length`` cannot sneak a large body past the check. A client that sends part of a body
    and then nothing would otherwise hold its connection and its task for as long as it likes (the
    request head has its own deadline: ``avgctl.server.timeouts``).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, stall_seconds: float | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.stall_seconds = stall_seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _too_large(scope, receive, send, self.max_bytes)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.stall_seconds)
            except asyncio.TimeoutError:  # the builtin TimeoutError only from Python 3.11
                await _stalled(scope, receive, send, self.stall_seconds)
                return
            if message["type"] != "http.request":  # client went away: let the app see it
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await _too_large(scope, receive, send, self.max_bytes)
                return
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _stalled(scope: Scope, receive: Receive, send: Send, seconds: float | None) -> None:
    detail = f"request body stalled for more than {seconds:g} s"
    response = JSONResponse({"detail": detail}, status_code=408, headers={"Connection": "close"})
    await response(scope, receive, send)


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    response = JSONResponse({"detail": f"request body larger than {limit} bytes"}, status_code=413)
    await response(scope, receive, send)
