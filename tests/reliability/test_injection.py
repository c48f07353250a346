"""SQL, path and HTML/JS injection through job ids, names and worker-supplied text: refused by
the JobId pattern (4xx, or a 1008 close) or stored and shown verbatim, never executed."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse

import pytest
from websockets.sync.client import connect

from avgctl.protocol import AveragerConfig, CommandAck, ControlView, Hello, MetricsBatch, RoundRecord, StepRecord
from tests.support.browser import launch_chromium
from tests.support.frames import close_of
from tests.support.processes import CONTROL, WORKER, ServerProcess, wait_for

XSS = '<img src=x onerror="window.__pwned=1">'
SCRIPT = "<script>window.__pwned=2</script>"
REFUSED_IDS = [
    "'; DROP TABLE jobs;--",
    "1 OR 1=1",
    'x" OR "1"="1',
    "../../etc/passwd",
    "..\\..\\windows",
    "a/b",
    "<script>alert(1)</script>",
    "javascript:alert(1)",  # has "(" and ")" and ":" -> refused for the parentheses
    "job\x00null",
    "job\nnewline",
    "%2e%2e%2f",
    "jöb",
    "a" * 129,
    "..",  # dots only: browsers rewrite /api/jobs/.. so the dashboard could never open it
    ".",
    "-",
]
# Odd but inside the JobId pattern: stored and returned verbatim.
ACCEPTED_IDS = ["a..b", "index.html", "-x", "+:@_", "job.js", "x@y:z+1", "NULL", "0", "_"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = ServerProcess(tmp_path_factory.mktemp("inject") / "inject.db").start()
    yield srv
    srv.stop()


def hello(job_id: str, rank: int = 0, world_size: int = 1, host: str = "h") -> str:
    return (
        Hello(
            job_id="placeholder",
            rank=rank,
            world_size=world_size,
            host=host,
            pid=4242 + rank,
            job_secret="injection-job-secret",
            config=AveragerConfig(kind="periodic", period=4, warmup_steps=0),
            control=ControlView(period=4, warmup_steps=0),
        )
        .model_dump_json()
        .replace('"placeholder"', json.dumps(job_id))
    )


def open_ws(server):
    url = server.base.replace("http", "ws", 1) + "/ws/worker"
    return connect(url, additional_headers={"Authorization": f"Bearer {WORKER}"}, max_size=None)


def status_of(server, path: str) -> int:
    try:
        server.api.get(path)
        return 200
    except urllib.error.HTTPError as err:
        return err.code


@pytest.mark.parametrize("job_id", REFUSED_IDS, ids=range(len(REFUSED_IDS)))
def test_injected_job_ids_are_refused(server, job_id):
    before = server.api.get("/api/jobs")
    with open_ws(server) as ws:
        ws.send(hello(job_id))
        code, reason = close_of(ws)
    assert code == 1008 and "job_id" in reason
    quoted = urllib.parse.quote(job_id, safe="")
    for path in (f"/api/jobs/{quoted}", f"/api/jobs/{quoted}/commands", f"/api/jobs/{quoted}/metrics"):
        assert status_of(server, path) in (404, 422), path
    try:
        server.api.command(quoted, {"type": "average_now"})
        raise AssertionError("a command to an injected id was accepted")
    except urllib.error.HTTPError as err:
        assert err.code in (404, 422)
    assert server.api.get("/api/jobs") == before  # nothing stored, nothing dropped


def test_injection_through_query_parameters(server):
    with open_ws(server) as ws:
        ws.send(hello("inject-q"))
        ws.send(MetricsBatch(steps=[StepRecord(step=1, time=0.0, loss=1.0)]).model_dump_json())
        wait_for(lambda: (server.api.try_get("/api/jobs/inject-q") or {}).get("step") == 1, 10, what="stored")
    for query in (
        "names=loss'--",
        "names=" + urllib.parse.quote("loss) UNION SELECT * FROM commands--"),
        "names=" + urllib.parse.quote(SCRIPT),
    ):
        out = server.api.get(f"/api/jobs/inject-q/metrics?{query}")
        assert [set(s) for s in out["steps"]] == [{"rank", "step"}]  # an unknown name selects nothing
    for query in (
        "ranks=" + urllib.parse.quote("0) OR 1=1--"),
        "since_step=" + urllib.parse.quote("0; DELETE FROM steps"),
    ):
        assert status_of(server, f"/api/jobs/inject-q/metrics?{query}") == 422
    assert len(server.api.get("/api/jobs/inject-q/metrics")["steps"]) == 1


@pytest.mark.parametrize("job_id", ACCEPTED_IDS)
def test_odd_but_valid_ids_round_trip_verbatim(server, job_id):
    with open_ws(server) as ws:
        ws.send(hello(job_id, host=XSS))
        quoted = urllib.parse.quote(job_id, safe="")
        detail = wait_for(lambda: server.api.try_get(f"/api/jobs/{quoted}"), 10, what="job stored")
    assert detail["id"] == job_id and detail["ranks"][0]["host"] == XSS
    assert job_id in {j["id"] for j in server.api.get("/api/jobs")}


# ------------------------------------------------------------------------------ the dashboard


@pytest.mark.browser
def test_dashboard_shows_injected_text_inertly(server):
    playwright_api = pytest.importorskip("playwright.sync_api")
    job = "inject-web"
    layers = [(SCRIPT, 0.5), (XSS, 0.25)]
    with open_ws(server) as ws:
        ws.send(hello(job, world_size=1, host=XSS))
        steps = [
            StepRecord(step=s, time=0.0, step_time=0.01, loss=1.0, scalars={XSS: 1.0, SCRIPT: 2.0}) for s in range(1, 9)
        ]
        rounds = [
            RoundRecord(
                step=s,
                group_size=1,
                divergence=0.1,
                relative_divergence=0.01,
                divergence_mean=0.1,
                divergence_max=0.1,
                relative_mean=0.01,
                relative_max=0.01,
                seconds=0.0,
                bytes=8,
                exact=True,
                top_layers=layers,
            )
            for s in (4, 8)
        ]
        ws.send(MetricsBatch(steps=steps, rounds=rounds).model_dump_json())
        wait_for(lambda: (server.api.try_get(f"/api/jobs/{job}") or {}).get("step") == 8, 10, what="stored")
        command = server.api.command(job, {"type": "set_period", "period": 3})
        delivered = json.loads(ws.recv(timeout=10))
        assert delivered["id"] == command["id"]
        ws.send(CommandAck(command_id=command["id"], status="rejected", reason=XSS + SCRIPT).model_dump_json())
        wait_for(lambda: server.api.get(f"/api/jobs/{job}/commands/{command['id']}")["status"] == "rejected", 10)

        with playwright_api.sync_playwright() as p:
            browser = launch_chromium(p)
            try:
                page = browser.new_page()
                dialogs: list[str] = []
                page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
                page.goto(f"{server.base}/?token={CONTROL}#/jobs/{job}")
                expect = playwright_api.expect
                expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected", timeout=15_000)
                host_cell = page.locator("#rank-table tbody tr td").nth(1)
                expect(host_cell).to_have_text(XSS, timeout=15_000)  # shown as text
                expect(page.locator("body")).to_contain_text("rejected", timeout=15_000)
                body = page.locator("body").inner_text()
                assert XSS + SCRIPT in body  # the reason, verbatim
                assert page.evaluate("window.__pwned") is None, "injected markup ran"
                assert (
                    page.locator("img[src=x]").count() == 0
                    and page.locator("script:not([src]):not([type])").count() == 0
                )
                assert dialogs == []
            finally:
                browser.close()
