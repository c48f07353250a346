"""Who may do what: control (everything), read (GETs, dashboards), worker (ingest only)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from avgctl.server.app import create_app
from tests.server.helpers import CONTROL, READ, WORKER, auth

HTTP_CASES = [
    ("GET", "/api/jobs"),
    ("GET", "/api/jobs/none"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/"),
    ("POST", "/api/jobs/none/commands"),
]
# (token, method, path) -> expected status; 404 means "allowed" for the unknown job.
ALLOWED = {
    CONTROL: {("GET", "/api/jobs"): 200, ("GET", "/api/jobs/none"): 404, ("GET", "/metrics"): 200,
              ("GET", "/docs"): 200, ("GET", "/"): 200, ("POST", "/api/jobs/none/commands"): 404},
    READ: {("GET", "/api/jobs"): 200, ("GET", "/api/jobs/none"): 404, ("GET", "/metrics"): 200,
           ("GET", "/docs"): 200, ("GET", "/"): 200, ("POST", "/api/jobs/none/commands"): 403},
    WORKER: {case: 403 for case in HTTP_CASES},
    "wrong": {case: 401 for case in HTTP_CASES},
    None: {case: 401 for case in HTTP_CASES},
}


@pytest.fixture
def anon(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize("token", list(ALLOWED), ids=["control", "read", "worker", "wrong", "none"])
@pytest.mark.parametrize("method,path", HTTP_CASES)
def test_http_matrix(anon, token, method, path):
    headers = auth(token) if token else {}
    body = {"type": "average_now"} if method == "POST" else None
    out = anon.request(method, path, headers=headers, json=body)
    assert out.status_code == ALLOWED[token][(method, path)], out.text


@pytest.mark.parametrize("how", ["header", "query", "cookie"])
def test_token_sources(anon, how):
    if how == "header":
        out = anon.get("/api/jobs", headers=auth(READ))
    elif how == "query":
        out = anon.get(f"/api/jobs?token={READ}")
    else:
        anon.cookies.set("avgctl_token", READ)
        out = anon.get("/api/jobs")
    assert out.status_code == 200


def test_dashboard_login_sets_cookie_and_drops_token_from_url(anon):
    out = anon.get(f"/?token={READ}", follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/"
    cookie = out.headers["set-cookie"]
    assert f"avgctl_token={READ}" in cookie and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert anon.get("/api/jobs").status_code == 200  # the client kept the cookie
    assert anon.get("/?token=wrong", follow_redirects=False).status_code == 401


@pytest.mark.parametrize(
    "path,token,status",
    [
        ("/ws/worker", None, 401),
        ("/ws/worker", "wrong", 401),
        ("/ws/worker", READ, 403),
        ("/ws/jobs/x", None, 401),
        ("/ws/jobs/x", WORKER, 403),
    ],
)
def test_websocket_matrix(anon, path, token, status):
    with pytest.raises(WebSocketDenialResponse) as info:
        with anon.websocket_connect(path, headers=auth(token) if token else {}):
            pass
    assert info.value.status_code == status
