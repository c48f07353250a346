"""What a clean clone builds: a wheel that carries the dashboard's npm files (uPlot, Swagger UI) and,
installed in a fresh venv, serves a job page whose charts draw in Chromium; an sdist that carries
them too, so a wheel built from it needs no npm; and build_web.py's errors when npm cannot help."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from importlib.metadata import version
from pathlib import Path

import httpx
import pytest
import tomllib
from setuptools import Distribution
from setuptools.errors import SetupError

import build_web
from avgctl.server import pages
from tests.support.browser import ARTIFACTS, Console, launch_chromium
from tests.support.fakes import FakeJob
from tests.support.processes import CONTROL, ServerProcess

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DATA = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
NPM_FILES = [name for name in PACKAGE_DATA["avgctl.web"] if name.startswith(build_web.VENDORED)]
"""The dashboard's npm files, relative to web/: pyproject's list, the one build_web.py reads."""
TORCH = f"torch=={version('torch')}"
"""The torch build this checkout's venv runs (the Makefile's CPU build from local disk): pinned, as
an unpinned torch would pull the multi-GB CUDA build."""
CHARTS = ("#chart-loss", "#chart-divergence", "#chart-drift", "#chart-period", "#chart-throughput")
SOME_POINTS = re.compile(r"^[1-9]\d*$")
WAIT = 20_000  # ms, for each expectation in the browser: the machine may be busy


def run(cmd: list, **kwargs) -> subprocess.CompletedProcess:
    """``cmd``'s completed process; its output in the failure when it exits non-zero."""
    done = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=150, **kwargs)
    assert done.returncode == 0, f"{cmd[:4]} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done


def clean_copy(dest: Path) -> Path:
    """The checkout as a clone of it has it, uncommitted work included: git's tracked and untracked
    files less the ignored ones (web/node_modules, .venv, build outputs)."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        source = ROOT / name
        if source.is_file():  # a tracked file deleted in the work tree is listed too
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    assert not (dest / "web" / "node_modules").exists()
    return dest


def build_wheel(src: Path, out: Path, env: dict[str, str] | None = None) -> Path:
    """A wheel of ``src``, built with this venv's setuptools (the build hook runs as in any build)."""
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, src], env=env)
    [wheel] = out.glob("avgctl-*.whl")
    return wheel


def without_npm() -> dict[str, str]:
    """This environment with no npm on PATH."""
    path = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d and not (Path(d) / "npm").exists()]
    return {**os.environ, "PATH": os.pathsep.join(path)}


def assert_carries_npm_files(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in NPM_FILES if f"avgctl/web/{name}" not in names]
    assert missing == [], f"the wheel lacks {missing}"
    assert "avgctl/web/package.json" not in names  # the sdist's, for npm ci; not the package's


