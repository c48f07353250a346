"""Browser tests: a real avgctl server (uvicorn in a thread), fake ranks over /ws/worker, and
Debian's Chromium driven by Playwright. Screenshots go to artifacts/ (git-ignored)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
import pytest

from tests.support.browser import ARTIFACTS, Console, launch_chromium
from tests.support.fakes import FakeJob
from tests.support.servers import CONTROL, ServerThread, make_settings

playwright_api = pytest.importorskip("playwright.sync_api")
playwright_api.expect.set_options(timeout=15_000)


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path, port=0)


@pytest.fixture
def server(settings) -> Iterator[ServerThread]:
    srv = ServerThread(settings).start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def rest(server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {CONTROL}"}, timeout=10) as client:
        yield client


@pytest.fixture
def fake_job(server) -> Iterator[FakeJob]:
    job = FakeJob(server.url).start()
    try:
        yield job
    finally:
        job.stop()
    assert job.error is None, job.error


@pytest.fixture(scope="session")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server, request):
    # Depends on the server so that it closes (and takes its screenshot) while the server runs;
    # tests list `page` last, so it also closes before their fake ranks stop.
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(15_000)
    pg = context.new_page()
    pg.console = Console(pg)
    yield pg
    ARTIFACTS.mkdir(exist_ok=True)
    with contextlib.suppress(Exception):
        pg.screenshot(path=str(ARTIFACTS / f"web-{request.node.name}.png"), full_page=True)
    context.close()
