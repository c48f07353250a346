"""The dashboard in Debian's Chromium against a real avgctl server fed by fake ranks."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from playwright.sync_api import expect

from avgctl.protocol.bounds import MAX_PERIOD
from avgctl.worker import control_state as cs
from tests.support.browser import login
from tests.support.fakes import FakeJob
from tests.support.polling import wait_for
from tests.support.servers import ServerThread, auth, make_settings

pytestmark = pytest.mark.browser

SOME_POINTS = re.compile(r"^[1-9]\d*$")
CHARTS = ("#chart-loss", "#chart-divergence", "#chart-drift", "#chart-period", "#chart-throughput")


def open_job(page, server, job_id: str = "web-job") -> None:
    login(page, server, route=f"#/jobs/{job_id}")
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")


def test_pages_load_without_console_errors(server, fake_job, page):
    login(page, server)
    row = page.locator('#job-table tr[data-job-id="web-job"]')
    expect(row).to_contain_text("running")
    expect(row.locator("td").nth(2)).to_have_text("4")  # world size
    expect(row.locator("td").nth(7)).to_have_text("0.1300")  # divergence of the latest round: mean
    expect(row.locator("td").nth(8)).to_have_text("0.1600")  # and max
    expect(row.locator("td").nth(9)).to_have_text(re.compile(r"^\d+ s ago$"))  # last seen
    row.get_by_role("link", name="web-job").click()
    expect(page).to_have_url(re.compile(r"#/jobs/web-job$"))
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
    for chart in CHARTS:
        expect(page.locator(chart)).to_have_attribute("data-points", SOME_POINTS)
    expect(page.locator("#rank-table tbody tr")).to_have_count(4)
    expect(page.locator("#job-period")).to_have_text("4")
    page.locator("#home-link").click()
    expect(page.locator('#job-table tr[data-job-id="web-job"]')).to_be_visible()
    assert page.console.errors == []


def test_charts_receive_live_data(server, page):
    job = FakeJob(server.url).start(streaming=False)  # the job exists (hello) but has no metrics yet
    try:
        open_job(page, server)
        expect(page.locator("#rank-table tbody tr")).to_have_count(4)
        assert page.locator("#chart-loss").get_attribute("data-points") in (None, "0")
        job.streaming.set()
        for chart in CHARTS:
            expect(page.locator(chart)).to_have_attribute("data-points", SOME_POINTS)
        expect(page.locator("#chart-loss")).to_have_attribute("data-series", "4")
        expect(page.locator("#chart-divergence")).to_have_attribute("data-series", "6")  # 4 ranks + mean + max
        first = int(page.locator("#job-step").inner_text())
        expect(page.locator("#job-step")).not_to_have_text(str(first))  # the step keeps moving
        page.locator("#divergence-relative").check()
        expect(page.locator("#chart-divergence")).to_have_attribute("data-points", SOME_POINTS)
        assert page.console.errors == []
    finally:
        job.stop()
    assert job.error is None


@pytest.mark.parametrize("thinning", ["none", "live", "snapshot"])
def test_averaging_share_does_not_depend_on_thinning(tmp_path, thinning, page):
    # Fake ranks: 100 steps/s each, 10 ms a step, a 2-ms round every 4 steps: a share of 5%.
    # "live": 1 step record per rank per tick instead of 5; "snapshot": the page opens on a
    # history of 400 steps with only the last 50 in full.
    (tmp_path / "thin").mkdir()
    overrides = {"live": dict(live_steps=20), "snapshot": dict(snapshot_records=100)}.get(thinning, {})
    srv = ServerThread(make_settings(tmp_path / "thin", port=0, **overrides)).start()
    job = FakeJob(srv.url).start(streaming=thinning == "snapshot")
    try:
        if thinning == "snapshot":
            wait_for(lambda: job.step >= 400, 30, what="400 steps")
            job.streaming.clear()
            stored = lambda: httpx.get(f"{srv.url}/api/jobs/web-job", headers=auth()).json()["step"]  # noqa: E731
            wait_for(lambda: stored() >= job.step, 10, what="the steps stored")
        open_job(page, srv)
        if thinning != "snapshot":  # there, the chart shows the snapshot alone
            job.streaming.set()
        chart = page.locator("#chart-throughput")
        expect(chart).to_have_attribute("data-points", SOME_POINTS)

        def share() -> float | None:
            return json.loads(chart.get_attribute("data-medians") or "{}").get("averaging share")

        wait_for(lambda: (share() or 0) > 0 and job.step >= 200, 20, what="a share over 200 steps")
        assert share() == pytest.approx(0.05, rel=0.2)  # unweighted, thinning multiplies it (2.5x live)
        assert page.console.errors == []
    finally:
        job.stop()
        srv.stop()
    assert job.error is None


@pytest.mark.parametrize("bad", ["0", "-3", "2.5", "abc", "", str(MAX_PERIOD + 1)])
def test_bad_period_is_explained_and_not_sent(server, fake_job, rest, bad, page):
    open_job(page, server)
    page.locator("#period-input").fill(bad)
    page.locator("#set-period").click()
    error = page.locator("#period-error")
    expect(error).to_be_visible()
    expect(error).to_contain_text("whole number of steps")
    expect(error).to_contain_text(f"from 1 to {MAX_PERIOD}")  # the bound the page read from GET /api/limits
    expect(page.locator("#period-input")).to_have_attribute("aria-invalid", "true")
    # A valid click afterwards is the proof that clicks do reach the server; before it, none did.
    assert rest.get("/api/jobs/web-job/commands").json() == []
    page.locator("#pause-averaging").click()
    expect(page.locator("#command-log tbody tr")).to_have_count(1)
    assert [c["type"] for c in rest.get("/api/jobs/web-job/commands").json()] == ["pause_averaging"]
    assert page.console.errors == []


def test_set_period_goes_from_pending_to_applied(server, fake_job, rest, page):
    open_job(page, server)
    page.locator("#period-input").fill("8")
    page.locator("#set-period").click()
    row = page.locator("#command-log tbody tr").first
    expect(row).to_contain_text("set period to 8")
    expect(row).to_have_attribute("data-status", "applied")
    expect(row).to_contain_text(re.compile(r"applied at step \d+"))
    commands = rest.get("/api/jobs/web-job/commands").json()
    assert [(c["type"], c["status"]) for c in commands] == [("set_period", "applied")]
    assert f"applied at step {commands[0]['applied_step']}" in row.inner_text()
    expect(page.locator("#job-period")).to_have_text("8")
    expect(page.locator("#chart-period")).to_have_attribute("data-markers", "1")
    expect(page.locator("#period-error")).to_be_hidden()
    assert page.console.errors == []


def test_pause_and_resume_buttons_follow_the_job(server, fake_job, page):
    open_job(page, server)
    page.get_by_role("button", name="Pause averaging").click()
    expect(page.locator("#resume-averaging")).to_be_visible()
    expect(page.locator("#pause-averaging")).to_be_hidden()
    expect(page.locator("#job-averaging")).to_have_text("paused")
    page.get_by_role("button", name="Resume averaging").click()
    expect(page.locator("#pause-averaging")).to_be_visible()
    expect(page.locator('#command-log tbody tr[data-status="applied"]')).to_have_count(2)
    assert page.console.errors == []


def test_hierarchy_periods_must_grow_with_group_size(server, rest, page):
    state = cs.hierarchical_state(periods=(2, 8), group_sizes=(2, 4), warmup_steps=0)
    job = FakeJob(server.url, job_id="tree", world_size=4, state=state).start()
    try:
        open_job(page, server, "tree")
        expect(page.locator("#hierarchy-controls")).to_be_visible()
        page.locator("#hierarchy-input-2").fill("8")
        page.locator("#hierarchy-input-4").fill("4")
        page.locator("#set-hierarchy").click()
        expect(page.locator("#hierarchy-error")).to_contain_text("grow with the group size")
        assert rest.get("/api/jobs/tree/commands").json() == []
        page.locator("#hierarchy-input-2").fill("4")
        page.locator("#hierarchy-input-4").fill("16")
        page.locator("#set-hierarchy").click()
        expect(page.locator('#command-log tbody tr[data-status="applied"]')).to_contain_text("groups of 4: 16")
        expect(page.locator("#job-period")).to_have_text("16")
        assert page.console.errors == []
    finally:
        job.stop()
    assert job.error is None


@pytest.mark.parametrize("token", [None, "wrong-token"])
def test_missing_or_wrong_token_is_explained(server, fake_job, token, page):
    page.goto(server.url + "/" if token is None else f"{server.url}/?token={token}")
    expect(page.locator("#error")).to_contain_text("Missing or wrong token")
    expect(page.locator("#error")).to_contain_text("?token=")


def test_connection_state_follows_the_server(server, fake_job, settings, page):
    open_job(page, server)
    expect(page.locator("#chart-loss")).to_have_attribute("data-points", SOME_POINTS)
    port = server.port
    server.stop()
    expect(page.locator("#connection-state")).to_have_attribute("data-state", "reconnecting")
    expect(page.locator("#connection-state")).to_contain_text("reconnecting")
    restarted = ServerThread(settings.model_copy(update={"port": port})).start()
    try:
        expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
        expect(page.locator("#chart-loss")).to_have_attribute("data-points", SOME_POINTS)  # from the new snapshot
    finally:
        restarted.stop()


def test_autopilot_shows_its_state_proposals_and_reasons(server, fake_job, rest, page):
    # Relative divergence 0.01 per round of 4 steps: delta 1e-4, growth 2.5e-5/step. A budget of
    # 2.5e-5 lasts one step, so the autopilot halves the period (its largest step) and says why;
    # it keeps halving down to 1, where it reports that averaging dominates (communication-bound).
    login(page, server, route=f"#/jobs/{fake_job.job_id}")
    page.fill("#autopilot-target", "0.000025")
    page.click("#autopilot-on")
    expect(page.locator("#autopilot-state")).to_contain_text("target 0.000025")
    expect(page.locator("#autopilot-proposal")).to_contain_text("Last proposal at step")
    expect(page.locator("#autopilot-proposal")).to_contain_text(re.compile(r"period \d+ → \d+ \(δ"))
    auto = [c for c in rest.get(f"/api/jobs/{fake_job.job_id}/commands").json() if c["author"] == "autopilot"]
    assert auto and auto[0]["command"] == {"type": "set_period", "period": 2}
    row = page.locator(f'#command-log tr[data-command-id="{auto[0]["id"]}"]')
    expect(row).to_contain_text("delta*/g")  # the autopilot's reason, shown with its command
    expect(row).to_contain_text("applied at step")
    assert page.console.errors == []
