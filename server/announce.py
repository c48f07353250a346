"""Job-state messages to dashboards, coalesced per job.

A job's state changes in bursts: 64 ranks say hello or leave within milliseconds, and reading the
job (every rank's row) and sending it to every dashboard on each change would be O(ranks²) work
that stalls ingest right when a job starts or ends. So a change only marks the job; one task
per job reads and publishes the latest state, and reads again if more changes arrived meanwhile.
So every change is followed by a message showing it (or a newer state), and a burst costs a few.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging

from avgctl.server.hub import Hub
from avgctl.server.store import Store

log = logging.getLogger(__name__)


class JobAnnouncer:
    """``announce(job_id)`` never waits; ``close()`` cancels what is in flight."""

    def __init__(self, store: Store, hub: Hub):
        self.store = store
        self.hub = hub
        self._dirty: set[str] = set()
        self._tasks: dict[str, asyncio.Task] = {}
        self._closed = False

    def announce(self, job_id: str) -> None:
        """Have the job's dashboards (if any) get its current state soon."""
        if self._closed or not self.hub.clients(job_id):
            return
        self._dirty.add(job_id)
        running = self._tasks.get(job_id)
        if running is None or running.done():  # a done task may still wait for its callback
            task = asyncio.get_running_loop().create_task(self._publish(job_id), name=f"avgctl-announce-{job_id}")
            self._tasks[job_id] = task
            task.add_done_callback(functools.partial(self._forget, job_id))

    def _forget(self, job_id: str, task: asyncio.Task) -> None:
        if self._tasks.get(job_id) is task:
            del self._tasks[job_id]

    async def _publish(self, job_id: str) -> None:
        while job_id in self._dirty:
            self._dirty.discard(job_id)  # a change from here on is read by the next pass
            try:
                job = await asyncio.to_thread(self.store.get_job, job_id)
            except Exception:
                log.exception("reading job %s for its dashboards failed", job_id)
                return
            if job is not None:
                self.hub.publish(job_id, {"kind": "job", "job": job.model_dump(mode="json")})

    async def close(self) -> None:
        self._closed = True  # handlers still closing (the store closes next) announce nothing more
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
