"""A browser page on another origin gets nothing; tokens don't leak; nothing loads from elsewhere;
slow clients are cut.

Against real servers: uvicorn in a thread for the origin and header checks, ``avgctl serve``
subprocesses for what only the command sets up (its log, its flags, its HTTP protocol), Debian's
Chromium for what a hostile page can do.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import select
import socket
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest
import tomllib
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from avgctl.server.cli.main import build_parser
from avgctl.server.cli.serve import serve_settings
from tests.support.fakes import FakeJob
from tests.support.frames import hello
from tests.support.polling import wait_for
from tests.support.processes import ServerProcess
from tests.support.servers import CONTROL, READ, WORKER, auth, make_settings, running_server

ROOT = Path(__file__).resolve().parents[2]
JOB = "hardening-job"
ALLOWED = "https://dash.example.org"
HOSTILE = "http://127.0.0.1:8702"  # another port of the dashboard's host: the same *site*


def handshake(base: str, path: str, *, origin: str | None = None, cookie: str | None = None, token: str | None = None):
    """The status a websocket handshake to ``base + path`` gets (101 when accepted), and the
    refusal's body."""
    headers = {}
    if cookie:
        headers["Cookie"] = f"avgctl_token={cookie}"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        with connect(base.replace("http", "ws", 1) + path, origin=origin, additional_headers=headers, open_timeout=10):
            return 101, ""
    except InvalidStatus as err:
        return err.response.status_code, err.response.body.decode(errors="replace")


@pytest.fixture
def server(tmp_path):
    with running_server(make_settings(tmp_path, allowed_origins=[ALLOWED])) as srv:
        job = FakeJob(srv.url, job_id=JOB, world_size=1).start(streaming=False)
        try:
            yield srv
        finally:
            job.stop()


# --- a page on another origin gets nothing ------------------------------------------------------


def test_the_dashboard_stream_takes_the_cookie_only_from_its_own_or_an_allowed_origin(server):
    own = server.url
    cases = {
        "own origin, cookie": dict(origin=own, cookie=READ),
        "allowed origin, cookie": dict(origin=ALLOWED, cookie=READ),
        "another port, read cookie": dict(origin=HOSTILE, cookie=READ),
        "another port, control cookie": dict(origin=HOSTILE, cookie=CONTROL),
        "another port, token header": dict(origin=HOSTILE, token=READ),
        "sandboxed page": dict(origin="null", cookie=READ),
        "no origin, cookie alone": dict(cookie=READ),
        "no origin, token header": dict(token=READ),
    }
    got = {name: handshake(server.url, f"/ws/jobs/{JOB}", **how) for name, how in cases.items()}
    assert {name: status for name, (status, _) in got.items()} == {
        "own origin, cookie": 101,
        "allowed origin, cookie": 101,
        "another port, read cookie": 403,
        "another port, control cookie": 403,
        "another port, token header": 403,
        "sandboxed page": 403,
        "no origin, cookie alone": 403,
        "no origin, token header": 101,
    }
    assert "origin http://127.0.0.1:8702 is not allowed" in got["another port, read cookie"][1]
    assert "Authorization" in got["no origin, cookie alone"][1]


def test_the_worker_socket_refuses_browsers_and_takes_the_control_token_only_without_a_worker_token(tmp_path):
    with running_server(make_settings(tmp_path)) as srv:
        assert handshake(srv.url, "/ws/worker", token=WORKER)[0] == 101
        status, reason = handshake(srv.url, "/ws/worker", origin=srv.url, token=WORKER)
        assert status == 403 and "may not open /ws/worker" in reason  # even from the dashboard's own page
        assert handshake(srv.url, "/ws/worker", origin=HOSTILE, cookie=CONTROL)[0] == 403
        status, reason = handshake(srv.url, "/ws/worker", token=CONTROL)
        assert status == 403 and "worker token" in reason
    with running_server(make_settings(tmp_path, control_token_on_worker_socket=True)) as srv:
        assert handshake(srv.url, "/ws/worker", token=CONTROL)[0] == 101
    # The one-token setup (AVGCTL_TOKEN for server, workers and CLI): its control token serves workers.
    with running_server(make_settings(tmp_path, read_token=None, worker_token=None)) as srv:
        assert handshake(srv.url, "/ws/worker", token=CONTROL)[0] == 101
        assert handshake(srv.url, "/ws/worker", origin=HOSTILE, token=CONTROL)[0] == 403


