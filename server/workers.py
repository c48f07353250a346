"""Which worker sockets are connected, sending to a job's rank 0, and telling each rank what is stored."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from starlette.websockets import WebSocket

from avgctl.protocol import CommandDelivery, MetricsStored, close_codes

log = logging.getLogger(__name__)

# A command send that takes longer than this means rank 0's link is frozen: give up on this
# delivery; the command stays pending and goes out again on the next hello.
SEND_TIMEOUT = 5.0
# At most one ``stored`` message per connection this often: the link keeps a batch until then.
ACK_INTERVAL = 0.1


@dataclass(slots=True, eq=False)
class WorkerConnection:
    job_id: str
    rank: int
    host: str
    pid: int
    websocket: WebSocket
    link: str | None = None  # the link's id from its hello
    stored_seq: int = -1  # the highest batch number committed
    acked_seq: int = -1  # the highest one told to the link
    acker: asyncio.Task | None = None
    # A batch of this connection was not stored: nothing more is confirmed on it (a ``stored`` is
    # "every batch up to seq", so it would cover the lost one), and it is being closed with 1011.
    lost: bool = False
    # Command ids sent to this connection (rank 0) and not yet acknowledged on it: an ack for any
    # other id is ignored, and the job's control version may run ahead of the stored one by at
    # most this many (one per applied command).
    delivered: set[int] = field(default_factory=set)


class WorkerRegistry:
    """Live worker connections by ``(job_id, rank)``; used only on the event loop."""

    def __init__(self) -> None:
        self._by_rank: dict[tuple[str, int], WorkerConnection] = {}
        self._tasks: set[asyncio.Task] = set()
        # (job, rank) -> (link id, highest batch number seen): kept across connections, so a batch a
        # link sends again after a reconnect to this same server is known as a repeat.
        self._seen: dict[tuple[str, int], tuple[str, int]] = {}

    def get(self, job_id: str, rank: int) -> WorkerConnection | None:
        return self._by_rank.get((job_id, rank))

    def add(self, conn: WorkerConnection) -> WorkerConnection | None:
        """Register ``conn``; returns the connection it replaces, if any."""
        old = self._by_rank.get((conn.job_id, conn.rank))
        self._by_rank[(conn.job_id, conn.rank)] = conn
        return old

    def remove(self, conn: WorkerConnection) -> bool:
        """Forget ``conn`` unless a newer connection already took its place; True if it was current."""
        if self._by_rank.get((conn.job_id, conn.rank)) is conn:
            del self._by_rank[(conn.job_id, conn.rank)]
            return True
        return False

    def first_sight(self, conn: WorkerConnection, seq: int | None) -> bool:
        """False for a batch this server already had from the same link (sent again after a
        reconnect, its ``stored`` lost): store it again (idempotent), but show and count it once."""
        if seq is None or conn.link is None:
            return True
        key = (conn.job_id, conn.rank)
        seen = self._seen.get(key)
        if seen is not None and seen[0] == conn.link and seq <= seen[1]:
            return False
        self._seen[key] = (conn.link, seq)
        return True

    def stored(self, receipts: list[tuple[WorkerConnection, int]]) -> None:
        """Batches committed: tell their links (at most every ``ACK_INTERVAL`` per connection)."""
        for conn, seq in receipts:
            if conn.lost:
                continue
            if seq > conn.stored_seq:
                conn.stored_seq = seq
            if conn.acker is None and conn.stored_seq > conn.acked_seq:
                conn.acker = self._spawn(self._acknowledge(conn))

    def lost(self, receipts: list[tuple[WorkerConnection, int]]) -> None:
        """Batches the store did not write (its writer fell behind, or its process died): confirm
        nothing more on their connections and close them (1011); their links, which keep every
        batch until it is confirmed, send them again on the next one."""
        for conn in {conn for conn, _ in receipts}:
            if conn.lost:
                continue  # already closing
            conn.lost = True
            self._spawn(self._close(conn, close_codes.INTERNAL_ERROR, "metric batches not stored; send them again"))

    @staticmethod
    async def _close(conn: WorkerConnection, code: int, reason: str) -> None:
        try:
            await asyncio.wait_for(conn.websocket.close(code, reason), SEND_TIMEOUT)
        except Exception as err:  # already closed: the link reconnects and sends them anyway
            log.debug("closing %s rank %d: %r", conn.job_id, conn.rank, err)

    @staticmethod
    async def _acknowledge(conn: WorkerConnection) -> None:
        try:
            while conn.stored_seq > conn.acked_seq and not conn.lost:
                seq = conn.stored_seq
                await asyncio.wait_for(conn.websocket.send_text(MetricsStored(seq=seq).model_dump_json()), SEND_TIMEOUT)
                conn.acked_seq = seq
                await asyncio.sleep(ACK_INTERVAL)  # what commits meanwhile goes in the next one
        except Exception as err:  # closed: the link sends the batches again on its next connection
            log.debug("stored %s rank %d not told: %r", conn.job_id, conn.rank, err)
        finally:
            conn.acker = None

    def send_to_leader(self, job_id: str, delivery: CommandDelivery) -> bool:
        """Send a command to the job's rank 0 in the background; False if rank 0 is not connected.

        Its id counts as delivered to that connection from now on (the ack may come back before
        the send is done), so that connection's ack for it is taken.
        """
        conn = self._by_rank.get((job_id, 0))
        if conn is None:
            return False
        conn.delivered.add(delivery.id)
        self._spawn(self._send(conn, delivery.model_dump_json()))
        return True

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.create_task(coro)
        self._tasks.add(task)  # keep a reference until done, or the task may be collected
        task.add_done_callback(self._tasks.discard)
        return task

    @staticmethod
    async def _send(conn: WorkerConnection, text: str) -> None:
        try:
            await asyncio.wait_for(conn.websocket.send_text(text), SEND_TIMEOUT)
        except Exception as err:  # the socket's own handler notices the close and cleans up
            log.info("command not delivered to %s rank 0: %r", conn.job_id, err)

    async def close_all(self, code: int = close_codes.SERVICE_RESTART, reason: str = "server shutting down") -> None:
        for conn in list(self._by_rank.values()):
            try:
                await conn.websocket.close(code, reason)
            except Exception:
                pass
        for task in list(self._tasks):
            task.cancel()
