"""Who may do what: control (everything), read (GETs, dashboards), worker (ingest only)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from avgctl.server.app import create_app
from tests.support.servers import CONTROL, READ, WORKER, auth

HTTP_CASES = [
    ("GET", "/api/jobs"),
    ("GET", "/api/jobs/none"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/openapi.json"),
    ("POST", "/api/jobs/none/commands"),
]
# (token, method, path) -> expected status; 404 means "allowed" for the unknown job.
ALLOWED = {
    CONTROL: {
        ("GET", "/api/jobs"): 200,
        ("GET", "/api/jobs/none"): 404,
        ("GET", "/metrics"): 200,
        ("GET", "/docs"): 200,
        ("GET", "/openapi.json"): 200,
        ("POST", "/api/jobs/none/commands"): 404,
    },
    READ: {
        ("GET", "/api/jobs"): 200,
        ("GET", "/api/jobs/none"): 404,
        ("GET", "/metrics"): 200,
        ("GET", "/docs"): 200,
        ("GET", "/openapi.json"): 200,
        ("POST", "/api/jobs/none/commands"): 403,
    },
    WORKER: {case: 403 for case in HTTP_CASES},
    "wrong": {case: 401 for case in HTTP_CASES},
    None: {case: 401 for case in HTTP_CASES},
}
TOKENS = pytest.mark.parametrize("token", list(ALLOWED), ids=["control", "read", "worker", "wrong", "none"])
# The dashboard's own files hold no data: anyone may load them, so the page can explain a bad token.
PAGE_FILES = [
    "/",
    "/index.html",
    "/app.js",
    "/job.js",
    "/style.css",
    "/vendor/uplot/uPlot.esm.js",
    "/vendor/uplot/uPlot.min.css",
]
# Everything else in web/ is not served, with or without a token.
NOT_SERVED = [
    "/__init__.py",
    "/package.json",
    "/package-lock.json",
    "/node_modules/uplot/package.json",
    "/node_modules/uplot/dist/uPlot.esm.js",
    "/vendor/uplot/uPlot.d.ts",
    "/vendor/uplot/../package.json",
    "/nothing.js",
    "/web/app.js",
]


@pytest.fixture
def anon(settings):
    with TestClient(create_app(settings)) as c:
        yield c


@TOKENS
@pytest.mark.parametrize("method,path", HTTP_CASES)
def test_http_matrix(anon, token, method, path):
    headers = auth(token) if token else {}
    body = {"type": "average_now"} if method == "POST" else None
    out = anon.request(method, path, headers=headers, json=body)
    assert out.status_code == ALLOWED[token][(method, path)], out.text


@TOKENS
@pytest.mark.parametrize("path", PAGE_FILES)
def test_page_files_need_no_token(anon, token, path):
    out = anon.get(path, headers=auth(token) if token else {})
    assert out.status_code == 200, out.text
    assert "set-cookie" not in out.headers
    kind = "text/html" if path in ("/", "/index.html") else "text/css" if path.endswith(".css") else "javascript"
    assert kind in out.headers["content-type"]


@pytest.mark.parametrize("path", NOT_SERVED)
def test_only_the_dashboard_files_are_served(anon, path):
    assert anon.get(path, headers=auth(CONTROL)).status_code == 404
    assert anon.get(path).status_code in (401, 404)  # never the file


@pytest.mark.parametrize(
    "path", ["/api", "/api/", "/api/jobs/", "/ws/jobs/x", "/metrics/", "/redoc", "/docs/oauth2-redirect"]
)
def test_everything_else_is_guarded(anon, path):
    assert anon.get(path).status_code == 401
    assert anon.post("/", json={}).status_code == 401  # only GET/HEAD of the page is open


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


@pytest.mark.parametrize("token", ["wrong", WORKER])
def test_dashboard_login_with_another_token_sets_no_cookie(anon, token):
    out = anon.get(f"/?token={token}&x=1", follow_redirects=False)
    assert out.status_code == 303 and out.headers["location"] == "/?x=1"  # the token leaves the URL
    assert "set-cookie" not in out.headers
    page = anon.get(out.headers["location"])
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert anon.get("/api/jobs").status_code == 401


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
