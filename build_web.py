"""setuptools commands that put the dashboard's npm files (uPlot, Swagger UI) into wheels and sdists.

``web/node_modules`` is git-ignored, so a clean clone lacks the files that pyproject's package-data
lists under ``node_modules/``, and setuptools skips package-data that matches nothing: the wheel
would build and install without its chart library, and the dashboard would stay blank. ``build_py``
and ``sdist`` therefore run ``npm ci`` in ``web/`` first when one of those files is missing, and
stop with an error naming the files and the fix when they cannot. The sdist carries the files (and
``web/package.json`` with its lockfile), so a wheel built from it needs no npm. An editable install
(``pip install -e .``) serves ``web/`` in place and leaves ``npm ci`` to the developer (``make
setup`` runs it). Wired in through ``[tool.setuptools.cmdclass]``; MANIFEST.in puts this file in
the sdist.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from setuptools import Command
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist
from setuptools.errors import SetupError

WEB_PACKAGE = "avgctl.web"
VENDORED = "node_modules/"
"""The package-data entries under this folder are the npm files: the one list of them is pyproject's."""
NPM_CI = ("npm", "ci", "--no-audit", "--no-fund", "--loglevel=error")


def npm_files(command: Command) -> tuple[Path, list[str]]:
    """The dashboard's folder and the npm files its package-data lists (relative to that folder)."""
    dist = command.distribution
    web = Path(dist.package_dir[WEB_PACKAGE])
    return web, [name for name in dist.package_data.get(WEB_PACKAGE, ()) if name.startswith(VENDORED)]


def missing_npm_files(command: Command) -> list[str]:
    """The npm files that are not in the dashboard's folder, as paths from the project's root."""
    web, names = npm_files(command)
    return [(web / name).as_posix() for name in names if not (web / name).is_file()]


def ensure_npm_files(command: Command) -> None:
    """Run ``npm ci`` in the dashboard's folder when one of its npm files is missing; raise
    ``SetupError`` with what is missing and how to fix it when npm is absent, fails, or leaves one out."""
    missing = missing_npm_files(command)
    if not missing:
        return
    web, _ = npm_files(command)
    listed = ", ".join(missing)
    npm_ci = " ".join(NPM_CI)
    npm = shutil.which("npm")
    if npm is None:
        raise SetupError(
            f"the dashboard's npm files are missing ({listed}) and npm is not on PATH: install Node.js"
            f" (npm) and build again, or run `{npm_ci}` in {web}/ where npm is and build from there"
        )
    command.announce(f"running {npm_ci} in {web}/ (missing: {listed})", level=2)
    try:
        subprocess.run([npm, *NPM_CI[1:]], cwd=web, check=True)
    except subprocess.CalledProcessError as err:
        raise SetupError(
            f"`{npm_ci}` in {web}/ failed with exit status {err.returncode} (npm's output is above), so"
            f" the dashboard's npm files are missing ({listed}): fix what npm reports and build again"
        ) from None
    still = missing_npm_files(command)
    if still:
        raise SetupError(f"`npm ci` in {web}/ did not install {', '.join(still)}: check {web}/package.json")


class BuildPy(build_py):
    """``build_py`` that first brings the npm files (not in editable mode: ``web/`` is served in place)."""

    def run(self) -> None:
        if not self.editable_mode:
            ensure_npm_files(self)
            self.__dict__.pop("data_files", None)  # computed lazily, maybe before the files arrived
        super().run()


class Sdist(sdist):
    """``sdist`` that first brings the npm files, so the sdist carries them."""

    def run(self) -> None:
        ensure_npm_files(self)
        super().run()
