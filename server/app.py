"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan owns the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI

from avgctl.server.auth import AuthMiddleware, Tokens
from avgctl.server.autopilot import Autopilot
from avgctl.server.body_limit import BodyLimitMiddleware
from avgctl.server.commands import CommandService
from avgctl.server.errors import install as install_error_handlers
from avgctl.server.headers import SecurityHeadersMiddleware
from avgctl.server.hub import Hub
from avgctl.server.pages import mount_docs, mount_pages
from avgctl.server.routes import commands, health, jobs, limits, metrics, prometheus, series, session, ws
from avgctl.server.settings import Settings, browsable_host
from avgctl.server.store import Store
from avgctl.server.workers import WorkerRegistry

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GeneratedToken:
    """The control token a server without any configured token uses, and where it is kept."""

    token: str
    kept_in: Path | None
    """The file it was read from or written to; None: this run's only (``why`` says why)."""
    why: str = ""


def token_file(db: str) -> Path | None:
    """Where the generated control token of the store ``db`` is kept: ``<db>.token`` beside the
    SQLite file, so the token lives exactly as long as the jobs it guards. None for a database that
    is no file (``:memory:``, ``""``, ``file::memory:``, ``mode=memory``)."""
    if db in ("", ":memory:") or db.startswith("file::memory:") or "mode=memory" in db:
        return None
    return Path(db + ".token")


def generated_token(db: str) -> GeneratedToken:
    """The control token kept beside ``db`` (``token_file``): read back if the file exists, else made
    and written there with mode 0600 (``O_CREAT | O_EXCL``: never over another's file), so a
    restarted server takes the links and dashboards it let in before. A file that other users may
    read is used, with a warning; a database that is no file, or a file that cannot be written, gets
    a token for this run only."""
    path = token_file(db)
    if path is None:
        return GeneratedToken(secrets.token_urlsafe(24), None, "the database is not a file")
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            token = _read_token(path)
            if token:
                return GeneratedToken(token, path)
            # Empty: a start that died between creating and writing it, so no one was given it.
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        except OSError as err:
            log.warning("cannot keep the generated control token in %s: %s", path, err.strerror)
            return GeneratedToken(secrets.token_urlsafe(24), None, f"{path} cannot be written: {err.strerror}")
        token = secrets.token_urlsafe(24)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
            f.flush()
            os.fsync(f.fileno())
        return GeneratedToken(token, path)
    raise RuntimeError(f"{path} keeps appearing empty: remove it, or configure a token")


def _read_token(path: Path) -> str:
    mode = path.stat().st_mode
    if mode & 0o077:
        log.warning(
            "the control token file %s may be read by other users (mode %s): chmod 600 it,"
            " or delete it and restart for a new token",
            path,
            oct(mode & 0o777),
        )
    return path.read_text().strip()


def with_token(settings: Settings) -> Settings:
    """``settings`` with the generated control token (``generated_token``) when none of the three
    tokens is set."""
    if settings.control_token or settings.read_token or settings.worker_token:
        return settings
    return settings.model_copy(update={"control_token": generated_token(settings.db).token})


def dashboard_url(settings: Settings) -> str:
    """Where a person opens the dashboard (logged in with the control token if there is one)."""
    url = f"http://{browsable_host(settings.host)}:{settings.port}/"
    return f"{url}?token={settings.control_token}" if settings.control_token else url


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the server. Without any token configured, a control token is generated (and kept beside
    the database for the next start: ``generated_token``) and printed."""
    settings = settings if settings is not None else Settings()
    generated = None
    if not (settings.control_token or settings.read_token or settings.worker_token):
        generated = generated_token(settings.db)
        settings = settings.model_copy(update={"control_token": generated.token})

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = Store(settings.db, settings.metrics_queue, settings.retention_steps, settings.history_records)
        await asyncio.to_thread(store.start)
        hub = Hub(settings.dashboard_interval, settings.dashboard_queue, settings.live_steps)
        workers = WorkerRegistry()
        loop = asyncio.get_running_loop()

        def on_stored(receipts: list) -> None:  # on the writer thread
            with contextlib.suppress(RuntimeError):  # the loop already closed (shutdown)
                loop.call_soon_threadsafe(workers.stored, receipts)

        def on_lost(receipts: list) -> None:  # on the writer thread
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(workers.lost, receipts)

        store.on_stored = on_stored
        store.on_lost = on_lost
        app.state.store = store
        app.state.hub = hub
        app.state.workers = workers
        app.state.commands = CommandService(store, workers, hub)
        app.state.autopilot = Autopilot(store, app.state.commands)
        ticker = asyncio.create_task(hub.run(), name="avgctl-hub")
        if generated is not None:
            where = (
                f"control token kept in {generated.kept_in} (mode 0600; the next start uses it again)"
                if generated.kept_in is not None
                else f"control token for this run only ({generated.why})"
            )
            print(
                f"avgctl: no token configured; {where}; dashboard: {dashboard_url(settings)}",
                file=sys.stderr,
                flush=True,
            )
        try:
            yield
        finally:
            await workers.close_all()
            await app.state.autopilot.close()
            await app.state.commands.close()
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            await asyncio.to_thread(store.close)

    # FastAPI's own /docs and /redoc load their scripts from a CDN: ours come from /vendor.
    app = FastAPI(title="avgctl", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    for module in (health, jobs, commands, metrics, series, prometheus, limits, session, ws):
        app.include_router(module.router)

    install_error_handlers(app)
    mount_docs(app)
    mount_pages(app)
    # Each add_middleware wraps the ones before: headers outermost (refusals carry them too), then
    # auth before anything reads the body.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes, stall_seconds=settings.body_timeout)
    app.add_middleware(
        AuthMiddleware,
        tokens=Tokens(settings.control_token, settings.read_token, settings.worker_token),
        allowed_origins=settings.allowed_origins,
        control_token_on_worker_socket=settings.control_token_on_worker_socket,
    )
    app.add_middleware(SecurityHeadersMiddleware)
    return app
