"""``connect()``: each rank's websocket link to the avgctl server.

The link runs on its own daemon thread with its own event loop. The training thread only adds
records to the link's ``Outbox`` (``worker/outbox.py``: bounded, numbered batches kept until the
server says they are ``stored``), so training never waits on the network: not when the server is
down at start, killed, restarted or frozen, and a server killed with batches in its socket or its
writer's queue loses none (the store keeps one copy). Rank 0's link is also the averager's
``ControlSource``: commands from the server are queued for it once each (its ``CommandLedger``), and
its acks are sent back from their own queue, never dropped with metrics.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import queue
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Generator
from typing import Any, Protocol

import websockets
from pydantic import TypeAdapter, ValidationError
from websockets.client import backoff
from websockets.exceptions import ConnectionClosed, InvalidStatus

from avgctl.protocol import (
    AveragerConfig,
    CommandAck,
    CommandDelivery,
    ControlEvent,
    ControlView,
    Hello,
    MetricsStored,
    RoundRecord,
    ServerMessage,
    StepRecord,
    WorkerCommand,
    close_codes,
)
from avgctl.protocol.bounds import JobId
from avgctl.protocol.env import SERVER
from avgctl.worker import job_secret
from avgctl.worker.control import drain
from avgctl.worker.dist import WorkerEnv, default_job_id, read_env
from avgctl.worker.ledger import CommandLedger
from avgctl.worker.outbox import MAX_FRAME, Outbox

log = logging.getLogger(__name__)

_JOB_ID = TypeAdapter(JobId)
_SERVER_MESSAGE = TypeAdapter(ServerMessage)
# On close, how long to wait for the server to confirm the last batches (within close's timeout).
_CLOSE_STORED_WAIT = 1.0
_REFUSED_WHY = {
    close_codes.NOT_MEMBER: "this process does not hold the secret the job was first seen with (another job"
    " uses this job id, or the checkpoint that carries the secret is not loaded yet)",
    close_codes.CONFLICT: "this rank is connected from another link (a restarted rank's predecessor whose"
    " connection has not closed yet, or another job using this job id)",
}
# HTTP answers to the websocket upgrade that refuse the token: tried again with backoff, since the
# token may become right (a server restarted with the token it had, a fixed configuration).
_UNAUTHORIZED = frozenset({401, 403})
_UNAUTHORIZED_WHY = (
    "the server was likely restarted with a new token (one it generated, or another AVGCTL_TOKEN), or this"
    " link's token (token=, AVGCTL_TOKEN) is not the server's worker token"
)


class Averager(Protocol):
    """What the link needs from an averager (``PeriodicAverager``, ``HierarchicalAverager``)."""

    rank: int
    world_size: int
    step: int
    job_secret: str | None  # read at every hello: a checkpoint loaded after connect() counts from the next one

    def hello_config(self) -> AveragerConfig: ...
    def control_view(self) -> ControlView: ...
    def add_listener(self, listener: Any) -> None: ...
    def remove_listener(self, listener: Any) -> None: ...
    def set_control_source(self, source: Any) -> None: ...


def worker_url(server: str) -> str:
    """``http://host:port`` (or ``ws://``) -> ``ws://host:port/ws/worker``."""
    parts = urllib.parse.urlsplit(server)
    scheme = {"http": "ws", "https": "wss", "ws": "ws", "wss": "wss"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"server must be an http(s):// or ws(s):// URL, got {server!r}")
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + "/ws/worker", "", ""))


