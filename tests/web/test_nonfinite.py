"""A diverged job in Debian's Chromium: its NaN and infinite figures are marked, never a blank page."""

from __future__ import annotations

import contextlib
import json
import re

import pytest
from playwright.sync_api import expect
from websockets.sync.client import connect

from tests.support.browser import ARTIFACTS, login
from tests.support.frames import hello
from tests.support.polling import wait_for
from tests.support.servers import WORKER

pytestmark = pytest.mark.browser

JOB = "diverged"
SOME = re.compile(r"^[1-9]\d*$")
CHARTS = ("#chart-loss", "#chart-divergence", "#chart-drift", "#chart-period", "#chart-throughput")


def _round(step: int, divergence) -> dict:
    """A round record; from step 8 on its divergences are not finite (as the protocol spells them)."""
    return {
        "step": step,
        "group_size": 2,
        "divergence": divergence,
        "relative_divergence": divergence,
        "divergence_mean": "Infinity" if step >= 8 else 0.2,
        "divergence_max": "Infinity" if step >= 8 else 0.3,
        "relative_mean": 0.02,
        "relative_max": 0.03,
        "seconds": 0.001,
        "bytes": 8,
        "exact": True,
        "top_layers": [],
    }


def _batch(rank: int, first: int, last: int, loss=None) -> str:
    steps = [
        {"step": s, "time": 1000.0 + s, "step_time": 0.01, "drift": 0.1, "loss": loss or 1.0 / s, "scalars": {}}
        for s in range(first, last + 1)
    ]
    rounds = [_round(s, "NaN" if s >= 8 else 0.1 + rank) for s in range(first, last + 1) if s % 4 == 0]
    return json.dumps({"kind": "metrics", "steps": steps, "rounds": rounds, "control": [], "dropped": 0})


def test_a_job_with_non_finite_rounds_shows_the_banner_and_draws_its_charts(server, rest, page):
    url = server.url.replace("http", "ws", 1) + "/ws/worker"
    with contextlib.ExitStack() as stack:
        ranks = [
            stack.enter_context(connect(url, additional_headers={"Authorization": f"Bearer {WORKER}"}))
            for _ in range(2)
        ]
        for rank, ws in enumerate(ranks):
            ws.send(hello(job_id=JOB, rank=rank, world_size=2, pid=200 + rank))
            ws.send(_batch(rank, 1, 16))
        # 404 (no "rounds") until the job's first hello is stored
        wait_for(lambda: len(rest.get(f"/api/jobs/{JOB}/metrics").json().get("rounds", [])) == 8, what="rounds stored")
        assert rest.get(f"/api/jobs/{JOB}").json()["divergence_mean"] == "Infinity"

        login(page, server, route=f"#/jobs/{JOB}")
        expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected")
        banner = page.locator("#nonfinite-banner")
        expect(banner).to_be_visible()
        expect(banner).to_have_text(
            "divergence, relative_divergence, divergence_mean and divergence_max are not finite on ranks 0, 1 since step 8"
        )
        for chart in CHARTS:
            expect(page.locator(chart)).to_have_attribute("data-points", SOME)
        # The finite rounds are drawn; the steps whose figures were not are marked.
        expect(page.locator("#chart-divergence")).to_have_attribute("data-non-finite", "3")  # steps 8, 12, 16

        # Live: rank 1's loss becomes infinite from step 17 on.
        ranks[1].send(_batch(1, 17, 24, loss="Infinity"))
        ranks[0].send(_batch(0, 17, 24))
        expect(banner).to_contain_text("loss is not finite on rank 1 since step 17")
        expect(page.locator("#chart-loss")).to_have_attribute("data-non-finite", "8")
        expect(page.locator("#chart-divergence")).to_have_attribute("data-non-finite", "5")

        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "web-nonfinite-job.png"), full_page=True)

        # The job list writes the job's figures as what they are.
        page.locator("#home-link").click()
        row = page.locator(f'#job-table tr[data-job-id="{JOB}"]')
        expect(row.locator("td").nth(7)).to_have_text("+Inf")
        expect(row.locator("td").nth(8)).to_have_text("+Inf")
        assert page.console.errors == []
