"""Stand-ins for the worker side: an averager for one link, a job's ranks over /ws/worker, and a
one-rank job a test drives step by step (``SteppedRank``: commands, a crash, a resume).

Both apply commands with the workers' own rules (``avgctl.worker.control_state``); the averager
also keeps the real ``CommandLedger``, so a re-delivered command is answered, never re-applied.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from avgctl.protocol import (
    AveragerConfig,
    CommandAck,
    CommandDelivery,
    ControlEvent,
    ControlView,
    Hello,
    MetricsBatch,
    RoundRecord,
    StepRecord,
)
from avgctl.worker import control_state as cs
from avgctl.worker.ledger import CommandLedger
from tests.support.frames import JOB_SECRET
from tests.support.tokens import WORKER


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
        # The fakes of a test are the ranks of one job: they share its secret, as connect() makes
        # a real job's ranks do through their store.
        self.job_secret: str | None = JOB_SECRET

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
                step=self.step,
                group_size=self.world_size,
                divergence=0.1,
                relative_divergence=0.01,
                divergence_mean=0.1,
                divergence_max=0.2,
                relative_mean=0.01,
                relative_max=0.02,
                seconds=0.001,
                bytes=100,
                exact=True,
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


class FakeJob:
    """The ranks of one job speaking the worker protocol from one thread: a hello per rank, then
    every 50 ms five steps per rank in a metrics batch; rank 0 applies and acknowledges commands
    with the workers' own rules (``control_state``), so commands really go pending -> applied."""

    def __init__(
        self,
        url: str,
        job_id: str = "web-job",
        world_size: int = 4,
        state: cs.ControlState | None = None,
        outer_lr: float = 0.7,
    ):
        self.ws_url = url.replace("http", "ws", 1) + "/ws/worker"
        self.job_id = job_id
        self.world_size = world_size
        self.state = state or cs.periodic_state(4, 0)
        # A DiLoCo state (``cs.diloco_state``): the outer optimizer's own lr, which its rounds report
        # until a set_outer_lr applies.
        self.outer_lr = outer_lr
        self.step = 0
        self.streaming = threading.Event()  # hello is sent at once; metrics only while set
        self.stopped = threading.Event()
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.job_secret = secrets.token_hex(16)  # what its ranks share, as a real job's

    def hello(self, rank: int) -> str:
        config = cs.to_config(self.state)  # the kind, period and group sizes, as a real rank's hello
        return Hello(
            job_id=self.job_id,
            rank=rank,
            world_size=self.world_size,
            host=f"host{rank // 2}",
            pid=1000 + rank,
            config=config,
            control=cs.to_view(self.state),
            step=self.step,
            job_secret=self.job_secret,
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
                sockets = [
                    stack.enter_context(ws_connect(self.ws_url, additional_headers=headers))
                    for _ in range(self.world_size)
                ]
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
                StepRecord(
                    step=s,
                    time=now,
                    step_time=0.01,
                    drift=0.01 * (s % self.state.period + 1) * (1 + rank),
                    loss=2.0 * math.exp(-s / 500) + 0.05 * rank,
                )
                for s in range(first, self.step + 1)
            ]
            rounds = [
                RoundRecord(
                    step=s,
                    group_size=self.world_size,
                    divergence=0.1 + 0.02 * rank,
                    relative_divergence=0.01,
                    divergence_mean=0.13,
                    divergence_max=0.16,
                    relative_mean=0.013,
                    relative_max=0.016,
                    seconds=0.002,
                    bytes=4096,
                    exact=True,
                    **self._pseudo_gradient(s),
                )
                for s in range(first, self.step + 1)
                if s % self.state.period == 0
            ]
            ws.send(MetricsBatch(steps=steps, rounds=rounds, control=events).model_dump_json())
        for ack in acks:
            sockets[0].send(ack.model_dump_json())

    def _pseudo_gradient(self, step: int) -> dict[str, float]:
        """A DiLoCo round's figures (none for other averagers): ||Delta|| shrinking as training goes."""
        if not self.state.diloco:
            return {}
        norm = 1.0 / (1.0 + step / 100)
        lr = self.state.outer_lr if self.state.outer_lr is not None else self.outer_lr
        return {"pseudo_gradient_norm": norm, "pseudo_gradient_relative": norm / 10, "outer_lr": lr}


