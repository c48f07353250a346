"""Shared by the browser tests: fake ranks speaking the worker protocol, console capture, login."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
import time

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from avgctl.protocol import (
    AveragerConfig,
    CommandAck,
    CommandDelivery,
    ControlEvent,
    Hello,
    MetricsBatch,
    RoundRecord,
    StepRecord,
)
from avgctl.worker import control_state as cs
from tests.server.helpers import CONTROL, WORKER


class FakeJob:
    """The ranks of one job speaking the worker protocol from one thread: a hello per rank, then
    every 50 ms five steps per rank in a metrics batch; rank 0 applies and acknowledges commands
    with the workers' own rules (``control_state``), so commands really go pending -> applied."""

    def __init__(self, url: str, job_id: str = "web-job", world_size: int = 4, state: cs.ControlState | None = None):
        self.ws_url = url.replace("http", "ws", 1) + "/ws/worker"
        self.job_id = job_id
        self.world_size = world_size
        self.state = state or cs.periodic_state(4, 0)
        self.step = 0
        self.streaming = threading.Event()  # hello is sent at once; metrics only while set
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None

    def hello(self, rank: int) -> str:
        group_sizes = list(self.state.group_sizes) if self.state.group_sizes else None
        config = AveragerConfig(
            kind="hierarchical" if group_sizes else "periodic",
            period=self.state.period,
            warmup_steps=self.state.warmup_steps,
            group_sizes=group_sizes,
        )
        return Hello(
            job_id=self.job_id, rank=rank, world_size=self.world_size, host=f"host{rank // 2}", pid=1000 + rank,
            config=config, control=cs.to_view(self.state), step=self.step,
        ).model_dump_json()

    def start(self, streaming: bool = True) -> FakeJob:
        if streaming:
            self.streaming.set()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(20), "fake ranks could not say hello"
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self.thread is not None:
            self.thread.join(20)

    def _run(self, ready: threading.Event) -> None:
        headers = {"Authorization": f"Bearer {WORKER}"}
        try:
            with contextlib.ExitStack() as stack:
                sockets = [stack.enter_context(ws_connect(self.ws_url, additional_headers=headers)) for _ in range(self.world_size)]
                for rank, ws in enumerate(sockets):
                    ws.send(self.hello(rank))
                ready.set()
                while not self.stopped.wait(0.05):
                    if self.streaming.is_set():
                        self._tick(sockets)
        except ConnectionClosed:
            pass  # the server went away (the reconnect test stops it)
        except BaseException as err:  # surfaced by the fixture
            self.error = err
        finally:
            ready.set()

    def _tick(self, sockets) -> None:
        first = self.step + 1
        if not self.state.training_paused:
            self.step += 5
        events: list[ControlEvent] = []
        acks: list[CommandAck] = []
        with contextlib.suppress(TimeoutError):
            while True:
                frame = CommandDelivery.model_validate_json(sockets[0].recv(timeout=0))
                try:
                    self.state = cs.apply_command(self.state, frame.command, self.step)
                except cs.CommandRejected as err:
                    acks.append(CommandAck(command_id=frame.id, status="rejected", reason=str(err)))
                else:
                    view = cs.to_view(self.state)
                    events.append(ControlEvent(step=self.step, control=view))
                    acks.append(CommandAck(command_id=frame.id, status="applied", applied_step=self.step, control=view))
                    self.state = dataclasses.replace(self.state, average_now=False)
        now = time.time()
        for rank, ws in enumerate(sockets):
            steps = [
                StepRecord(step=s, time=now, step_time=0.01, drift=0.01 * (s % self.state.period + 1) * (1 + rank),
                           loss=2.0 * math.exp(-s / 500) + 0.05 * rank)
                for s in range(first, self.step + 1)
            ]
            rounds = [
                RoundRecord(step=s, group_size=self.world_size, divergence=0.1 + 0.02 * rank, relative_divergence=0.01,
                            divergence_mean=0.13, divergence_max=0.16, relative_mean=0.013, relative_max=0.016,
                            seconds=0.002, bytes=4096, exact=True)
                for s in range(first, self.step + 1) if s % self.state.period == 0
            ]
            ws.send(MetricsBatch(steps=steps, rounds=rounds, control=events).model_dump_json())
        for ack in acks:
            sockets[0].send(ack.model_dump_json())


class Console:
    """Console errors and uncaught exceptions of one page."""

    def __init__(self, page):
        self.errors: list[str] = []
        page.on("console", lambda msg: msg.type == "error" and self.errors.append(msg.text))
        page.on("pageerror", lambda err: self.errors.append(f"uncaught: {err}"))


def login(page, server, token: str = CONTROL, route: str = "") -> None:
    """Open the dashboard as a person would: the URL with ?token= (then the cookie carries it)."""
    page.goto(f"{server.url}/?token={token}{route}")
