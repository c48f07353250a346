"""SQLite store (WAL): jobs, ranks, metric series, control events and the command log.

``Store`` is the one object the server holds; the package's modules each do one job:

- ``writer``: the writer thread and its op queue (every write, in order, one transaction per burst),
  and the hand-off of ingest's metric batches to
- ``process``: the writer process, which commits them off the server's GIL (stdlib only);
- ``schema``: the tables and their numbered migrations (``PRAGMA user_version``);
- ``writes``: the write operations (hello, disconnect, metrics, commands, autotune), run on the writer;
- ``reads``: jobs, commands, metric series, the dashboard's snapshot, Prometheus figures;
- ``retention``: old metric records thinned, so the file stops growing.

Callers queue writes as functions of the writer's connection:
``await store.write(lambda conn: st.hello(conn, msg, now))``.
"""

from __future__ import annotations

import concurrent.futures
import sqlite3
import time
from collections.abc import Callable
from typing import Any, TypeVar

from avgctl.server.api import CommandOut, JobDetail, JobOut
from avgctl.server.records import EncodedBatch
from avgctl.server.store import history, process, reads, schema, writes
from avgctl.server.store.reads import Readers
from avgctl.server.store.retention import Retention
from avgctl.server.store.schema import NewerSchema
from avgctl.server.store.writer import Writer
from avgctl.server.store.writes import (
    Conflict,
    InapplicableCommand,
    JobFinished,
    UnknownJob,
    disconnect,
    hello,
    insert_command,
    metric_entry,
    report_autotune,
    resolve_command,
    set_autotune,
    write_metric_batches,
    write_metrics,
)

__all__ = [
    "Conflict",
    "InapplicableCommand",
    "JobFinished",
    "NewerSchema",
    "Retention",
    "Store",
    "UnknownJob",
    "disconnect",
    "hello",
    "insert_command",
    "metric_entry",
    "report_autotune",
    "resolve_command",
    "set_autotune",
    "write_metric_batches",
    "write_metrics",
]

T = TypeVar("T")