class SteppedRank:
    """Rank 0 of a one-rank job over ``/ws/worker``, driven by its test one call at a time: steps
    on demand, each command delivered to it applied (``control_state``'s rules) at the step it has
    reached, and a crash and resume from a checkpoint (its step and control state), as a job that
    torchrun restarts from its last checkpoint: a new process, a new connection, a new hello."""

    def __init__(self, url: str, job_id: str = "restore-job", period: int = 4):
        self.ws_url = url.replace("http", "ws", 1) + "/ws/worker"
        self.job_id = job_id
        self.step = 0
        self.state = cs.periodic_state(period, 0)
        self.job_secret = secrets.token_hex(16)  # kept in checkpoints, so a resumed job is let in
        self.ws: Any = None
        self._sockets = contextlib.ExitStack()  # every connection it made, closed by close()

    def connect(self) -> SteppedRank:
        headers = {"Authorization": f"Bearer {WORKER}"}
        self.ws = self._sockets.enter_context(ws_connect(self.ws_url, additional_headers=headers))
        self.ws.send(
            Hello(
                job_id=self.job_id,
                rank=0,
                world_size=1,
                host="host0",
                pid=2000,
                config=AveragerConfig(kind="periodic", period=self.state.period, warmup_steps=0),
                control=cs.to_view(self.state),
                step=self.step,
                job_secret=self.job_secret,
            ).model_dump_json()
        )
        return self

    def run(self, steps: int) -> None:
        """``steps`` more steps, their records in one batch (a round every period steps)."""
        now = time.time()
        first, self.step = self.step + 1, self.step + steps
        records = [StepRecord(step=s, time=now, step_time=0.01, loss=1.0 / s) for s in range(first, self.step + 1)]
        self.ws.send(MetricsBatch(steps=records).model_dump_json())

    def apply(self, timeout: float = 10.0) -> CommandAck:
        """Wait for the next command, apply it at the current step, report the control event and ack."""
        frame = CommandDelivery.model_validate_json(self.ws.recv(timeout))
        try:
            self.state = cs.apply_command(self.state, frame.command, self.step)
        except cs.CommandRejected as err:
            ack = CommandAck(command_id=frame.id, status="rejected", reason=str(err))
        else:
            view = cs.to_view(self.state)
            event = ControlEvent(step=self.step, control=view)
            self.ws.send(MetricsBatch(control=[event]).model_dump_json())
            ack = CommandAck(command_id=frame.id, status="applied", applied_step=self.step, control=view)
        self.ws.send(ack.model_dump_json())
        return ack

    def checkpoint(self) -> tuple[int, cs.ControlState]:
        return self.step, self.state

    def crash(self) -> None:
        """The process dies: its connection ends abnormally (the job is ``disconnected``, not finished)."""
        self.ws.close(code=1011)

    def resume(self, checkpoint: tuple[int, cs.ControlState]) -> SteppedRank:
        """A new process loaded ``checkpoint`` and says hello (once the old connection is gone)."""
        self.step, self.state = checkpoint
        return self.connect()

    def close(self) -> None:
        self._sockets.close()


def stored_fake_job(url: str, token: str, job_id: str, state: cs.ControlState, **options: Any) -> Iterator[FakeJob]:
    """A started ``FakeJob`` once the server has stored its hello; stopped after, its error checked
    (for ``yield from`` in a pytest fixture)."""
    from avgctl.server.cli.client import Client
    from tests.support.polling import wait_for

    job = FakeJob(url, job_id=job_id, state=state, **options).start()
    api = Client(url, token)
    try:
        wait_for(lambda: api.try_get(f"/api/jobs/{job_id}"), what=f"{job_id} stored")
        yield job
    finally:
        job.stop()
    assert job.error is None, job.error
