"""A DiLoCo job's page in Debian's Chromium against a real server fed by fake ranks: its outer lr is
shown and set from the controls (control token only), its rounds' pseudo-gradient and outer lr are
charted; a periodic job's page shows none of it."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from playwright.sync_api import expect

from avgctl.worker import control_state as cs
from tests.support.browser import login
from tests.support.fakes import FakeJob
from tests.support.servers import READ

pytestmark = pytest.mark.browser

SOME_POINTS = re.compile(r"^[1-9]\d*$")
DILOCO, FLAT = "web-diloco", "web-flat"
DILOCO_PARTS = ("#outer-lr-controls", "#figure-pseudo-gradient", "#figure-outer-lr")


@pytest.fixture
def jobs(server) -> Iterator[None]:
    started = [
        FakeJob(server.url, job_id=DILOCO, world_size=2, state=cs.diloco_state(4, 0), outer_lr=0.7).start(),
        FakeJob(server.url, job_id=FLAT, world_size=2).start(),
    ]
    try:
        yield
    finally:
        for job in started:
            job.stop()
    assert [job.error for job in started] == [None, None]


def _open(page, server, job_id: str, token: str | None = None) -> None:
    login(page, server, **({"token": token} if token else {}), route=f"#/jobs/{job_id}")
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
    expect(page.locator("#job-averager")).to_have_text("diloco" if job_id == DILOCO else "periodic")


def _lasts(page, chart: str) -> dict:
    return json.loads(page.locator(chart).get_attribute("data-lasts") or "{}")


def test_a_diloco_job_shows_and_sets_its_outer_lr_and_charts_its_pseudo_gradient(server, jobs, rest, page):
    _open(page, server, DILOCO)
    for part in DILOCO_PARTS:
        expect(page.locator(part)).to_be_visible()
    expect(page.locator("#outer-lr-value")).to_have_text("0.7000")  # the optimizer's own, from its rounds
    for chart in ("#chart-pseudo-gradient", "#chart-outer-lr"):
        expect(page.locator(chart)).to_have_attribute("data-points", SOME_POINTS)
    expect(page.locator("#chart-pseudo-gradient")).to_have_attribute("data-series", "2")  # ||Delta||, relative
    norm = _lasts(page, "#chart-pseudo-gradient")
    assert 0 < norm["‖Δ‖ / ‖θ_g‖"] < norm["‖Δ‖"] <= 1

    for bad in ("0", "-1", "abc", "Infinity", "2e6"):
        page.locator("#outer-lr-input").fill(bad)
        page.locator("#set-outer-lr").click()
        expect(page.locator("#outer-lr-error")).to_contain_text("finite number above 0 and at most 1000000")
        expect(page.locator("#outer-lr-input")).to_have_attribute("aria-invalid", "true")
    assert rest.get(f"/api/jobs/{DILOCO}/commands").json() == []  # none of them was sent

    page.locator("#outer-lr-input").fill("0.35")
    page.locator("#outer-lr-input").press("Enter")
    row = page.locator("#command-log tbody tr").first
    expect(row).to_have_attribute("data-status", "applied")
    expect(row).to_contain_text("set outer lr to 0.35")
    expect(page.locator("#outer-lr-value")).to_have_text("0.3500")
    expect(page.locator("#outer-lr-error")).to_be_hidden()
    assert [c["command"] for c in rest.get(f"/api/jobs/{DILOCO}/commands").json()] == [
        {"type": "set_outer_lr", "lr": 0.35}
    ]
    chart = page.locator("#chart-outer-lr")
    expect(chart).to_have_attribute("data-lasts", json.dumps({"outer lr": 0.35}, separators=(",", ":")))
    expect(chart).to_have_attribute("data-marker-labels", re.compile(r"outer lr 0\.35"))
    assert page.console.errors == []


def test_a_periodic_job_shows_no_outer_lr_and_no_pseudo_gradient(server, jobs, page):
    _open(page, server, DILOCO)  # then to the other job, in the same page: what DiLoCo showed goes
    expect(page.locator("#outer-lr-controls")).to_be_visible()
    page.locator("#home-link").click()
    page.locator(f'#job-table tr[data-job-id="{FLAT}"]').get_by_role("link", name=FLAT).click()
    expect(page.locator("#job-averager")).to_have_text("periodic")
    expect(page.locator("#chart-divergence")).to_have_attribute("data-points", SOME_POINTS)
    for part in DILOCO_PARTS:
        expect(page.locator(part)).to_be_hidden()
    expect(page.locator("#chart-pseudo-gradient .uplot")).to_have_count(0)  # nothing drawn for it
    assert page.locator("#chart-pseudo-gradient").get_attribute("data-points") is None
    assert page.console.errors == []


def test_a_read_token_sees_the_outer_lr_but_cannot_set_it(server, jobs, rest, page):
    _open(page, server, DILOCO, token=READ)
    expect(page.locator("#outer-lr-value")).to_have_text("0.7000")
    for control in ("#outer-lr-input", "#set-outer-lr"):
        expect(page.locator(control)).to_be_disabled()
        expect(page.locator(control)).to_have_attribute("title", re.compile("Needs a control token"))
    assert rest.get(f"/api/jobs/{DILOCO}/commands").json() == []
    assert page.console.errors == []