def test_a_page_on_another_origin_cannot_command_with_the_cookie(server):
    cookie = {"Cookie": f"avgctl_token={CONTROL}"}
    post = f"{server.url}/api/jobs/{JOB}/commands"
    body = {"type": "average_now"}
    hostile = httpx.post(post, json=body, headers={**cookie, "Origin": HOSTILE})
    assert hostile.status_code == 403 and "not allowed" in hostile.json()["detail"]
    as_text = httpx.post(
        post, content=json.dumps(body), headers={**cookie, "Origin": HOSTILE, "Content-Type": "text/plain"}
    )
    assert as_text.status_code == 403  # a "simple" request needs no CORS preflight: refused all the same
    assert httpx.get(f"{server.url}/api/jobs/{JOB}/commands", headers=auth(READ)).json() == []
    # The dashboard's own page (its fetch sends its own Origin on a POST, none on a GET) still works.
    assert httpx.post(post, json=body, headers={**cookie, "Origin": server.url}).status_code == 202
    assert httpx.get(f"{server.url}/api/jobs/{JOB}", headers=cookie).status_code == 200


EVIL_PAGE = """<!doctype html><meta charset="utf-8"><title>not the dashboard</title><script>
const target = "%(target)s", results = {};
function done(key, value) { results[key] = value; window.results = results; }
const stream = new WebSocket(target.replace("http", "ws") + "/ws/jobs/%(job)s");
stream.onmessage = (e) => done("stream", "read: " + JSON.parse(e.data).kind);
stream.onclose = () => results.stream || done("stream", "closed");
const worker = new WebSocket(target.replace("http", "ws") + "/ws/worker");
worker.onopen = () => { worker.send(%(hello)s); setTimeout(() => done("worker", "registered"), 500); };
worker.onclose = () => results.worker || done("worker", "closed");
fetch(target + "/api/jobs/%(job)s/commands", {method: "POST", mode: "no-cors", credentials: "include",
  headers: {"Content-Type": "text/plain"}, body: JSON.stringify({type: "pause_training"})})
  .then(() => done("command", "sent"), () => done("command", "failed"));
</script>"""


