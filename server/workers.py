"""Which worker sockets are connected, and sending to a job's rank 0."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from starlette.websockets import WebSocket

log = logging.getLogger(__name__)

# A command send that takes longer than this means rank 0's link is frozen: give up on this
# delivery; the command stays pending and goes out again on the next hello.
SEND_TIMEOUT = 5.0


@dataclass(slots=True, eq=False)
class WorkerConnection:
    job_id: str
    rank: int
    host: str
    pid: int
    websocket: WebSocket


class WorkerRegistry:
    """Live worker connections by ``(job_id, rank)``; used only on the event loop."""

    def __init__(self) -> None:
        self._by_rank: dict[tuple[str, int], WorkerConnection] = {}
        self._tasks: set[asyncio.Task] = set()

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

    def send_to_leader(self, job_id: str, text: str) -> bool:
        """Send ``text`` to the job's rank 0 in the background; False if rank 0 is not connected."""
        conn = self._by_rank.get((job_id, 0))
        if conn is None:
            return False
        task = asyncio.create_task(self._send(conn, text))
        self._tasks.add(task)  # keep a reference until done, or the task may be collected
        task.add_done_callback(self._tasks.discard)
        return True

    @staticmethod
    async def _send(conn: WorkerConnection, text: str) -> None:
        try:
            await asyncio.wait_for(conn.websocket.send_text(text), SEND_TIMEOUT)
        except Exception as err:  # the socket's own handler notices the close and cleans up
            log.info("command not delivered to %s rank 0: %r", conn.job_id, err)

    async def close_all(self, code: int = 1012, reason: str = "server shutting down") -> None:
        for conn in list(self._by_rank.values()):
            try:
                await conn.websocket.close(code, reason)
            except Exception:
                pass
        for task in list(self._tasks):
            task.cancel()