class Store:
    """The server's persistent state; ``start()`` before use, ``close()`` to flush and stop."""

    add_metrics: Callable[[str, int, EncodedBatch, Any], bool]
    """Queue a metric batch without waiting (``Writer.add_metrics``): False, and counted in
    ``dropped_batches``, when the writer is too far behind."""

    def __init__(
        self,
        path: str,
        metrics_queue: int = 10_000,
        retention_steps: int | None = None,
        history_records: int = 5_000,
        prune_interval: float = 1.0,
    ):
        if path == ":memory:" or path.startswith("file::memory:"):
            raise ValueError("the store needs a file: the writer and readers use separate connections")
        if retention_steps is not None and retention_steps < 1:
            raise ValueError("retention_steps must be positive (or None to keep everything)")
        if history_records < 1:
            raise ValueError("history_records must be positive")
        self.path = path
        self.retention = None if retention_steps is None else Retention(retention_steps, history_records)
        self._writer = Writer(
            path, metrics_queue, None if self.retention is None else self.retention.prune, prune_interval
        )
        self._readers = Readers(path)
        # Ingest's path, once per metric batch: the writer's own method, not a call through this one.
        self.add_metrics = self._writer.add_metrics

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Bring the file to the latest schema, mark every rank disconnected (and reject any command
        still pending for a finished job), start the writer."""
        conn = process.connect_writer(self.path)
        schema.migrate(conn)
        # Nothing is connected right after a (re)start: the workers will say hello again.
        now = time.time()
        conn.execute("BEGIN")
        conn.execute("UPDATE ranks SET connected = 0 WHERE connected = 1")
        conn.execute("UPDATE jobs SET status = 'disconnected', updated_at = ? WHERE status = 'running'", (now,))
        # A file from before finishing rejected them may hold pending commands of finished jobs.
        writes.reject_pending(conn, None, now)
        conn.execute("COMMIT")
        self._writer.start(conn)

    def close(self) -> None:
        """Write what is queued, then stop the writer and close every connection."""
        self._writer.close()
        self._readers.close()

    # ---------------------------------------------------------------- writes

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Queue a write; the future resolves once it is committed."""
        return self._writer.submit(fn)

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Await a write from the event loop without blocking it."""
        return await self._writer.write(fn)

    def prune(self) -> concurrent.futures.Future[int]:
        """Thin old records now (the writer also does it every ``prune_interval`` s); resolves to rows deleted."""
        if self.retention is None:
            raise ValueError("this store keeps every record (no retention_steps)")
        return self.submit(self.retention.prune)

    @property
    def dropped_batches(self) -> int:
        """Metric batches not stored: refused (the writer fell behind) or lost with the writer process."""
        return self._writer.dropped_batches

    @property
    def on_stored(self) -> Callable[[list[Any]], None] | None:
        """Called on the writer thread after each commit of metric batches, with their receipts."""
        return self._writer.on_stored

    @on_stored.setter
    def on_stored(self, callback: Callable[[list[Any]], None] | None) -> None:
        self._writer.on_stored = callback

    @property
    def on_lost(self) -> Callable[[list[Any]], None] | None:
        """Called on the writer thread with the receipts of metric batches the writer process failed
        to store (it died, or SQLite refused the transaction): their senders should send them again."""
        return self._writer.on_lost

    @on_lost.setter
    def on_lost(self, callback: Callable[[list[Any]], None] | None) -> None:
        self._writer.on_lost = callback

    # ---------------------------------------------------------------- reads

    def list_jobs(self) -> list[JobOut]:
        """Every job, the latest updated first."""
        return reads.list_jobs(self._readers.connection())

    def get_job(self, job_id: str) -> JobDetail | None:
        """The job and its ranks, as of one commit; None for no such job."""
        with self._readers.snapshot() as conn:
            return reads.get_job(conn, job_id)

    def list_commands(self, job_id: str, limit: int = 1000) -> list[CommandOut]:
        """The job's latest ``limit`` commands, oldest first."""
        return reads.list_commands(self._readers.connection(), job_id, limit)

    def get_command(self, job_id: str, command_id: int) -> CommandOut | None:
        """One command of the job's log; None for no such command (or another job's)."""
        return reads.get_command(self._readers.connection(), job_id, command_id)

    def pending_commands(self, job_id: str) -> list[CommandOut]:
        """The job's commands that rank 0 has not answered yet, oldest first."""
        return reads.pending_commands(self._readers.connection(), job_id)

    def metrics(
        self,
        job_id: str,
        since_step: int = 0,
        ranks: list[int] | None = None,
        names: list[str] | None = None,
        limit: int = 100_000,
    ) -> dict[str, list[dict]]:
        """Stored series from ``since_step`` on (at most ``limit`` records of each kind, oldest first)."""
        with self._readers.snapshot() as conn:
            return reads.metrics(conn, job_id, since_step, ranks, names, limit)

    def snapshot_json(self, job_id: str, budget: int, commands: int = 200, events: int = 1000) -> str | None:
        """What a dashboard needs on connect, as JSON text (``reads.snapshot_json``); None for no such job."""
        with self._readers.snapshot() as conn:
            return reads.snapshot_json(conn, job_id, budget, commands, events)

    def series_json(self, job_id: str, query: history.SeriesQuery) -> str | None:
        """A series at any zoom as JSON text (``history.series``); None for no such job;
        ``history.BadQuery`` for a query it cannot answer."""
        with self._readers.snapshot() as conn:
            if not _job_exists(conn, job_id):
                return None
            full_from = {} if self.retention is None else self.retention.full_resolution_from(conn, job_id)
            return history.series(conn, job_id, query, full_from)

    def layers(self, job_id: str, first: int | None, last: int | None, points: int, rank: int) -> dict | None:
        """Layers' shares of the divergence per round (``history.layers``); None for no such job."""
        with self._readers.snapshot() as conn:
            if not _job_exists(conn, job_id):
                return None
            return history.layers(conn, job_id, first, last, points, rank)

    def stats(self) -> list[dict[str, Any]]:
        """Per-job figures for Prometheus."""
        return reads.stats(self._readers.connection())


def _job_exists(conn: sqlite3.Connection, job_id: str) -> bool:
    return conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is not None
