"""The dashboard's files: which paths are served, from which folder, and without a token.

Only the page's own files are served (not web/'s package files, node_modules or Python files):
one path segment each, so no path leads into a folder, plus uPlot's ``dist/`` under ``/vendor/uplot``
and the three Swagger UI files ``/docs`` needs under ``/vendor/swagger-ui`` (both from npm, in
web/package.json): the server loads nothing from elsewhere and works offline. ``/docs`` itself
describes the API, so it needs a token like the API (``/redoc`` is gone: it would need a CDN too).
Without those npm files (no ``npm ci`` in web/) their paths answer 404 and the server warns at start.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import re
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.exceptions import HTTPException
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

import avgctl.web
from avgctl.server.headers import policy

log = logging.getLogger(__name__)

WEB_DIR = Path(avgctl.web.__file__).parent
UPLOT_DIR = WEB_DIR / "node_modules" / "uplot" / "dist"
UPLOT_PATH = "/vendor/uplot"
UPLOT_FILES = ("uPlot.esm.js", "uPlot.min.css")
"""What the page loads from uPlot; pyproject's package-data lists the same files, so a wheel carries them."""
SWAGGER_DIR = WEB_DIR / "node_modules" / "swagger-ui-dist"
SWAGGER_PATH = "/vendor/swagger-ui"
SWAGGER_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png")
"""What ``/docs`` loads; pyproject's package-data lists the same files, so a wheel carries them."""
DOCS_PATH = "/docs"
WEB_FILE = r"[A-Za-z0-9_-]+\.(?:html|js|css)"
UPLOT_FILE = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(?:js|css)"
SWAGGER_FILE = "|".join(re.escape(name) for name in SWAGGER_FILES)
_PAGE_PATH = re.compile(
    rf"/(?:{WEB_FILE}|{UPLOT_PATH.lstrip('/')}/{UPLOT_FILE}|{SWAGGER_PATH.lstrip('/')}/(?:{SWAGGER_FILE}))?"
)

_PLACEHOLDER = """<!doctype html><meta charset="utf-8"><title>avgctl</title>
<h1>avgctl</h1><p>The dashboard is not installed. The API is at <a href="/docs">/docs</a>.</p>"""


def missing_npm_files() -> list[Path]:
    """The npm files the dashboard and ``/docs`` load that are not installed (a source checkout
    without ``npm ci`` in web/, or a wheel built without them)."""
    wanted = [UPLOT_DIR / name for name in UPLOT_FILES] + [SWAGGER_DIR / name for name in SWAGGER_FILES]
    return [path for path in wanted if not path.is_file()]


def is_page_file(scope: Scope) -> bool:
    """A GET/HEAD of the dashboard page or one of its files: served without a token."""
    return (
        scope["type"] == "http"
        and scope.get("method") in ("GET", "HEAD")
        and _PAGE_PATH.fullmatch(scope["path"]) is not None
    )


class PageFiles(StaticFiles):
    """Static files of one folder whose names match ``pattern`` (no subfolders); 404 for the rest,
    and for every name while the folder is missing (``mount_pages`` warns about that once)."""

    def __init__(self, directory: Path, pattern: str):
        super().__init__(directory=directory, check_dir=False)
        self.pattern = re.compile(pattern)

    async def check_config(self) -> None:
        # Starlette's check raises on a missing folder at the first request, a 500 on every one.
        if Path(self.directory).is_dir():
            await super().check_config()

    async def get_response(self, path: str, scope: Scope) -> Response:
        if self.pattern.fullmatch(path) is None:
            raise HTTPException(status_code=404)
        return await super().get_response(path, scope)


def mount_pages(app: FastAPI) -> None:
    """``/`` (the page, or a placeholder when the dashboard is not installed) and its files; warns
    when the npm files are missing (those paths answer 404, and the page cannot start)."""
    missing = missing_npm_files()
    if missing:
        log.warning(
            "the dashboard's npm files are missing (%s): the dashboard stays blank and /docs cannot load."
            " In a source checkout run `npm ci` in %s; otherwise reinstall avgctl from a wheel built"
            " with them (building one runs npm ci)",
            ", ".join(os.path.relpath(path, WEB_DIR) for path in missing),
            WEB_DIR,
        )

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        page = WEB_DIR / "index.html"
        return FileResponse(page) if page.is_file() else HTMLResponse(_PLACEHOLDER)

    app.mount(UPLOT_PATH, PageFiles(UPLOT_DIR, UPLOT_FILE), name="uplot")
    app.mount(SWAGGER_PATH, PageFiles(SWAGGER_DIR, SWAGGER_FILE), name="swagger-ui")
    app.mount("/", PageFiles(WEB_DIR, WEB_FILE), name="web")


def mount_docs(app: FastAPI) -> None:
    """``/docs``: Swagger UI from ``/vendor/swagger-ui``; create the app with ``docs_url=None`` and
    ``redoc_url=None`` (FastAPI's own pages load it from a CDN). Its one inline script, which starts
    Swagger UI, is allowed by its hash, so the page's policy stays as strict as the dashboard's."""
    page = get_swagger_ui_html(
        openapi_url=app.openapi_url,
        title=f"{app.title} API",
        swagger_js_url=f"{SWAGGER_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_PATH}/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # else a badge image from validator.swagger.io
    ).body
    inline = re.findall(rb"<script>(.*?)</script>", page, flags=re.DOTALL)
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s).digest()).decode()}'" for s in inline)
    headers = {"Content-Security-Policy": policy(f"'self' {hashes}")}

    @app.get(DOCS_PATH, include_in_schema=False)
    def docs() -> Response:
        return HTMLResponse(page, headers=headers)
