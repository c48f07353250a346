"""Every route of the app x {no token, read, worker, control} -> the expected status.

The routes are enumerated from the app itself, so a route added without a row here fails
``test_every_route_has_a_matrix_entry``: deciding who may call it is part of adding it.
"""

from __future__ import annotations

import pytest
from fastapi.routing import APIRoute, APIWebSocketRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route
from starlette.testclient import WebSocketDenialResponse
from starlette.websockets import WebSocketDisconnect

from avgctl.server.app import create_app
from avgctl.server.auth import OPEN_PATHS
from tests.support.polling import wait_for
from tests.support.servers import CONTROL, READ, WORKER, auth, make_settings

JOB = "auth-job"
TOKENS = {"none": None, "read": READ, "worker": WORKER, "control": CONTROL}
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")

# (kind, route path, concrete path) -> status for none, read, worker, control. For websockets, "ok"
# means the handshake is accepted (what the endpoint then says is tested elsewhere).
GET = {"none": 401, "read": 200, "worker": 403, "control": 200}
PUBLIC = {"none": 200, "read": 200, "worker": 200, "control": 200}
MATRIX: dict[tuple[str, str], tuple[str, dict[str, int | str]]] = {
    ("GET", "/api/health"): ("/api/health", PUBLIC),
    ("GET", "/api/jobs"): ("/api/jobs", GET),
    ("GET", "/api/limits"): ("/api/limits", GET),
    ("GET", "/api/session"): ("/api/session", GET),
    ("GET", "/api/jobs/{job_id}"): (f"/api/jobs/{JOB}", GET),
    ("POST", "/api/jobs/{job_id}/commands"): (
        f"/api/jobs/{JOB}/commands",
        {"none": 401, "read": 403, "worker": 403, "control": 202},
    ),
    ("GET", "/api/jobs/{job_id}/commands"): (f"/api/jobs/{JOB}/commands", GET),
    ("GET", "/api/jobs/{job_id}/commands/{command_id}"): (f"/api/jobs/{JOB}/commands/1", GET),
    ("GET", "/api/jobs/{job_id}/metrics"): (f"/api/jobs/{JOB}/metrics", GET),
    ("GET", "/api/jobs/{job_id}/series"): (f"/api/jobs/{JOB}/series?name=loss", GET),
    ("GET", "/api/jobs/{job_id}/layers"): (f"/api/jobs/{JOB}/layers", GET),
    ("GET", "/metrics"): ("/metrics", GET),
    ("GET", "/openapi.json"): ("/openapi.json", GET),
    ("GET", "/docs"): ("/docs", GET),
    ("GET", "/"): ("/", PUBLIC),
    ("MOUNT", "/vendor/uplot"): ("/vendor/uplot/uPlot.esm.js", PUBLIC),
    ("MOUNT", "/vendor/swagger-ui"): ("/vendor/swagger-ui/swagger-ui-bundle.js", PUBLIC),
    ("MOUNT", ""): ("/app.js", PUBLIC),
    # The control token serves workers only where no worker token is configured (not here).
    ("WS", "/ws/worker"): ("/ws/worker", {"none": 401, "read": 403, "worker": "ok", "control": 403}),
    ("WS", "/ws/jobs/{job_id}"): (f"/ws/jobs/{JOB}", {"none": 401, "read": "ok", "worker": 403, "control": "ok"}),
}


