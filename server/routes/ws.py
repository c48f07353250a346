"""Websockets: ``/ws/worker`` (ingest from training ranks) and ``/ws/jobs/{job_id}`` (dashboards).

Close codes: ``avgctl.protocol.close_codes``.

Batches that carry a ``seq`` are answered with ``stored`` once committed (see ``workers.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from pydantic import TypeAdapter, ValidationError

from avgctl.protocol import CommandAck, Hello, MetricsBatch, WorkerMessage, close_codes
from avgctl.protocol.bounds import JOB_ID_MAX_LENGTH, JOB_ID_PATTERN
from avgctl.server.deps import (
    AutopilotDep,
    CommandsDep,
    HubDep,
    SettingsDep,
    StoreDep,
    WorkersDep,
)
from avgctl.server.hub import serve_client
from avgctl.server.records import (
    EncodedBatch,
    Received,
    decode_metrics,
    encode,
    received,
)
from avgctl.server.store import Store, writes
from avgctl.server.workers import WorkerConnection

log = logging.getLogger(__name__)
router = APIRouter(tags=["websockets"])

_WORKER_MESSAGE = TypeAdapter(WorkerMessage)
HELLO_TIMEOUT = 10.0


class _Refuse(Exception):
    """Close the worker's socket with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _short(reason: str) -> str:
    # A close reason must fit in 123 bytes of UTF-8.
    data = reason.encode()[:120]
    return data.decode(errors="ignore")


def _explain(err: ValidationError) -> str:
    first = err.errors(include_url=False)[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"invalid message: {where}: {first['msg']}" if where else f"invalid message: {first['msg']}"


async def _receive(websocket: WebSocket, max_bytes: int) -> Hello | Received | CommandAck:
    """The next worker message, validated; ``WebSocketDisconnect`` when the worker leaves."""
    message = await websocket.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000), message.get("reason"))
    data = message.get("text")
    if data is None:
        data = message.get("bytes") or b""
    if len(data) > max_bytes:
        raise _Refuse(close_codes.TOO_BIG, f"frame larger than {max_bytes} bytes")
    batch = decode_metrics(data)  # nearly every frame; the rest goes to the models
    if batch is not None:
        return batch
    try:
        message = _WORKER_MESSAGE.validate_json(data)
    except ValidationError as err:
        if any(e["type"] == "json_invalid" for e in err.errors()):
            raise _Refuse(close_codes.POLICY, "malformed JSON") from None
        raise _Refuse(close_codes.POLICY, _explain(err)) from None
    return received(message) if isinstance(message, MetricsBatch) else message


@router.websocket("/ws/worker")
async def worker_ingest(
    websocket: WebSocket,
    store: StoreDep,
    hub: HubDep,
    commands: CommandsDep,
    workers: WorkersDep,
    settings: SettingsDep,
    autopilot: AutopilotDep,
) -> None:
    """Ingest from one rank: ``hello`` first, then ``metrics`` batches and (rank 0) command ``ack``s."""
    await websocket.accept()
    conn: WorkerConnection | None = None
    normal = False
    try:
        try:
            hello = await asyncio.wait_for(_receive(websocket, settings.max_frame_bytes), HELLO_TIMEOUT)
        except asyncio.TimeoutError:
            raise _Refuse(close_codes.POLICY, f"no hello within {HELLO_TIMEOUT:.0f}s") from None
        if not isinstance(hello, Hello):
            raise _Refuse(close_codes.POLICY, "the first frame must be a hello")
        if hello.rank >= hello.world_size:
            raise _Refuse(close_codes.POLICY, f"rank {hello.rank} is not below world size {hello.world_size}")
        conn, restore = await _register(websocket, hello, store, workers)
        if restore is not None:
            commands.announce_restore(restore)
        await autopilot.on_hello(hello)
        if hello.rank == 0:
            await commands.deliver_pending(hello.job_id)
        commands.announce_job(hello.job_id)
        while True:
            msg = await _receive(websocket, settings.max_frame_bytes)
            if isinstance(msg, Received):
                batch = encode(msg)  # once, for the store and the dashboards
                if workers.first_sight(conn, msg.seq):  # a repeat is stored again, shown and counted once
                    autopilot.on_metrics(conn.job_id, conn.rank, msg)  # arithmetic; acts through tasks
                    hub.publish_metrics(conn.job_id, conn.rank, batch)
                await _store(batch, msg.seq, conn, store, commands, workers)
            elif isinstance(msg, CommandAck):
                if conn.rank != 0:
                    raise _Refuse(close_codes.POLICY, "only rank 0 acknowledges commands")
                await commands.on_ack(conn, msg)
            else:
                raise _Refuse(close_codes.POLICY, "hello sent twice on one connection")
    except WebSocketDisconnect as err:
        normal = err.code in (1000, 1001)
    except _Refuse as err:
        log.info("worker connection refused: %s", err.reason)
        with contextlib.suppress(Exception):
            await websocket.close(err.code, _short(err.reason))
    finally:
        if conn is not None and workers.remove(conn):
            await commands.on_disconnect(conn.job_id, conn.rank, normal)


