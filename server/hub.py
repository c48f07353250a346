"""Fan-out of live updates to dashboard websockets.

Ingest only appends records' JSON texts (encoded once, ``records.py``) to per-job buffers (O(1),
no awaiting); a ticker coalesces them every ``interval`` seconds into one ``metrics_batch``
message per job (every rank's records since the last tick), spliced once, and puts the same text
in every client's bounded queue. Each
client has its own sender task, so a slow client skips messages (oldest metrics first) or is
dropped; it never slows ingest or other clients.

A rank's step records are thinned evenly beyond ``live_steps`` per second, its newest always kept
and its frame item saying how many steps each stands for (the store keeps them all): a chart gains
nothing from more points than it has pixels, and without a bound a fast job would send every
dashboard megabytes a second, which the browser has to parse and the server's one core has to
send, once per client.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket

from avgctl.server.records import EncodedBatch, json_text

log = logging.getLogger(__name__)

# Records buffered per rank between two ticks; beyond this the oldest go (the store keeps them all).
_MAX_PENDING_RECORDS = 5000
# A client whose send takes longer than this is considered stuck and is dropped.
_SEND_TIMEOUT = 5.0


class Thinned:
    """At most ``cap`` of the items offered, evenly spaced from the first, and the newest one
    (a live view's most important point: where the rank is now).

    Keeps every ``stride``-th item offered; when that would exceed ``cap`` it drops every other
    kept item and doubles the stride, so the cost per item stays O(1) however many arrive.
    """

    __slots__ = ("cap", "items", "offered", "stride", "newest")

    def __init__(self, cap: int):
        self.cap = cap
        self.items: list[str] = []
        self.offered = 0
        self.stride = 1
        self.newest: str | None = None  # the newest item offered, when it was not kept

    def extend(self, texts: list[str]) -> None:
        if not texts:
            return
        if self.stride == 1 and len(self.items) + len(texts) <= self.cap:  # the common case
            self.items.extend(texts)
            self.offered += len(texts)
            self.newest = None
            return
        for text in texts:
            self.newest = text
            if self.offered % self.stride == 0:
                if len(self.items) == self.cap:
                    del self.items[1::2]
                    self.stride *= 2
                if self.offered % self.stride == 0:
                    self.items.append(text)
                    self.newest = None
            self.offered += 1

    def kept(self) -> list[str]:
        return self.items if self.newest is None else [*self.items, self.newest]

    def weight(self) -> float:
        """How many items offered each kept one stands for."""
        kept = len(self.items) + (self.newest is not None)
        return self.offered / kept if kept else 1.0


@dataclass(slots=True)
class _Pending:
    """One rank's records since the last tick, as JSON texts."""

    steps: Thinned
    rounds: collections.deque = field(default_factory=lambda: collections.deque(maxlen=_MAX_PENDING_RECORDS))
    control: list = field(default_factory=list)


class DashboardClient:
    """One dashboard websocket: a bounded queue of ready-to-send texts and the task that sends them."""

    def __init__(self, websocket: WebSocket, max_queue: int):
        self.websocket = websocket
        self.max_queue = max_queue
        self.skipped = 0  # messages dropped because this client fell behind
        self._queue: collections.deque[tuple[bool, str]] = collections.deque()
        self._ready = asyncio.Event()

    def put(self, text: str, droppable: bool) -> None:
        self._queue.append((droppable, text))
        if len(self._queue) > self.max_queue:
            self._shed()
        self._ready.set()

    def put_first(self, text: str) -> None:
        """Queue ``text`` ahead of everything else (the snapshot)."""
        self._queue.appendleft((False, text))
        self._ready.set()

    def _shed(self) -> None:
        # Drop the oldest metrics first; job and command messages carry state, keep them if we can.
        kept: collections.deque[tuple[bool, str]] = collections.deque()
        excess = len(self._queue) - self.max_queue
        for item in self._queue:
            if excess > 0 and item[0]:
                excess -= 1
                self.skipped += 1
            else:
                kept.append(item)
        while len(kept) > self.max_queue:  # all state messages: the oldest state is stale anyway
            kept.popleft()
            self.skipped += 1
        self._queue = kept

    async def run(self) -> None:
        """Send queued texts until the socket fails or a send takes too long."""
        try:
            while True:
                await self._ready.wait()
                self._ready.clear()
                while self._queue:
                    _, text = self._queue.popleft()
                    await asyncio.wait_for(self.websocket.send_text(text), _SEND_TIMEOUT)
        except (asyncio.TimeoutError, OSError, RuntimeError) as err:
            log.info("dashboard client dropped: %r", err)
        except Exception as err:  # a closed socket surfaces as various starlette/uvicorn errors
            log.info("dashboard client dropped: %r", err)


class Hub:
    """Per-job subscriptions of dashboard clients, fed by ingest and the command service."""

    def __init__(self, interval: float = 0.05, max_queue: int = 100, live_steps: int = 200):
        self.interval = interval
        self.max_queue = max_queue
        # Step records per rank per tick; at least one, so every rank's progress shows.
        self.steps_per_tick = max(1, math.ceil(live_steps * interval - 1e-9))
        self._clients: dict[str, set[DashboardClient]] = collections.defaultdict(set)
        self._pending: dict[str, dict[int, _Pending]] = collections.defaultdict(dict)
        self._wake = asyncio.Event()

    def subscribe(self, job_id: str, websocket: WebSocket) -> DashboardClient:
        client = DashboardClient(websocket, self.max_queue)
        self._clients[job_id].add(client)
        return client

    def unsubscribe(self, job_id: str, client: DashboardClient) -> None:
        clients = self._clients.get(job_id)
        if clients is not None:
            clients.discard(client)
            if not clients:
                del self._clients[job_id]

    def clients(self, job_id: str) -> int:
        return len(self._clients.get(job_id, ()))

    def publish_metrics(self, job_id: str, rank: int, batch: EncodedBatch) -> None:
        """Buffer a worker's batch for the next tick (only if someone is watching the job)."""
        if job_id not in self._clients:
            return
        pending = self._pending[job_id].get(rank)
        if pending is None:
            pending = self._pending[job_id][rank] = _Pending(Thinned(self.steps_per_tick))
        pending.steps.extend([body for _, body in batch.steps])
        pending.rounds.extend(body for _, _, body in batch.rounds)
        pending.control.extend(e.model_dump_json() for e in batch.control)
        self._wake.set()

    def publish(self, job_id: str, message: dict[str, Any]) -> None:
        """Send a state message (``job``, ``command``) to every client of the job at once."""
        clients = self._clients.get(job_id)
        if not clients:
            return
        text = json_text(message)  # a job's non-finite divergence as a string: the page must parse it
        for client in clients:
            client.put(text, droppable=False)

    async def run(self) -> None:
        """The ticker: coalesce buffered metrics at most every ``interval`` seconds."""
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            started = loop.time()
            self._flush()
            # Sleep the rest of the interval so bursts coalesce into one send per rank.
            await asyncio.sleep(max(0.0, self.interval - (loop.time() - started)))

    def _flush(self) -> None:
        pending, self._pending = self._pending, collections.defaultdict(dict)
        for job_id, ranks in pending.items():
            clients = self._clients.get(job_id)
            if not clients:
                continue
            text = metrics_text(ranks)
            for client in clients:
                client.put(text, droppable=True)


def metrics_text(ranks: dict[int, _Pending]) -> str:
    """One ``metrics_batch`` frame for a job (``DashboardMetrics``): every rank's buffered records,
    in rank order, spliced from the texts encoded on ingest."""
    items = []
    for rank, p in sorted(ranks.items()):
        steps, rounds, control = ",".join(p.steps.kept()), ",".join(p.rounds), ",".join(p.control)
        weight = repr(p.steps.weight())  # a float's repr is its JSON
        items.append(
            f'{{"rank":{rank},"steps":[{steps}],"step_weight":{weight},"rounds":[{rounds}],"control":[{control}]}}'
        )
    return f'{{"kind":"metrics_batch","items":[{",".join(items)}]}}'


async def serve_client(hub: Hub, job_id: str, websocket: WebSocket, snapshot: Callable[[], Awaitable[str]]) -> None:
    """Register a dashboard socket, send its snapshot first, then live messages until it closes.

    The client subscribes before the snapshot is read, so nothing falls between the two; the
    dashboard may see a record in both and merges by (rank, step).
    """
    client = hub.subscribe(job_id, websocket)
    tasks: list[asyncio.Task] = []
    try:
        text = await snapshot()
        client.put_first(text)
        tasks = [
            asyncio.create_task(client.run()),
            # We read only to notice the browser leaving; dashboards send nothing we need.
            asyncio.create_task(_drain(websocket)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        hub.unsubscribe(job_id, client)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task


async def _drain(websocket: WebSocket) -> None:
    with contextlib.suppress(Exception):
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