def app_routes(routes, prefix: str = "") -> set[tuple[str, str]]:
    """``(method or WS or MOUNT, path)`` of every route, looking inside included routers."""
    out: set[tuple[str, str]] = set()
    for route in routes:
        inner = getattr(route, "original_router", None)  # FastAPI >= 0.120 keeps included routers lazily
        if inner is not None:
            out |= app_routes(inner.routes, prefix + getattr(route.include_context, "prefix", ""))
        elif isinstance(route, APIWebSocketRoute):
            out.add(("WS", prefix + route.path))
        elif isinstance(route, (APIRoute, Route)):
            out |= {(m, prefix + route.path) for m in route.methods if m != "HEAD"}
        elif isinstance(route, Mount):
            out.add(("MOUNT", prefix + route.path))
        else:
            out.add((type(route).__name__, prefix + str(getattr(route, "path", route))))
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    settings = make_settings(tmp_path_factory.mktemp("auth"))
    with TestClient(create_app(settings)) as c:
        with c.websocket_connect("/ws/worker", headers=auth(WORKER)) as ws:
            ws.send_text(_hello())
            wait_for(lambda: c.get(f"/api/jobs/{JOB}", headers=auth(CONTROL)).status_code == 200, what="job stored")
        assert (
            c.post(f"/api/jobs/{JOB}/commands", json={"type": "average_now"}, headers=auth(CONTROL)).status_code == 202
        )
        yield c


def _hello() -> str:
    from tests.support.frames import hello

    # World size 2 with one rank: the job is left disconnected, not finished, so it takes commands.
    return hello(world_size=2).replace("job-1", JOB)


def test_every_route_has_a_matrix_entry(client):
    routes = app_routes(client.app.routes)
    assert routes - set(MATRIX) == set(), "a route without an auth matrix entry: add it to MATRIX"
    assert set(MATRIX) - routes == set(), "a matrix entry for a route that no longer exists"


HTTP_ROWS = [(k, v) for k, v in MATRIX.items() if k[0] not in ("WS",)]


@pytest.mark.parametrize("who", list(TOKENS))
@pytest.mark.parametrize("key", [k for k, _ in HTTP_ROWS], ids=[f"{m} {p or '/*'}" for (m, p), _ in HTTP_ROWS])
def test_http_route(client, key, who):
    path, expected = MATRIX[key]
    method = "GET" if key[0] == "MOUNT" else key[0]
    token = TOKENS[who]
    body = {"type": "average_now"} if method == "POST" else None
    out = client.request(method, path, headers=auth(token) if token else {}, json=body, follow_redirects=False)
    assert out.status_code == expected[who], out.text[:300]
    if expected[who] in (401, 403):
        assert "detail" in out.json() and out.headers.get("www-authenticate") == "Bearer"


@pytest.mark.parametrize("who", list(TOKENS))
@pytest.mark.parametrize(
    "key", [k for k, _ in HTTP_ROWS if k[0] != "MOUNT"], ids=[f"{m} {p}" for (m, p), _ in HTTP_ROWS if m != "MOUNT"]
)
def test_other_methods_are_refused(client, key, who):
    """Methods a route does not have: never served (404 or 405), and tokens are checked first."""
    path, _ = MATRIX[key]
    token = TOKENS[who]
    for method in HTTP_METHODS:
        if (method, key[1]) in MATRIX or method in ("GET", "HEAD"):
            continue
        status = client.request(method, path, headers=auth(token) if token else {}).status_code
        if key[1] in OPEN_PATHS or who == "control":
            assert status in (404, 405), (method, status)
        else:
            assert status == (401 if who == "none" else 403), (method, status)


WS_ROWS = [k for k in MATRIX if k[0] == "WS"]


@pytest.mark.parametrize("who", list(TOKENS))
@pytest.mark.parametrize("key", WS_ROWS, ids=[p for _, p in WS_ROWS])
def test_websocket_route(client, key, who):
    path, expected = MATRIX[key]
    token = TOKENS[who]
    headers = auth(token) if token else {}
    if expected[who] == "ok":
        with client.websocket_connect(path, headers=headers) as ws:
            if key[1] == "/ws/worker":
                ws.send_text("{not json")  # accepted, then refused on content: never on the token
                with pytest.raises(WebSocketDisconnect) as info:
                    ws.receive_text()
                assert info.value.code == 1008
            else:
                assert ws.receive_json()["kind"] == "snapshot"
    else:
        with pytest.raises(WebSocketDenialResponse) as info:
            with client.websocket_connect(path, headers=headers):
                pass
        assert info.value.status_code == expected[who]