@pytest.mark.package
@pytest.mark.browser
def test_a_wheel_built_from_a_clean_clone_serves_a_dashboard_whose_charts_draw(tmp_path):
    playwright_api = pytest.importorskip("playwright.sync_api")
    expect = playwright_api.expect
    # A fresh venv: torch goes in while the wheel builds (unpacking it is most of this test's time),
    # then the wheel, its other dependencies from the package index.
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv])
    python = venv / "bin" / "python"
    install = [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-compile"]
    torch_install = subprocess.Popen(
        [str(c) for c in [*install, TORCH]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wheel = build_wheel(clean_copy(tmp_path / "src"), tmp_path / "dist")
    finally:
        output = torch_install.communicate(timeout=150)[0].decode()
    assert torch_install.returncode == 0, output[-4000:]
    assert_carries_npm_files(wheel)
    run([*install, wheel])
    installed = run([python, "-c", "import avgctl.web; print(avgctl.web.__file__)"], cwd=tmp_path).stdout
    assert Path(installed.strip()).is_relative_to(venv)

    server = ServerProcess(tmp_path / "avgctl.db", python=str(python), log=tmp_path / "server.log").start()
    job = None
    try:
        for path in [f"{pages.UPLOT_PATH}/{n}" for n in pages.UPLOT_FILES] + [
            f"{pages.SWAGGER_PATH}/{n}" for n in pages.SWAGGER_FILES
        ]:
            assert httpx.get(server.base + path).status_code == 200, path
        job = FakeJob(server.base).start()
        with playwright_api.sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(WAIT)
            console = Console(page)
            page.goto(f"{server.base}/?token={CONTROL}")  # logs in: the cookie carries the token
            expect(page.locator(f'#job-table tr[data-job-id="{job.job_id}"]')).to_be_visible(timeout=WAIT)
            page.goto(f"{server.base}/#/jobs/{job.job_id}")
            expect(page.locator("#connection-state")).to_have_attribute("data-state", "connected", timeout=WAIT)
            for chart in CHARTS:
                expect(page.locator(chart)).to_have_attribute("data-points", SOME_POINTS, timeout=WAIT)
                expect(page.locator(f"{chart} .uplot canvas").first).to_be_visible(timeout=WAIT)
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "wheel-dashboard.png"))
            browser.close()
        assert console.errors == []
    finally:
        if job is not None:
            job.stop()
        server.stop()
    assert job.error is None, job.error
    assert "npm files are missing" not in (tmp_path / "server.log").read_text()


@pytest.mark.package
def test_the_sdist_carries_the_npm_files_so_a_wheel_built_from_it_needs_no_npm(tmp_path):
    src = clean_copy(tmp_path / "src")
    script = "import sys; from setuptools import build_meta; print(build_meta.build_sdist(sys.argv[1]))"
    name = run([sys.executable, "-c", script, tmp_path / "sdist"], cwd=src).stdout.strip().splitlines()[-1]
    with tarfile.open(tmp_path / "sdist" / name) as sdist:
        top = name.removesuffix(".tar.gz")
        carried = {member.removeprefix(f"{top}/") for member in sdist.getnames()}
        for needed in ["build_web.py", "web/package.json", "web/package-lock.json", *(f"web/{n}" for n in NPM_FILES)]:
            assert needed in carried, needed
        sdist.extractall(tmp_path / "unpacked", filter="data")
    assert_carries_npm_files(build_wheel(tmp_path / "unpacked" / top, tmp_path / "dist", env=without_npm()))


def npm_command(web: Path) -> build_web.Sdist:
    """build_web's command for a project whose dashboard folder is ``web`` (with pyproject's list)."""
    web.mkdir(exist_ok=True)
    dist = Distribution({"package_dir": {build_web.WEB_PACKAGE: str(web)}, "package_data": PACKAGE_DATA})
    return build_web.Sdist(dist)


def fake_npm(bin_dir: Path, script: str) -> Path:
    bin_dir.mkdir()
    npm = bin_dir / "npm"
    npm.write_text(f"#!/bin/sh\n{script}\n")
    npm.chmod(0o755)
    return bin_dir


def test_a_build_without_npm_names_the_missing_files_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SetupError, match="npm is not on PATH") as raised:
        build_web.ensure_npm_files(npm_command(tmp_path / "web"))
    assert "node_modules/uplot/dist/uPlot.esm.js" in str(raised.value) and "npm ci" in str(raised.value)


@pytest.mark.parametrize(
    ("script", "error"),
    [("exit 3", "failed with exit status 3"), ("exit 0", "did not install .*uPlot.esm.js")],
    ids=["npm-fails", "npm-leaves-files-out"],
)
def test_a_build_whose_npm_ci_brings_no_files_says_so(tmp_path, monkeypatch, script, error):
    monkeypatch.setenv("PATH", str(fake_npm(tmp_path / "bin", script)))
    with pytest.raises(SetupError, match=error):
        build_web.ensure_npm_files(npm_command(tmp_path / "web"))


def test_a_build_with_the_npm_files_runs_no_npm(tmp_path, monkeypatch):
    for name in NPM_FILES:
        (tmp_path / "web" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "web" / name).write_text("")
    monkeypatch.setenv("PATH", str(fake_npm(tmp_path / "bin", f"echo ran > {tmp_path / 'ran'}; exit 3")))
    build_web.ensure_npm_files(npm_command(tmp_path / "web"))
    assert not (tmp_path / "ran").exists()
