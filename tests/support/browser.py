"""Debian's Chromium under Playwright: how it is launched, where screenshots go, a page's console
errors, and logging in as a person would. Playwright itself is imported by the tests (they skip
without it); these helpers take its objects."""

from __future__ import annotations

from pathlib import Path

from tests.support.tokens import CONTROL

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"  # git-ignored


def launch_chromium(playwright):
    """Debian's Chromium, headless, from a ``sync_playwright()`` context."""
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


class Console:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        page.on("pageerror", lambda err: self.errors.append(f"uncaught: {err}"))


def login(page, server, token: str = CONTROL, route: str = "") -> None:
    """Open the dashboard as a person would: the URL with ?token= (then the cookie carries it)."""
    page.goto(f"{server.url}/?token={token}{route}")
