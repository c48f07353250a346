"""The API docs page renders from this server alone: no request to any other host, no console error
(its strict Content-Security-Policy included), so it works offline and trusts no CDN."""

from __future__ import annotations

import pytest

from tests.support.browser import login

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = pytest.mark.browser


def test_docs_render_with_no_request_to_another_host(server, page):
    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    login(page, server)
    page.goto(f"{server.url}/docs")
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("avgctl")
    expect(page.locator(".opblock-summary-path").first).to_be_visible()  # the operations, from /openapi.json
    elsewhere = [url for url in requests if not (url.startswith(server.url + "/") or url.startswith("data:"))]
    assert elsewhere == []
    assert f"{server.url}/openapi.json" in requests
    assert page.console.errors == []
