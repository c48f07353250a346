"""Shared by the server tests: a real uvicorn in a thread, a fake averager, polling helpers."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn

from avgctl.server.app import create_app
from avgctl.protocol import AveragerConfig, CommandAck, ControlEvent, ControlView, RoundRecord, StepRecord
from avgctl.server.settings import Settings
from avgctl.worker import control_state as cs
from avgctl.worker.ledger import CommandLedger
from tests.polling import wait_for

CONTROL, READ, WORKER = "control-secret", "read-secret", "worker-secret"


def make_settings(tmp_path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        db=str(tmp_path / "avgctl.db"), control_token=CONTROL, read_token=READ, worker_token=WORKER
    )
    values.update(overrides)
    return Settings(**values)


def auth(token: str = CONTROL) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


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


class FakeAverager:
    """The averager surface the link uses, applying commands with the real control_state rules."""

    def __init__(self, rank: int = 0, world_size: int = 1, period: int = 4):
        self.rank = rank
        self.world_size = world_size
        self.step = 0
        self.state = cs.periodic_state(period, 0)
        self.listeners: list[Any] = []
        self.source: Any = None
        self.ledger = CommandLedger()  # the averager's rule: apply an id once, answer repeats

    def hello_config(self) -> AveragerConfig:
        return AveragerConfig(kind="periodic", period=self.state.period, warmup_steps=self.state.warmup_steps)

    def control_view(self) -> ControlView:
        return cs.to_view(self.state)

    def add_listener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def remove_listener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def set_control_source(self, source: Any) -> None:
        assert self.rank == 0, "only rank 0 has a control source"
        self.source = source

    def train_step(self, loss: float = 1.0) -> None:
        """One step: records go to the listeners; rank 0 applies whatever commands arrived."""
        self.step += 1
        now = time.time()
        for listener in self.listeners:
            listener.on_step(StepRecord(step=self.step, time=now, loss=loss, step_time=0.01))
        if self.step % self.state.period == 0:
            record = RoundRecord(
                step=self.step, group_size=self.world_size, divergence=0.1, relative_divergence=0.01,
                divergence_mean=0.1, divergence_max=0.2, relative_mean=0.01, relative_max=0.02,
                seconds=0.001, bytes=100, exact=True,
            )
            for listener in self.listeners:
                listener.on_round(record)
        if self.source is not None:
            self._apply(self.source.poll())

    def _apply(self, commands: list) -> None:
        for command_id, command in commands:
            remembered = self.ledger.ack_for(command_id)
            if remembered is not None:  # re-delivered: answer again, never re-apply
                self.source.report(remembered)
                continue
            try:
                self.state = cs.apply_command(self.state, command, self.step)
            except cs.CommandRejected as err:
                ack = CommandAck(command_id=command_id, status="rejected", reason=str(err))
            else:
                view = cs.to_view(self.state)
                ack = CommandAck(command_id=command_id, status="applied", applied_step=self.step, control=view)
                for listener in self.listeners:
                    listener.on_control(ControlEvent(step=self.step, control=view))
            self.ledger.remember(ack)
            self.source.report(ack)
