"""The dashboard's files: which paths are served, from which folder, and without a token.

Only the page's own files are served (not web/'s package files, node_modules or Python files):
one path segment each, so no path leads into a folder, plus uPlot's ``dist/`` under ``/vendor/uplot``.
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

import avgctl.web

WEB_DIR = Path(avgctl.web.__file__).parent
UPLOT_DIR = WEB_DIR / "node_modules" / "uplot" / "dist"
UPLOT_PATH = "/vendor/uplot"
WEB_FILE = r"[A-Za-z0-9_-]+\.(?:html|js|css)"
UPLOT_FILE = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(?:js|css)"
_PAGE_PATH = re.compile(rf"/(?:{WEB_FILE}|{UPLOT_PATH.lstrip('/')}/{UPLOT_FILE})?")

_PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>avgctl</title>
<h1>avgctl</h1><p>The dashboard is not installed. The API is at <a href="/docs">/docs</a>.</p>"""


def is_page_file(scope: Scope) -> bool:
    """A GET/HEAD of the dashboard page or one of its files: served without a token."""
    return (
        scope["type"] == "http"
        and scope.get("method") in ("GET", "HEAD")
        and _PAGE_PATH.fullmatch(scope["path"]) is not None
    )


class PageFiles(StaticFiles):
    """Static files of one folder whose names match ``pattern`` (no subfolders); 404 for the rest."""

    def __init__(self, directory: Path, pattern: str):
        super().__init__(directory=directory, check_dir=False)
        self.pattern = re.compile(pattern)

    async def get_response(self, path: str, scope: Scope) -> Response:
        if self.pattern.fullmatch(path) is None:
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)


def mount_pages(app: FastAPI) -> None:
    """``/`` (the page, or a placeholder when the dashboard is not installed) and its files."""

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = WEB_DIR / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(_PLACEHOLDER)

    app.mount(UPLOT_PATH, PageFiles(UPLOT_DIR, UPLOT_FILE), name="uplot")
    app.mount("/", PageFiles(WEB_DIR, WEB_FILE), name="web")
