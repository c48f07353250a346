"""The dashboard's files when its npm files are missing (no ``npm ci`` in web/, or a wheel built
without them): 404s and a warning at start-up, never a 500; and the one list of those files."""

from __future__ import annotations

import logging
from pathlib import Path

import tomllib
from fastapi.testclient import TestClient

from avgctl.server import pages
from avgctl.server.app import create_app
from tests.support.servers import make_settings

ROOT = Path(__file__).resolve().parents[2]
NPM_PATHS = [f"{pages.UPLOT_PATH}/{name}" for name in pages.UPLOT_FILES] + [
    f"{pages.SWAGGER_PATH}/{name}" for name in pages.SWAGGER_FILES
]


def test_a_server_without_its_npm_files_answers_404_and_warns_at_start(tmp_path, monkeypatch, caplog):
    absent = tmp_path / "web" / "node_modules"  # as in a clean clone: the folder itself is missing
    monkeypatch.setattr(pages, "UPLOT_DIR", absent / "uplot" / "dist")
    monkeypatch.setattr(pages, "SWAGGER_DIR", absent / "swagger-ui-dist")
    caplog.set_level(logging.WARNING, logger=pages.__name__)
    # raise_server_exceptions: Starlette's own check would raise here rather than answer 500.
    with TestClient(create_app(make_settings(tmp_path))) as client:
        for path in NPM_PATHS:  # public paths: no token
            assert client.get(path).status_code == 404, path
            assert client.head(path).status_code == 404, path
        assert client.get("/").status_code == 200  # the page itself still loads
    [warning] = [r.getMessage() for r in caplog.records if r.name == pages.__name__]
    assert "npm ci" in warning and "uplot/dist/uPlot.esm.js" in warning and "swagger-ui.css" in warning


def test_a_server_with_its_npm_files_serves_them_and_warns_nothing(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger=pages.__name__)
    with TestClient(create_app(make_settings(tmp_path))) as client:
        for path in NPM_PATHS:
            assert client.get(path).status_code == 200, f"{path} (run npm ci in web/)"
    assert pages.missing_npm_files() == []
    assert [r for r in caplog.records if r.name == pages.__name__] == []


def test_the_npm_files_the_server_loads_are_the_ones_the_wheel_carries():
    """pyproject's package-data is the list build_web.py makes sure of; pages.py names the same files."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["avgctl.web"]
    packaged = {name for name in data if name.startswith("node_modules/")}
    served = {(pages.UPLOT_DIR / n).relative_to(pages.WEB_DIR).as_posix() for n in pages.UPLOT_FILES} | {
        (pages.SWAGGER_DIR / n).relative_to(pages.WEB_DIR).as_posix() for n in pages.SWAGGER_FILES
    }
    assert packaged == served