@contextlib.contextmanager
def hostile_site(page: str):
    """An HTTP server on another port of 127.0.0.1 serving ``page`` at ``/``."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.mark.browser
def test_a_page_on_another_port_gets_nothing_with_the_dashboard_login(server):
    playwright_api = pytest.importorskip("playwright.sync_api")
    from tests.support.browser import launch_chromium, login

    evil = EVIL_PAGE % {"target": server.url, "job": JOB, "hello": json.dumps(hello(job_id="evil-job", world_size=1))}
    with playwright_api.sync_playwright() as p, hostile_site(evil) as evil_url:
        browser = launch_chromium(p)
        try:
            page = browser.new_context().new_page()
            login(page, server)  # the person's dashboard login: the cookie holds the control token
            page.wait_for_url(f"{server.url}/")
            page.goto(evil_url)
            page.wait_for_function("window.results && Object.keys(window.results).length === 3", timeout=15_000)
            results = page.evaluate("window.results")
        finally:
            browser.close()
    assert results == {"stream": "closed", "worker": "closed", "command": "sent"}  # no-cors: blind, and refused
    assert httpx.get(f"{server.url}/api/jobs/evil-job", headers=auth(READ)).status_code == 404
    assert httpx.get(f"{server.url}/api/jobs/{JOB}/commands", headers=auth(READ)).json() == []


# --- headers ---------------------------------------------------------------------------------------


def test_every_answer_forbids_framing_sniffing_and_referrers(server):
    answers = {
        "page": httpx.get(f"{server.url}/"),
        "script": httpx.get(f"{server.url}/app.js"),
        "vendor": httpx.get(f"{server.url}/vendor/uplot/uPlot.esm.js"),
        "health": httpx.get(f"{server.url}/api/health"),
        "refused": httpx.get(f"{server.url}/api/jobs"),
        "api": httpx.get(f"{server.url}/api/jobs", headers=auth(READ)),
        "docs": httpx.get(f"{server.url}/docs", headers=auth(READ)),
        "missing": httpx.get(f"{server.url}/nothing.js"),
    }
    for name, answer in answers.items():
        h = answer.headers
        assert h.get("x-frame-options") == "DENY", name
        assert h.get("x-content-type-options") == "nosniff", name
        assert h.get("referrer-policy") == "no-referrer", name
        csp = h.get("content-security-policy", "")
        assert "frame-ancestors 'none'" in csp and "default-src 'self'" in csp, name
        assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, name
    assert "script-src 'self';" in answers["page"].headers["content-security-policy"]


def is_secure(set_cookie: str) -> bool:
    return any(part.strip().lower() == "secure" for part in set_cookie.split(";"))


def test_the_login_cookie_is_secure_when_the_browser_came_over_tls(server):
    # uvicorn trusts X-Forwarded-Proto from 127.0.0.1 (its --forwarded-allow-ips default): a TLS proxy.
    tls = httpx.get(f"{server.url}/?token={READ}", headers={"X-Forwarded-Proto": "https"}, follow_redirects=False)
    plain = httpx.get(f"{server.url}/?token={READ}", follow_redirects=False)
    assert tls.status_code == plain.status_code == 303
    assert is_secure(tls.headers["set-cookie"])
    assert not is_secure(plain.headers["set-cookie"])  # else a plain-http browser would drop it


# --- tokens don't leak -----------------------------------------------------------------------------


def test_the_access_log_never_shows_a_token(tmp_path):
    log = tmp_path / "serve.log"
    args = ("--read-token", READ, "--log-level", "info")
    server = ServerProcess(tmp_path / "avgctl.db", args=args, env={"PYTHONUNBUFFERED": "1"}, log=log).start()
    try:
        urllib.request.urlopen(f"{server.base}/?token={CONTROL}", timeout=10).read()  # the login, redirected
        urllib.request.urlopen(f"{server.base}/api/jobs?x=1&token={READ}", timeout=10).read()
        with connect(f"{server.base.replace('http', 'ws', 1)}/ws/jobs/{JOB}?token={READ}", open_timeout=10):
            pass
        with pytest.raises(InvalidStatus):
            with connect(f"{server.base.replace('http', 'ws', 1)}/ws/worker?token=not-a-token-{READ}"):
                pass
        wait_for(lambda: log.read_text().count("token=REDACTED") >= 4, 10, what="the requests logged")
    finally:
        server.stop()
    text = log.read_text()
    assert CONTROL not in text and READ not in text, text
    assert "GET /?token=REDACTED" in text and "/api/jobs?x=1&token=REDACTED" in text


def test_tokens_can_come_from_files_and_stay_out_of_the_process_list(tmp_path):
    (tmp_path / "control").write_text(CONTROL + "\n")
    (tmp_path / "worker").write_text(WORKER)
    args = ("--control-token-file", str(tmp_path / "control"), "--worker-token-file", str(tmp_path / "worker"))
    server = ServerProcess(tmp_path / "avgctl.db", args=args, default_tokens=False).start()
    try:
        cmdline = Path(f"/proc/{server.proc.pid}/cmdline").read_bytes()
        assert CONTROL.encode() not in cmdline and WORKER.encode() not in cmdline
        assert server.api.get("/api/jobs") == []  # the control token from its file
        assert handshake(server.base, "/ws/worker", token=WORKER)[0] == 101
    finally:
        server.stop()


def test_the_demo_gives_its_server_tokens_outside_its_arguments(monkeypatch):
    from avgctl.server.cli.demo import DemoLaunch, serve_args, serve_env

    # A generated token may start with "-": through the environment it needs no quoting at all.
    argv, env = serve_args(DemoLaunch()), serve_env("-ctl_token", "--wrk")
    assert not any("token" in a for a in argv) and "-ctl_token" not in argv and "--wrk" not in argv
    for name in ("AVGCTL_CONTROL_TOKEN", "AVGCTL_WORKER_TOKEN"):
        monkeypatch.setenv(name, env[name])
    settings = serve_settings(build_parser().parse_args(argv))
    assert (settings.control_token, settings.worker_token) == ("-ctl_token", "--wrk")


# --- nothing loads from elsewhere ------------------------------------------------------------------


def test_the_api_docs_come_from_this_server_and_need_a_token(server):
    from avgctl.server.pages import SWAGGER_FILES

    assert httpx.get(f"{server.url}/docs").status_code == 401
    docs = httpx.get(f"{server.url}/docs", headers=auth(READ))
    assert docs.status_code == 200 and "/vendor/swagger-ui/swagger-ui-bundle.js" in docs.text
    assert "http" not in docs.text.replace(server.url, "")  # no other host named at all
    for name in SWAGGER_FILES:  # public, like uPlot's files: they hold no data
        assert httpx.get(f"{server.url}/vendor/swagger-ui/{name}").status_code == 200, name
    assert httpx.get(f"{server.url}/vendor/swagger-ui/package.json", headers=auth(READ)).status_code == 404
    assert httpx.get(f"{server.url}/redoc", headers=auth(READ)).status_code == 404  # it loads from a CDN


def test_a_wheel_carries_the_docs_files():
    from avgctl.server.pages import SWAGGER_FILES

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["avgctl.web"]
    for name in SWAGGER_FILES:
        assert f"node_modules/swagger-ui-dist/{name}" in data
        assert (ROOT / "web" / "node_modules" / "swagger-ui-dist" / name).is_file(), "run npm ci in web/"
    assert "swagger-ui-dist" in json.loads((ROOT / "web" / "package.json").read_text())["dependencies"]


# --- slow clients are cut --------------------------------------------------------------------------

HEAD_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def slow_server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slow")
    server = ServerProcess(
        tmp / "avgctl.db", args=("--header-timeout", str(HEAD_TIMEOUT), "--body-timeout", str(HEAD_TIMEOUT))
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def partial(port: int, data: bytes) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(data)
    return s


def read_until_closed(s: socket.socket) -> bytes:
    """What the server sends until it closes the connection (the socket's timeout bounds the wait)."""
    received = b""
    with s:
        while chunk := s.recv(4096):
            received += chunk
    return received


def test_partial_request_heads_are_cut_and_the_server_keeps_answering(slow_server):
    port = slow_server.port
    with connect(f"ws://127.0.0.1:{port}/ws/worker", additional_headers=auth(WORKER), open_timeout=10) as rank:
        rank.send(hello(job_id="slow-job", world_size=1))
        wait_for(lambda: slow_server.api.try_get("/api/jobs/slow-job"), what="the rank's hello")
        start = time.monotonic()
        held = [partial(port, b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: ") for _ in range(50)]
        trickle = partial(port, b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        assert slow_server.api.get("/api/health") == {"status": "ok"}  # answered meanwhile
        # One that keeps sending a byte every 0.1 s, each cancelling uvicorn's keep-alive timer,
        # until the server answers (then it stops, rather than write into a closed connection).
        for _ in range(int(HEAD_TIMEOUT * 50)):
            if select.select([trickle], [], [], 0.1)[0]:
                break
            trickle.sendall(b"a")
        answers = [read_until_closed(s) for s in [*held, trickle]]
        elapsed = time.monotonic() - start
        assert all(a.startswith(b"HTTP/1.1 408") for a in answers), {a[:40] for a in answers}
        assert elapsed < HEAD_TIMEOUT + 8
        # A websocket outlives the head deadline: it had its head in time.
        assert slow_server.api.get("/api/jobs/slow-job")["ranks"][0]["connected"]
        assert rank.ping().wait(10)


def test_a_stalled_request_body_is_answered_408(slow_server):
    head = (
        f"POST /api/jobs/slow-job/commands HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {CONTROL}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    s = partial(slow_server.port, head.encode() + b'{"type": ')
    start = time.monotonic()
    answer = read_until_closed(s)
    assert answer.startswith(b"HTTP/1.1 408") and b"stalled" in answer, answer[:200]
    assert time.monotonic() - start < HEAD_TIMEOUT + 8
    assert slow_server.api.get("/api/health") == {"status": "ok"}