class WorkerLink:
    """One rank's connection to the server; made by :func:`connect`.

    Args:
        averager: the averager whose steps, rounds and control changes are sent.
        server: the server URL, e.g. ``http://127.0.0.1:8000``.
        job_id: the job this rank belongs to (the same on every rank).
        token: a worker (or control) token, sent as ``Authorization: Bearer``.
        max_records: step records kept while the server is away; the oldest go first. Sent batches
            the server has not confirmed are kept too, up to twice as many records.
        send_interval: seconds between metric batches (acks go out at once).
        reconnect_delays: the ``websockets`` backoff generator factory (default: 0.5 s up to 10 s).
        refused_delays: the same for a hello the server refused (4403 not a process of this job,
            4409 rank connected from elsewhere): default 1 s up to 30 s.
        unauthorized_delays: the same for an upgrade the server answered 401 or 403 (it refused
            the token): default 1 s doubling up to 60 s. Training goes on meanwhile, its records
            buffered as while the server is down.

    The hello carries ``averager.job_secret`` (one is made when the averager has none: a link made
    without :func:`connect`, for one process).
    """

    def __init__(
        self,
        averager: Averager,
        server: str,
        job_id: str,
        token: str | None = None,
        *,
        host: str,
        pid: int,
        max_records: int = 10_000,
        send_interval: float = 0.25,
        reconnect_delays: Callable[[], Generator[float]] | None = None,
        refused_delays: Callable[[], Generator[float]] | None = None,
        unauthorized_delays: Callable[[], Generator[float]] | None = None,
    ):
        self.averager = averager
        self.url = worker_url(server)
        self.job_id = _JOB_ID.validate_python(job_id)
        self.rank = averager.rank
        self.world_size = averager.world_size
        self.host = host
        self.pid = pid
        self.send_interval = send_interval
        self._token = token
        self._delays = reconnect_delays or functools.partial(backoff, initial_delay=0.5, min_delay=0.5, max_delay=10.0)
        self._refused_delays = refused_delays or functools.partial(
            backoff, initial_delay=1.0, min_delay=1.0, max_delay=30.0
        )
        self._unauthorized_delays = unauthorized_delays or functools.partial(
            backoff, initial_delay=1.0, min_delay=1.0, max_delay=60.0, factor=2.0
        )
        if getattr(averager, "job_secret", None) is None:
            averager.job_secret = job_secret.new_secret()
        self._outbox = Outbox(max_records)
        self._id = uuid.uuid4().hex  # tells the server which batch numbers it may already have
        self._all_stored = asyncio.Event()
        # Rank 0's control source.
        self._inbox: queue.SimpleQueue[tuple[int, WorkerCommand]] = queue.SimpleQueue()
        self._arrived = threading.Event()
        self._acks_out: collections.deque[CommandAck] = collections.deque()
        self._ledger = CommandLedger()  # ids queued for the averager, and the acks sent for them
        self.connected = threading.Event()
        """Set while a session with the server is open (after our hello went out)."""
        self.error: BaseException | None = None
        """Why the link gave up for good (an upgrade answered with another HTTP error than 401/403,
        a hello closed with 1008 or 1009), else None."""
        self.refused: tuple[int, str] | None = None
        """The close code and reason of the last hello the server refused (4403, 4409) while the link
        tries again; None once a session ends any other way."""
        self.unauthorized: tuple[int, str] | None = None
        """The HTTP status (401, 403) and body of the last upgrade the server refused for the token
        while the link tries again; None once the server takes the token."""
        self._loop = asyncio.new_event_loop()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"avgctl-link-rank{self.rank}", daemon=True)
        averager.add_listener(self)
        if self.rank == 0:
            averager.set_control_source(self)
        self._thread.start()

    @property
    def unconfirmed(self) -> int:
        """Metric records sent (or about to be) that the server has not yet confirmed as stored."""
        return self._outbox.unconfirmed

    @property
    def dropped(self) -> int:
        """Metric records dropped so far: a buffer was full, or a batch the server never confirmed
        was pushed out of the resend buffer (it may have been stored). Sent as ``dropped``."""
        return self._outbox.dropped

    # ------------------------------------------------------------ listener (training thread, O(1))
    # No wake-up: the link collects the outbox every send_interval.

    def on_step(self, record: StepRecord) -> None:
        self._outbox.add_step(record)

    def on_round(self, record: RoundRecord) -> None:
        self._outbox.add_round(record)

    def on_control(self, event: ControlEvent) -> None:
        self._outbox.add_control(event)

    # ------------------------------------------------------------ ControlSource (rank 0)

    def poll(self) -> list[tuple[int, WorkerCommand]]:
        """Commands received since the last poll, in arrival order."""
        self._arrived.clear()
        return drain(self._inbox)

    def wait(self, timeout: float) -> None:
        """Block up to ``timeout`` seconds, returning early when a command arrives."""
        self._arrived.wait(timeout)

    def report(self, ack: CommandAck) -> None:
        """Queue an ack for the server (kept until sent, whatever the metric buffers do)."""
        self._acks_out.append(ack)
        self._call_soon(self._wake.set)

    # ------------------------------------------------------------ lifecycle

    def close(self, timeout: float = 2.0) -> None:
        """Send what is buffered if connected and wait (up to 1 s) for the server to confirm it is
        stored, all within ``timeout`` seconds; then close the link."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self.averager.remove_listener(self)
        self._call_soon(self._stopping.set)
        self._thread.join(timeout)
        if self._thread.is_alive():  # frozen server: stop waiting for it
            self._call_soon(self._cancel_all)
            self._thread.join(1.0)

    def __enter__(self) -> WorkerLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call_soon(self, fn: Callable[[], Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the loop already ended
            self._loop.call_soon_threadsafe(fn)

    def _cancel_all(self) -> None:
        for task in asyncio.all_tasks(self._loop):
            task.cancel()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        except asyncio.CancelledError:
            pass
        finally:
            self.connected.clear()
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    async def _main(self) -> None:
        main = asyncio.create_task(self._connect_loop())
        stop = asyncio.create_task(self._stopping.wait())
        await asyncio.wait({main, stop}, return_when=asyncio.FIRST_COMPLETED)
        if not main.done() and not self.connected.is_set():
            main.cancel()  # stopping while (re)connecting: nothing to flush into
        with contextlib.suppress(asyncio.CancelledError):
            await main
        stop.cancel()

    async def _connect_loop(self) -> None:
        unauthorized: Generator[float] | None = None
        while True:
            try:
                await self._connections()
                return
            except InvalidStatus as err:
                status = err.response.status_code
                if status not in _UNAUTHORIZED:
                    self.error = err
                    log.error("avgctl server refused rank %d: HTTP %d", self.rank, status)
                    return
                # Not fatal either: training goes on (records are buffered) and the link gets in
                # once the server takes the token again, e.g. restarted with the token it had.
                if self.unauthorized is None:  # the first refusal since a connection opened
                    unauthorized = self._unauthorized_delays()
                delay = next(unauthorized)
                self.unauthorized = (status, _body_text(err))
                log.warning(
                    "avgctl server refused the token of rank %d of job %s (HTTP %d %s): %s; trying again in %.1f s",
                    self.rank,
                    self.job_id,
                    status,
                    self.unauthorized[1],
                    _UNAUTHORIZED_WHY,
                    delay,
                )
                await asyncio.sleep(delay)
            except Exception as err:  # never let the link's failure reach training
                self.error = err
                log.exception("avgctl link of rank %d stopped", self.rank)
                return

    async def _connections(self) -> None:
        """Connect, and reconnect after each session, until stopping (returns) or a final refusal
        (returns, ``self.error`` set); an upgrade answered with an HTTP error raises ``InvalidStatus``."""
        headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
        refusals: Generator[float] | None = None
        async for ws in websockets.connect(
            self.url,
            additional_headers=headers,
            open_timeout=5,
            ping_interval=5,
            ping_timeout=10,  # a frozen server is noticed within ~15 s and we reconnect
            close_timeout=1,
            max_size=MAX_FRAME,
            reconnect_delays=self._delays,
        ):
            self.unauthorized = None  # the server took the token
            try:
                await self._session(ws)
                return  # stopping: flushed and closed
            except ConnectionClosed as err:
                if ws.close_code in close_codes.WORKER_FATAL:
                    self.error = err
                    log.error("avgctl server refused rank %d: %s %s", self.rank, ws.close_code, ws.close_reason)
                    return
                if ws.close_code in close_codes.WORKER_REFUSED:
                    # Not fatal: the job's secret may come later with a checkpoint, and a
                    # restarted rank's predecessor stays registered until its socket closes.
                    refusals = refusals or self._refused_delays()
                    delay = next(refusals)
                    self.refused = (ws.close_code, ws.close_reason or "")
                    log.warning(
                        "avgctl server refused rank %d of job %s (%d %s): %s; trying again in %.1f s",
                        self.rank,
                        self.job_id,
                        ws.close_code,
                        ws.close_reason,
                        _REFUSED_WHY[ws.close_code],
                        delay,
                    )
                    await asyncio.sleep(delay)
                    continue
                refusals, self.refused = None, None
                log.info("avgctl link of rank %d lost (%s); reconnecting", self.rank, err)

    async def _session(self, ws: Any) -> None:
        hello = Hello(
            job_id=self.job_id,
            rank=self.rank,
            world_size=self.world_size,
            host=self.host,
            pid=self.pid,
            config=self.averager.hello_config(),
            control=self.averager.control_view(),
            step=self.averager.step,
            link=self._id,
            job_secret=self.averager.job_secret,
        )
        await ws.send(hello.model_dump_json())
        self.connected.set()
        receiver = asyncio.create_task(self._receive(ws))
        last_metrics = 0.0
        sent_through = -1  # the last batch sent on this connection: a new one sends every unconfirmed batch
        try:
            while True:
                await self._send_acks(ws)
                stopping = self._stopping.is_set()
                now = time.monotonic()
                if stopping or now - last_metrics >= self.send_interval:
                    last_metrics = now
                    sent_through = await self._send_metrics(ws, sent_through)
                if stopping:
                    await self._send_acks(ws)
                    await self._await_stored(receiver)
                    await ws.close(1000, "done")
                    return
                wake = asyncio.create_task(self._wake.wait())
                stop = asyncio.create_task(self._stopping.wait())
                timeout = max(0.0, self.send_interval - (time.monotonic() - last_metrics))
                done, _ = await asyncio.wait(
                    {wake, stop, receiver}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                wake.cancel()
                stop.cancel()
                self._wake.clear()
                if receiver in done:
                    receiver.result()  # raises ConnectionClosedError
                    raise ConnectionClosed(None, None)  # the server closed normally: reconnect anyway
        finally:
            self.connected.clear()
            receiver.cancel()
            with contextlib.suppress(BaseException):
                await receiver

    async def _send_acks(self, ws: Any) -> None:
        while self._acks_out:
            ack = self._acks_out[0]
            await ws.send(ack.model_dump_json())
            self._acks_out.popleft()  # only once sent: a failed send leaves it for the next session
            self._ledger.remember(ack)

    async def _send_metrics(self, ws: Any, sent_through: int) -> int:
        """Batch what the outbox holds, then send every unconfirmed batch after ``sent_through``."""
        if self._outbox.pack():
            self._all_stored.clear()
        for batch in self._outbox.after(sent_through):
            await ws.send(batch.text)
            sent_through = batch.seq
        return sent_through

    def _confirm(self, stored: MetricsStored) -> None:
        self._outbox.confirm(stored.seq)
        if self._outbox.all_stored:
            self._all_stored.set()

    async def _await_stored(self, receiver: asyncio.Task) -> None:
        """On close: wait (briefly) until the server confirms every batch, so none is in flight."""
        if self._outbox.all_stored:
            return
        stored = asyncio.create_task(self._all_stored.wait())
        await asyncio.wait({stored, receiver}, timeout=_CLOSE_STORED_WAIT, return_when=asyncio.FIRST_COMPLETED)
        stored.cancel()
        if not self._outbox.all_stored:
            log.info("avgctl link of rank %d closes with %d records unconfirmed", self.rank, self._outbox.unconfirmed)

    async def _receive(self, ws: Any) -> None:
        async for text in ws:
            try:
                message = _SERVER_MESSAGE.validate_json(text)
            except ValidationError as err:
                log.warning("avgctl: ignoring a message the link does not understand: %s", err)
                continue
            if isinstance(message, MetricsStored):
                self._confirm(message)
            elif self.rank == 0:
                self._deliver(message)

    def _deliver(self, delivery: CommandDelivery) -> None:
        ack = self._ledger.ack_for(delivery.id)
        if ack is not None:  # re-delivered after a reconnect: answer, never re-queue
            self._acks_out.append(ack)
            self._wake.set()
        elif self._ledger.take(delivery.id):  # also queued once only while the averager is busy
            self._inbox.put((delivery.id, delivery.command))
            self._arrived.set()


def _body_text(err: InvalidStatus, limit: int = 200) -> str:
    """The server's reason for refusing an upgrade (its answer's body), short and on one line."""
    body = err.response.body or b""
    return " ".join(body[:limit].decode(errors="replace").split())


def connect(
    averager: Averager,
    server: str | None = None,
    job_id: str | None = None,
    token: str | None = None,
    **options: Any,
) -> WorkerLink:
    """Link this rank's ``averager`` to the avgctl server (call it on every rank).

    Args:
        averager: a ``PeriodicAverager`` or ``HierarchicalAverager``.
        server: server URL; defaults to ``AVGCTL_SERVER``.
        job_id: defaults to torchrun's ``TORCHELASTIC_RUN_ID``; without one, rank 0 generates an id
            and shares it with the other ranks (one ``broadcast_object_list`` over the default
            process group, so every rank must call ``connect``).
        token: worker token; defaults to ``AVGCTL_TOKEN``.
        options: passed to :class:`WorkerLink` (``max_records``, ``send_interval``, ...).

    The ranks agree on the job's secret (``avgctl.worker.job_secret.agree``, no collective: the
    averager's own from a checkpoint, if the job's store has none yet) and keep it in
    ``averager.job_secret``: it is what proves to the server that they are the job's ranks.

    Returns the running link; ``link.close()`` (or ``with connect(...)``) flushes and stops it.
    """
    env = read_env()
    server = server or env.server
    if not server:
        raise ValueError(f"no avgctl server: pass server= or set {SERVER}")
    job_id = job_id or env.run_id or _shared_job_id(env)
    averager.job_secret = job_secret.agree(_JOB_ID.validate_python(job_id), getattr(averager, "job_secret", None))
    return WorkerLink(averager, server, job_id, token or env.token, host=env.host, pid=os.getpid(), **options)


def _shared_job_id(env: WorkerEnv) -> str:
    import torch.distributed as dist

    job_id = default_job_id(env)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [job_id if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(box, src=0)
        job_id = box[0]
    return job_id
