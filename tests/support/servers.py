"""The server in this process: settings with the test tokens, and a real uvicorn in a thread."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import uvicorn

from avgctl.server.app import create_app
from avgctl.server.settings import Settings
from tests.support.polling import wait_for
from tests.support.tokens import CONTROL, READ, WORKER, auth

__all__ = ["CONTROL", "READ", "WORKER", "ServerThread", "auth", "make_settings", "running_server"]


def make_settings(tmp_path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        db=str(tmp_path / "avgctl.db"), control_token=CONTROL, read_token=READ, worker_token=WORKER
    )
    values.update(overrides)
    return Settings(**values)


class ServerThread:
    """A real uvicorn serving ``create_app(settings)`` on loopback, in a thread of this process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.server: uvicorn.Server | None = None
        self.thread: threading.Thread | None = None
        self.port = settings.port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerThread:
        config = uvicorn.Config(
            create_app(self.settings.model_copy(update={"port": self.port})),
            host="127.0.0.1",
            port=self.port,
            ws_max_size=self.settings.max_frame_bytes,
            ws_per_message_deflate=False,  # as `avgctl serve`
            log_level="warning",
            lifespan="on",
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), timeout=20)
        assert self.server.started, "uvicorn did not start"
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.should_exit = True
            self.thread.join(20)
            assert not self.thread.is_alive(), "uvicorn did not stop"
            self.server = None


@contextlib.contextmanager
def running_server(settings: Settings) -> Iterator[ServerThread]:
    server = ServerThread(settings.model_copy(update={"port": 0})).start()
    try:
        yield server
    finally:
        server.stop()
