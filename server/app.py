"""The FastAPI application: ``create_app(settings)`` builds it; the lifespan owns the store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
from collections.abc import AsyncIterator

from fastapi import FastAPI

from avgctl.server.auth import AuthMiddleware, Tokens
from avgctl.server.autopilot import Autopilot
from avgctl.server.body_limit import BodyLimitMiddleware
from avgctl.server.commands import CommandService
from avgctl.server.errors import install as install_error_handlers
from avgctl.server.headers import SecurityHeadersMiddleware
from avgctl.server.hub import Hub
from avgctl.server.pages import mount_docs, mount_pages
from avgctl.server.routes import commands, health, jobs, limits, metrics, prometheus, ws
from avgctl.server.settings import Settings, browsable_host
from avgctl.server.store import Store
from avgctl.server.workers import WorkerRegistry

log = logging.getLogger(__name__)


def with_token(settings: Settings) -> Settings:
    """``settings`` with a generated control token when none of the three tokens is set."""
    if settings.control_token or settings.read_token or settings.worker_token:
        return settings
    return settings.model_copy(update={"control_token": secrets.token_urlsafe(24)})


def dashboard_url(settings: Settings) -> str:
    """Where a person opens the dashboard (logged in with the control token if there is one)."""
    url = f"http://{browsable_host(settings.host)}:{settings.port}/"
    return f"{url}?token={settings.control_token}" if settings.control_token else url


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the server. Without any token configured, a control token is generated and printed."""
    configured = settings if settings is not None else Settings()
    settings = with_token(configured)
    generated = settings is not configured

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
        if generated:
            print(f"avgctl: no token configured; dashboard: {dashboard_url(settings)}", file=sys.stderr, flush=True)
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
    for module in (health, jobs, commands, metrics, prometheus, limits, ws):
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
