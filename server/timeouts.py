"""A deadline for each request head, which uvicorn lacks: slow clients are cut.

uvicorn closes an idle kept-alive connection after ``timeout_keep_alive``, but any byte that
arrives cancels that timer, and a new connection has no timer at all: 200 connections that each
sent half a request line stayed open for as long as their clients liked (a slowloris), each
holding a socket and a parser. ``head_deadline_protocol(seconds)`` is uvicorn's own HTTP protocol
class (httptools when installed, else h11, as ``http="auto"`` picks) with one timer: armed when a
connection opens and again when a response completes on a kept-alive one, it answers 408 and
closes the connection unless a whole request head arrived in time. Requests being served and
upgraded websockets are never touched. A stalled *body* is ``BodyLimitMiddleware``'s to time out.
"""

from __future__ import annotations

import asyncio

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _Http
except ImportError:  # pragma: no cover - uvicorn without its [standard] extras
    from uvicorn.protocols.http.h11_impl import H11Protocol as _Http  # type: ignore[assignment]

_TIMED_OUT = b"request head not received in time"
_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TIMED_OUT), _TIMED_OUT)
)


class _HeadDeadline(_Http):
    """uvicorn's HTTP protocol with a deadline on each request head (``head_timeout`` seconds)."""

    head_timeout: float = 10.0
    _head_timer: asyncio.TimerHandle | None = None
    _armed_for: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle, waiting for the next request's head
            self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._armed_for = self.cycle  # a new cycle means a whole head arrived
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.transport.get_protocol() is not self:
            return  # closed already, or upgraded to a websocket
        serving = self.cycle is not None and not self.cycle.response_complete
        if serving or self.cycle is not self._armed_for:
            return
        self.transport.write(_RESPONSE)
        self.transport.close()


def head_deadline_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol class with a ``seconds`` deadline on each request head; give it to
    ``uvicorn.Config(http=...)``."""
    return type("HeadDeadlineProtocol", (_HeadDeadline,), {"head_timeout": seconds})
