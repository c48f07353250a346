"""Security headers on every HTTP answer: no framing, no type sniffing, no referrer, and a strict
Content-Security-Policy, so a page of the server runs only the server's own files.

The dashboard needs nothing else: its scripts and styles are files (``script-src 'self'``, no
inline code), it talks only to its own server (``connect-src 'self'``, which CSP Level 3 extends to
``ws:``/``wss:`` on the same host and port), and its favicon is a ``data:`` URL. A route may send its
own policy (``/docs`` allows its one inline script by hash); the middleware never replaces one.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send


def policy(script_src: str = "'self'") -> str:
    """The Content-Security-Policy of the server's pages; ``script_src`` widens only scripts."""
    return "; ".join(
        [
            "default-src 'self'",
            f"script-src {script_src}",
            "style-src 'self'",
            "img-src 'self' data:",
            "font-src 'self'",
            "connect-src 'self'",
            "object-src 'none'",
            "base-uri 'none'",
            "form-action 'self'",
            "frame-ancestors 'none'",
        ]
    )


HEADERS: list[tuple[bytes, bytes]] = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"content-security-policy", policy().encode()),
]


class SecurityHeadersMiddleware:
    """Add ``HEADERS`` to each HTTP response (and each HTTP answer to a websocket handshake) that
    does not set them itself."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] in ("http.response.start", "websocket.http.response.start"):
                headers = list(message.get("headers") or [])
                present = {name.lower() for name, _ in headers}
                headers.extend((name, value) for name, value in HEADERS if name not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
