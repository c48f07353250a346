"""A job resumed from a checkpoint, as the dashboard shows it (Debian's Chromium, a real server): the
commands the restore undid read as rolled back in the log, and the period chart is back at the
restored period from the resume step, with a marker saying what happened. Live and after a reload."""

from __future__ import annotations

import json

import pytest
from playwright.sync_api import expect

from tests.support.browser import login
from tests.support.fakes import SteppedRank
from tests.support.polling import wait_for

pytestmark = pytest.mark.browser

JOB = "restore-job"
LABEL = "restored from checkpoint (version 3 -> 1)"


def _command(rest, rank: SteppedRank, body: dict) -> dict:
    cmd = rest.post(f"/api/jobs/{JOB}/commands", json=body).json()
    assert rank.apply().status == "applied"
    path = f"/api/jobs/{JOB}/commands/{cmd['id']}"
    return wait_for(lambda: (c := rest.get(path).json())["status"] == "applied" and c, what="applied")


def _period_chart(page) -> tuple[list[str], float | None]:
    """The period chart's marker labels and the period it shows last."""
    chart = page.locator("#chart-period")
    labels = json.loads(chart.get_attribute("data-marker-labels") or "[]")
    return labels, json.loads(chart.get_attribute("data-lasts") or "{}").get("period")


def test_the_log_and_the_period_chart_show_what_a_restore_rolled_back(server, rest, page):
    rank = SteppedRank(server.url, JOB)
    try:
        rank.connect()
        wait_for(lambda: rest.get(f"/api/jobs/{JOB}").status_code == 200, what="the job's hello")
        rank.run(100)
        _command(rest, rank, {"type": "set_period", "period": 8})  # version 1, step 100
        rank.run(50)
        checkpoint = rank.checkpoint()  # step 150, period 8
        rank.run(50)
        _command(rest, rank, {"type": "set_period", "period": 16})  # version 2, step 200
        rank.run(132)
        _command(rest, rank, {"type": "pause_averaging"})  # version 3, step 332
        wait_for(lambda: rest.get(f"/api/jobs/{JOB}").json().get("step") == 332, what="step 332 stored")

        login(page, server, route=f"#/jobs/{JOB}")
        expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
        expect(page.locator("#command-log tbody tr")).to_have_count(3)
        wait_for(lambda: _period_chart(page) == (["period 8", "period 16", "pause averaging"], 16), what="3 markers")
        assert page.locator("#command-log tr[data-rolled-back-at-step]").count() == 0

        rank.crash()
        wait_for(lambda: not rest.get(f"/api/jobs/{JOB}").json()["ranks"][0]["connected"], what="rank 0 gone")
        rank.resume(checkpoint)

        for view in ("live", "after a reload"):
            if view == "after a reload":
                page.reload()
                expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
            undone = page.locator("#command-log tr[data-rolled-back-at-step='150']")
            expect(undone).to_have_count(2)
            expect(undone.locator("td.status-rolled-back")).to_have_count(2)
            expect(undone.first).to_contain_text(
                "applied at step 332, rolled back at step 150 (restored from checkpoint)"
            )
            expect(page.locator("#command-log tr[data-command-id='1'] td.status-applied")).to_have_text(
                "applied at step 100"
            )
            expect(page.locator("#job-version")).to_have_text("1")
            expect(page.locator("#job-period")).to_have_text("8")
            wanted = (["period 8", "period 16 (rolled back)", "pause averaging (rolled back)", LABEL], 8)
            wait_for(lambda: _period_chart(page) == wanted, what=f"the period chart {view}")
        assert page.console.errors == []
    finally:
        rank.close()
