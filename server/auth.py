"""Bearer tokens with three rights: control (everything), read (GETs, dashboards), worker (ingest).

One ASGI middleware guards every route and websocket, so no endpoint can forget its check: what
is not listed as public needs a token (deny by default). Public are ``/api/health`` and the
dashboard's own files (``/``, ``/index.html``, ``/<name>.js``, ``/<name>.css``, ``/vendor/uplot/*``,
GET/HEAD only): they hold no data, and the page must load to explain a missing or wrong token.
``/api/*``, ``/metrics``, ``/ws/*`` and the API docs (``/docs``, ``/openapi.json``) stay guarded.

A token comes from ``Authorization: Bearer``, ``?token=`` or the ``avgctl_token`` cookie the
dashboard login sets: ``/?token=<read or control token>`` sets the cookie and redirects to ``/``;
``/?token=<anything else>`` redirects to ``/`` without a cookie, so the page says what is wrong.
"""

from __future__ import annotations

import enum
import hmac
from http.cookies import SimpleCookie
from urllib.parse import parse_qsl, urlencode

from starlette.responses import JSONResponse, RedirectResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from avgctl.server.pages import is_page_file

COOKIE = "avgctl_token"
OPEN_PATHS = frozenset({"/api/health"})
WORKER_PATH = "/ws/worker"


class Role(enum.Enum):
    CONTROL = "control"
    READ = "read"
    WORKER = "worker"


class Tokens:
    """The configured tokens; ``role(token)`` compares in constant time."""

    def __init__(self, control: str | None, read: str | None, worker: str | None):
        self._tokens = [
            (t.encode(), role) for t, role in ((control, Role.CONTROL), (read, Role.READ), (worker, Role.WORKER)) if t
        ]

    def role(self, token: str | None) -> Role | None:
        if not token:
            return None
        given = token.encode()
        found = None
        for expected, role in self._tokens:  # no early exit: time does not depend on which matched
            if hmac.compare_digest(given, expected) and found is None:
                found = role
        return found


def required(scope: Scope) -> frozenset[Role]:
    """Which roles may use this request."""
    path = scope["path"]
    if path == WORKER_PATH:
        return frozenset({Role.WORKER, Role.CONTROL})
    if scope["type"] == "websocket" or scope.get("method") in ("GET", "HEAD"):
        return frozenset({Role.READ, Role.CONTROL})
    return frozenset({Role.CONTROL})


def _token(scope: Scope) -> tuple[str | None, bool]:
    """The presented token and whether it came from the query string."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), False
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        if key == "token":
            return value, True
    cookie = headers.get(b"cookie")
    if cookie:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(cookie.decode("latin-1"))
        except Exception:  # a malformed cookie header is just no token
            return None, False
        if COOKIE in jar:
            return jar[COOKIE].value, False
    return None, False


class AuthMiddleware:
    """Reject requests without the right token (401 unknown/missing, 403 lacking the right)."""

    def __init__(self, app: ASGIApp, tokens: Tokens):
        self.app = app
        self.tokens = tokens

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token, from_query = _token(scope)
        role = self.tokens.role(token)
        if is_page_file(scope):
            if scope["path"] == "/" and from_query:
                # Log in with a dashboard token; any other token just leaves the address bar.
                await _login(scope, receive, send, token if role in (Role.READ, Role.CONTROL) else None)
                return
            await self.app(scope, receive, send)
            return
        if role is None:
            status, detail = 401, "missing token" if token is None else "invalid token"
        elif role not in required(scope):
            status, detail = 403, f"a {role.value} token may not do this"
        else:
            scope.setdefault("state", {})["role"] = role
            await self.app(scope, receive, send)
            return
        await _deny(scope, receive, send, status, detail)


async def _login(scope: Scope, receive: Receive, send: Send, token: str | None) -> None:
    # Trade the token in the URL for a cookie, so it leaves the address bar and the history. A token
    # that is not a dashboard token leaves too, without a cookie: the page then explains the problem.
    query = [(k, v) for k, v in parse_qsl(scope.get("query_string", b"").decode("latin-1")) if k != "token"]
    response = RedirectResponse("/" + (f"?{urlencode(query)}" if query else ""), status_code=303)
    if token is not None:
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
    await response(scope, receive, send)


async def _deny(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers={"WWW-Authenticate": "Bearer"})
    if scope["type"] == "http":
        await response(scope, receive, send)
    elif "websocket.http.response" in scope.get("extensions", {}):
        await response(scope, receive, send)  # an HTTP answer to the handshake, with its status
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": f"{status} {detail}"})
