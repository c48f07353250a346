"""The dashboard knows its token's role (GET /api/session): a read token's page offers no control
that could only fail, a control token's offers them all. Debian's Chromium, a real server, fake ranks."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import expect

from avgctl.worker import control_state as cs
from tests.support.browser import login
from tests.support.fakes import FakeJob
from tests.support.servers import CONTROL, READ, WORKER, auth

JOB = "roles-job"
TITLE = "Needs a control token: this page holds a read token, which may look but not send commands."

# Every control of the job page that is on (enabled and shown); hidden ones (resume while running)
# count too once shown, so both are checked.
LIVE_CONTROLS = """() => [...document.querySelectorAll('#controls button, #controls input')]
  .filter((node) => !node.disabled && node.checkVisibility())
  .map((node) => node.id)"""
ALL_CONTROLS = "() => [...document.querySelectorAll('#controls button, #controls input')].map((n) => n.id)"


@pytest.fixture
def tiered(server) -> Iterator[FakeJob]:
    # Hierarchical, so the page also builds its per-group inputs (after the role is known).
    job = FakeJob(server.url, job_id=JOB, state=cs.hierarchical_state((2, 4), (2, 4), 0)).start()
    try:
        yield job
    finally:
        job.stop()
    assert job.error is None, job.error


def _open(page, server, token: str) -> None:
    login(page, server, token=token, route=f"#/jobs/{JOB}")
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
    expect(page.locator("#hierarchy-input-4")).to_be_attached()  # the control state arrived


def test_session_names_the_role_of_the_presented_token_only(server):
    assert httpx.get(f"{server.url}/api/session", headers=auth(READ)).json() == {"role": "read"}
    assert httpx.get(f"{server.url}/api/session", headers=auth(CONTROL)).json() == {"role": "control"}
    assert httpx.get(f"{server.url}/api/session", headers=auth(WORKER)).status_code == 403
    assert httpx.get(f"{server.url}/api/session").status_code == 401


@pytest.mark.browser
def test_a_read_token_page_offers_no_control(server, tiered, rest, page):
    _open(page, server, READ)
    expect(page.locator("#hierarchy-input-4")).to_be_disabled()
    expect(page.locator("#controls-read-only")).to_be_visible()
    expect(page.locator("#controls-read-only")).to_contain_text("control token")
    assert page.evaluate(LIVE_CONTROLS) == []
    every = page.evaluate(ALL_CONTROLS)
    assert {"set-period", "average-now", "set-hierarchy", "autopilot-on", "resume-averaging"} <= set(every)
    for node_id in every:
        node = page.locator(f"#{node_id}")
        expect(node).to_be_disabled()
        expect(node).to_have_attribute("title", TITLE)
    assert page.console.errors == []
    # The page's own cookie cannot send one either: the server is the one that refuses.
    status = page.evaluate(
        f"""() => fetch('/api/jobs/{JOB}/commands', {{method: 'POST', headers: {{'Content-Type': 'application/json'}},
          body: JSON.stringify({{type: 'average_now'}})}}).then((r) => r.status)"""
    )
    assert status == 403
    assert rest.get(f"/api/jobs/{JOB}/commands").json() == []
    assert [e for e in page.console.errors if "status of 403" not in e] == []  # Chromium logs the refusal


@pytest.mark.browser
def test_a_control_token_page_offers_every_control(server, tiered, rest, page):
    _open(page, server, CONTROL)
    expect(page.locator("#hierarchy-input-4")).to_be_enabled()
    expect(page.locator("#controls-read-only")).to_be_hidden()
    live = set(page.evaluate(LIVE_CONTROLS))
    shown = {"set-period", "period-input", "pause-averaging", "pause-training", "average-now", "set-hierarchy"}
    assert shown | {"hierarchy-input-2", "autopilot-on", "autopilot-off", "autopilot-target"} <= live
    page.locator("#average-now").click()
    expect(page.locator('#command-log tr[data-status="applied"]')).to_have_count(1)
    assert [c["type"] for c in rest.get(f"/api/jobs/{JOB}/commands").json()] == ["average_now"]
    assert page.console.errors == []
