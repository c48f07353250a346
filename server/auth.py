"""Bearer tokens with three rights: control (everything), read (GETs, dashboards), worker (ingest).

One ASGI middleware guards every route and websocket, so no endpoint can forget its check: what
is not listed as public needs a token (deny by default). Public are ``/api/health`` and the
dashboard's own files (``/``, ``/index.html``, ``/<name>.js``, ``/<name>.css``, ``/vendor/uplot/*``,
GET/HEAD only): they hold no data, and the page must load to explain a missing or wrong token.
``/api/*``, ``/metrics``, ``/ws/*`` and the API docs (``/docs``, ``/openapi.json``) stay guarded.

A token comes from ``Authorization: Bearer``, ``?token=`` or the ``avgctl_token`` cookie the
dashboard login sets: ``/?token=<read or control token>`` sets the cookie and redirects to ``/``;
``/?token=<anything else>`` redirects to ``/`` without a cookie, so the page says what is wrong.

A token proves a role, and the cookie proves only that a browser holds it; which page sent the
request is the ``Origin`` header's to say. A browser sends the cookie from every page of the same
*site*, and a site ignores the port: a page on ``127.0.0.1:8702`` is the same site as a server on
``127.0.0.1:8000``. So (all refusals are 403 with a reason, as the handshake's HTTP answer):

- the cookie counts only with no ``Origin`` (a top-level navigation or a same-origin GET) or an
  allowed one: the server's own (``Host`` with the request's scheme) or one of ``allowed_origins``;
- a dashboard websocket (``/ws/jobs/*``) must come from an allowed origin; without an ``Origin``
  (a script, the CLI, a test: browsers always send one) the token must be presented explicitly,
  in ``Authorization`` or ``?token=``, never by the cookie alone;
- ``/ws/worker`` refuses any request with an ``Origin``: a worker link sends none, and no page
  has a reason to register a rank. It takes the worker token, and the control token only when no
  worker token is configured (the one-token setup) or ``control_token_on_worker_socket`` is set.
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
        self.has_worker_token = bool(worker)

    def role(self, token: str | None) -> Role | None:
        if not token:
            return None
        given = token.encode()
        found = None
        for expected, role in self._tokens:  # no early exit: time does not depend on which matched
            if hmac.compare_digest(given, expected) and found is None:
                found = role
        return found


def required(scope: Scope, control_on_worker_socket: bool = True) -> frozenset[Role]:
    """Which roles may use this request."""
    path = scope["path"]
    if path == WORKER_PATH:
        return frozenset({Role.WORKER, Role.CONTROL}) if control_on_worker_socket else frozenset({Role.WORKER})
    if scope["type"] == "websocket" or scope.get("method") in ("GET", "HEAD"):
        return frozenset({Role.READ, Role.CONTROL})
    return frozenset({Role.CONTROL})


def _token(scope: Scope) -> tuple[str | None, str | None]:
    """The presented token and where it came from: ``header``, ``query``, ``cookie`` (or None)."""
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip(), "header"
    for key, value in parse_qsl(scope.get("query_string", b"").decode("latin-1")):
        if key == "token":
            return value, "query"
    cookie = headers.get(b"cookie")
    if cookie:
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(cookie.decode("latin-1"))
        except Exception:  # a malformed cookie header is just no token
            return None, None
        if COOKIE in jar:
            return jar[COOKIE].value, "cookie"
    return None, None


def normal_origin(origin: str) -> str:
    """``origin`` as browsers write it: lower case, no trailing ``/``, no default port."""
    origin = origin.strip().rstrip("/").lower()
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[: -len(port)]
    return origin


def own_origin(scope: Scope) -> str | None:
    """The origin the client reached this server at: the ``Host`` header with the request's scheme
    (``https`` behind a TLS proxy whose ``X-Forwarded-Proto`` uvicorn trusts)."""
    host = dict(scope.get("headers") or []).get(b"host")
    if not host:
        return None
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
    return normal_origin(f"{scheme}://{host.decode('latin-1')}")


def origin_refusal(scope: Scope, source: str | None, allowed: frozenset[str]) -> str | None:
    """Why this request's ``Origin`` (or its absence) may not go with how it presents its token;
    None when it may."""
    sent = dict(scope.get("headers") or []).get(b"origin")
    origin = None if sent is None else sent.decode("latin-1")
    if scope["type"] == "websocket" and scope["path"] == WORKER_PATH:
        if origin is not None:
            return f"a browser page (Origin {origin}) may not open {WORKER_PATH}"
        return None
    if origin is None:
        if scope["type"] == "websocket" and source == "cookie":
            return "the login cookie is not enough without an Origin: send the token as Authorization: Bearer"
        return None
    if scope["type"] != "websocket" and source != "cookie":
        return None  # explicit tokens: the page had to know the token, and CORS keeps answers from it
    if normal_origin(origin) in allowed or normal_origin(origin) == own_origin(scope):
        return None
    return f"origin {origin} is not allowed (the server's own origin or --allowed-origins)"


class AuthMiddleware:
    """Reject requests without the right token (401 unknown/missing, 403 lacking the right)."""

    def __init__(
        self,
        app: ASGIApp,
        tokens: Tokens,
        allowed_origins: list[str] | tuple[str, ...] = (),
        control_token_on_worker_socket: bool = False,
    ):
        self.app = app
        self.tokens = tokens
        self.allowed_origins = frozenset(normal_origin(o) for o in allowed_origins)
        # The one-token setup (no worker token) must keep working: its control token serves workers.
        self.control_on_worker_socket = control_token_on_worker_socket or not tokens.has_worker_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        token, source = _token(scope)
        role = self.tokens.role(token)
        if is_page_file(scope):
            if scope["path"] == "/" and source == "query":
                # Log in with a dashboard token; any other token just leaves the address bar.
                await _login(scope, receive, send, token if role in (Role.READ, Role.CONTROL) else None)
                return
            await self.app(scope, receive, send)
            return
        refusal = origin_refusal(scope, source, self.allowed_origins)
        if refusal is not None:
            status, detail = 403, refusal
        elif role is None:
            status, detail = 401, "missing token" if token is None else "invalid token"
        elif role not in required(scope, self.control_on_worker_socket):
            status, detail = 403, f"a {role.value} token may not do this"
            if role is Role.CONTROL:  # only /ws/worker refuses the control token
                detail = f"{WORKER_PATH} takes the worker token (or set control_token_on_worker_socket)"
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
        # Secure when the browser came over TLS (directly, or through a proxy uvicorn trusts).
        secure = scope.get("scheme") == "https"
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/", secure=secure)
    await response(scope, receive, send)


async def _deny(scope: Scope, receive: Receive, send: Send, status: int, detail: str) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers={"WWW-Authenticate": "Bearer"})
    if scope["type"] == "http":
        await response(scope, receive, send)
    elif "websocket.http.response" in scope.get("extensions", {}):
        await response(scope, receive, send)  # an HTTP answer to the handshake, with its status
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": f"{status} {detail}"})
