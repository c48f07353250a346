"""The dashboard in Debian's Chromium against a real server and real torchrun workers."""

from __future__ import annotations

import pytest

from tests.support.browser import ARTIFACTS, Console, launch_chromium
from tests.support.processes import CONTROL, ServerProcess, Workers, wait_for

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = [pytest.mark.dist, pytest.mark.browser]


def _points(page, chart: str) -> int:
    return int(page.locator(chart).get_attribute("data-points") or 0)


def test_dashboard_drives_a_real_job(tmp_path):
    server = ServerProcess(tmp_path / "avgctl.db").start()
    job = "browser-e2e"
    workers = Workers(
        server.base, job, "--steps", "100000", "--period", "4", "--step-delay", "0.02", log=tmp_path / "w.log"
    )
    api = server.api
    try:
        wait_for(lambda: (j := api.try_get(f"/api/jobs/{job}")) and j["step"] > 10, 90, what="job running")
        with playwright_api.sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.set_default_timeout(20_000)
            console = Console(page)
            page.goto(f"{server.base}/?token={CONTROL}")  # log in once; the cookie carries the token
            expect(page.locator(f'#job-table tr[data-job-id="{job}"]')).to_be_visible()
            page.goto(f"{server.base}/#/jobs/{job}")
            expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")

            # Live data reaches the charts.
            wait_for(
                lambda: _points(page, "#chart-loss") > 5 and _points(page, "#chart-divergence") > 2,
                30,
                what="chart data",
            )
            first = _points(page, "#chart-loss")
            wait_for(lambda: _points(page, "#chart-loss") > first, 30, what="more chart data")

            # A bad period is explained and nothing is sent.
            before = len(api.get(f"/api/jobs/{job}/commands"))
            page.fill("#period-input", "0")
            page.click("#set-period")
            expect(page.locator("#period-error")).not_to_be_empty()
            assert len(api.get(f"/api/jobs/{job}/commands")) == before

            # "Set period" and "Pause averaging" take effect in the job, with the applied step shown.
            page.fill("#period-input", "6")
            page.click("#set-period")
            expect(page.locator('#command-log tr[data-status="applied"]')).to_have_count(1)
            page.click("#pause-averaging")
            expect(page.locator('#command-log tr[data-status="applied"]')).to_have_count(2)
            commands = {c["type"]: c for c in api.get(f"/api/jobs/{job}/commands")}
            control = api.get(f"/api/jobs/{job}")["control"]
            assert control["period"] == 6 and control["averaging_paused"] is True
            for kind in ("set_period", "pause_averaging"):
                row = page.locator(f'#command-log tr[data-command-id="{commands[kind]["id"]}"]')
                expect(row).to_contain_text(f"applied at step {commands[kind]['applied_step']}")
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard-e2e.png"))
            assert console.errors == []

            # The page survives a server restart and recovers by itself.
            server.kill()
            expect(page.locator("#connection-state")).to_have_attribute("data-state", "reconnecting")
            server.start()
            expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected", timeout=30_000)
            page.click("#resume-averaging")
            expect(page.locator('#command-log tr[data-status="applied"]')).to_have_count(3)
            # While the server is down the browser itself logs the refused connections; nothing else.
            assert all("WebSocket" in e or "Failed to load resource" in e for e in console.errors), console.errors
            browser.close()
    finally:
        workers.stop()
        server.stop()