def _check_live_rank(hello: Hello, workers) -> None:
    """Refuse (4409) a hello for a connected rank unless it comes from that connection's own link:
    the link's id is never disclosed, so only the link itself can replace its stale connection.
    (The job's secret is checked by the store.) The reason names no host, pid or world size."""
    current = workers.get(hello.job_id, hello.rank)
    if current is not None and (hello.link is None or current.link != hello.link):
        raise _Refuse(close_codes.CONFLICT, f"rank {hello.rank} of this job is connected from another link")


async def _register(
    websocket: WebSocket, hello: Hello, store: Store, workers
) -> tuple[WorkerConnection, writes.Restore | None]:
    """Store the hello and register the connection; what a restore it brought undid, if any."""
    _check_live_rank(hello, workers)
    now = time.time()
    try:
        restore = await store.write(lambda c: writes.hello(c, hello, now))
    except writes.NotMember as err:
        raise _Refuse(close_codes.NOT_MEMBER, str(err)) from None
    except writes.Conflict as err:
        raise _Refuse(close_codes.POLICY, str(err)) from None
    _check_live_rank(hello, workers)  # another link may have registered while the store wrote
    conn = WorkerConnection(hello.job_id, hello.rank, hello.host, hello.pid, websocket, hello.link)
    old = workers.add(conn)
    if old is not None:
        with contextlib.suppress(Exception):
            await old.websocket.close(close_codes.REPLACED, "replaced by a newer connection of the same link")
    return conn, restore


async def _store(batch: EncodedBatch, seq: int | None, conn: WorkerConnection, store: Store, commands, workers) -> None:
    """Store a batch; its ``seq`` (if any) is acknowledged once committed."""
    if batch.control and conn.rank == 0:
        # A control change is rare and changes the job: wait for it, then tell dashboards. Its
        # version can be past the stored one by the commands delivered and not yet acknowledged.
        now, ahead = time.time(), len(conn.delivered)
        await store.write(lambda c: writes.write_metrics(c, conn.job_id, conn.rank, batch, now, max_ahead=ahead))
        commands.announce_job(conn.job_id)
        if seq is not None:
            workers.stored([(conn, seq)])
    else:
        # Never waits; counted if dropped. The receipt comes back through store.on_stored.
        store.add_metrics(conn.job_id, conn.rank, batch, None if seq is None else (conn, seq))


@router.websocket("/ws/jobs/{job_id}")
async def dashboard(websocket: WebSocket, job_id: str, store: StoreDep, hub: HubDep, settings: SettingsDep) -> None:
    """A dashboard's stream: ``snapshot`` first, then live ``metrics_batch``, ``job`` and ``command`` messages."""
    await websocket.accept()
    # Checked here, not in the path, so a bad id gets a close code with a reason, not a bare 403.
    if len(job_id) > JOB_ID_MAX_LENGTH or not re.fullmatch(JOB_ID_PATTERN, job_id):
        await websocket.close(close_codes.POLICY, "invalid job id")
        return
    if await asyncio.to_thread(store.get_job, job_id) is None:
        await websocket.close(close_codes.NO_JOB, _short(f"no job {job_id!r}"))
        return

    async def snapshot() -> str:
        def build() -> str:
            return store.snapshot_json(job_id, settings.snapshot_records) or "null"

        return await asyncio.to_thread(build)

    await serve_client(hub, job_id, websocket, snapshot)
    with contextlib.suppress(Exception):
        await websocket.close(close_codes.TOO_SLOW, "dashboard fell behind")
