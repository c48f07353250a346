"""SQLite store (WAL): jobs, ranks, metric series, control events and the command log.

Every write runs on one writer thread, in arrival order, grouped into one transaction per burst;
so metric ingest never waits on the disk inside the event loop, and a write the caller awaits (a
hello, a new command) is committed before its future resolves. The thread hands the metric batches
queued by ingest to a writer process (``sqlwriter``), which commits them on a core of its own, and
writes the rest itself. Reads use one connection per thread; WAL lets them run beside the writers.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from avgctl.server import sqlwriter
from avgctl.server.records import EncodedBatch
from avgctl.protocol import AveragerConfig, CommandAck, ControlView, Hello
from avgctl.server.api import AutotuneView, CommandOut, JobControl, JobDetail, JobOut, RankOut

log = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    world_size INTEGER NOT NULL,
    status TEXT NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    control TEXT NOT NULL,
    autotune TEXT NOT NULL,
    config TEXT,
    divergence_mean REAL,
    divergence_max REAL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    last_seen REAL,
    divergence_step INTEGER
);
CREATE TABLE IF NOT EXISTS ranks (
    job_id TEXT NOT NULL,
    rank INTEGER NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    step INTEGER NOT NULL DEFAULT 0,
    last_seen REAL NOT NULL,
    connected INTEGER NOT NULL,
    closed_normally INTEGER NOT NULL DEFAULT 0,
    dropped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS steps (
    job_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (job_id, rank, step)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS rounds (
    job_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, group_size INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, rank, step, group_size)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS control_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, control TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS control_events_job ON control_events (job_id, step);
CREATE TABLE IF NOT EXISTS commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL,
    author TEXT NOT NULL,
    created_at REAL NOT NULL,
    body TEXT NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL,
    applied_step INTEGER,
    reason TEXT,
    updated_at REAL NOT NULL,
    note TEXT
);
CREATE INDEX IF NOT EXISTS commands_job ON commands (job_id, status, id);
"""

_STEP_FIELDS = ("step", "time", "step_time", "drift", "loss", "scalars")


class UnknownJob(LookupError):
    """No job with that id."""


class Conflict(ValueError):
    """A write that contradicts what is stored (e.g. a hello with another world size)."""


@dataclass(slots=True)
class _Op:
    fn: Callable[[sqlite3.Connection], Any] | None  # None: the queued metric batches (the writer process's)
    future: concurrent.futures.Future | None


def _resolve(op: _Op, result: Any, err: BaseException | None) -> None:
    if op.future is None:
        return
    # The awaiting task may have been cancelled (shutdown); the write stands all the same.
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if err is None:
            op.future.set_result(result)
        else:
            op.future.set_exception(err)


class Store:
    """The server's persistent state; ``start()`` before use, ``close()`` to flush and stop."""

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
        self.metrics_queue = metrics_queue
        self.retention = None if retention_steps is None else Retention(retention_steps, history_records)
        self.prune_interval = prune_interval
        self._next_prune = 0.0
        self.dropped_batches = 0  # metric batches not stored: refused (the writer fell behind) or lost with the writer process
        self.on_stored: Callable[[list[Any]], None] | None = None
        """Called on the writer thread after each commit of metric batches, with their receipts."""
        self.on_lost: Callable[[list[Any]], None] | None = None
        """Called on the writer thread with the receipts of metric batches the writer process failed
        to store (it died, or SQLite refused the transaction): their senders should send them again."""
        # Metric batches waiting for the writer: ingest appends here, and the first batch of a burst
        # queues the one op that writes the whole burst (so a non-empty list always has its op queued).
        self._metrics: list[sqlwriter.Entry] = []
        self._receipts: list[Any] = []  # what add_metrics was given, for on_stored
        self._metrics_lock = threading.Lock()
        self._queue: queue.Queue[_Op | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._process = sqlwriter.WriterProcess(path)

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        conn = sqlwriter.connect_writer(self.path)
        conn.executescript(_SCHEMA)
        if "note" not in _columns(conn, "commands"):  # a file from before the command notes
            conn.execute("ALTER TABLE commands ADD COLUMN note TEXT")
        jobs_columns = _columns(conn, "jobs")
        for column, kind in (("last_seen", "REAL"), ("divergence_step", "INTEGER")):  # files from before them
            if column not in jobs_columns:
                conn.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")
        # Nothing is connected right after a (re)start: the workers will say hello again.
        now = time.time()
        conn.execute("BEGIN")
        conn.execute("UPDATE ranks SET connected = 0 WHERE connected = 1")
        conn.execute("UPDATE jobs SET status = 'disconnected', updated_at = ? WHERE status = 'running'", (now,))
        conn.execute("COMMIT")
        self._process.start()
        self._thread = threading.Thread(target=self._run, args=(conn,), name="avgctl-store-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, then stop the writer and close every connection."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._process.close()
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    # ---------------------------------------------------------------- writer

    def _run(self, conn: sqlite3.Connection) -> None:
        try:
            stop = False
            while not stop:
                ops = [self._queue.get()]
                while len(ops) < 1000:  # group a burst into one transaction
                    try:
                        ops.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                if None in ops:
                    stop = True
                    ops = [op for op in ops if op is not None]
                self._execute(conn, ops)
                if self.retention is not None and time.monotonic() >= self._next_prune:
                    self._execute(conn, [_Op(self.retention.prune, None)])
                    self._next_prune = time.monotonic() + self.prune_interval
        finally:
            conn.close()

    def _execute(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        """Run ``ops`` in order: the queued metric batches in the writer process, the rest in one
        transaction per run of them, committed before the process writes (it needs the lock)."""
        run: list[_Op] = []
        for op in ops:
            if op.fn is None:
                self._transaction(conn, run)
                run = []
                self._write_elsewhere(op)
            else:
                run.append(op)
        self._transaction(conn, run)

    def _transaction(self, conn: sqlite3.Connection, ops: list[_Op]) -> None:
        if not ops:
            return
        results: list[tuple[_Op, Any, BaseException | None]] = []
        conn.execute("BEGIN")
        for op in ops:
            conn.execute("SAVEPOINT op")
            try:
                result = op.fn(conn)
            except Exception as err:  # one bad op must not lose the others in the burst
                conn.execute("ROLLBACK TO op")
                if op.future is None:
                    log.exception("store write failed")
                results.append((op, None, err))
            else:
                results.append((op, result, None))
            conn.execute("RELEASE op")
        conn.execute("COMMIT")
        # Resolve only after COMMIT, so a caller reading right after sees its write.
        for op, result, err in results:
            _resolve(op, result, err)

    def _write_elsewhere(self, op: _Op) -> None:
        with self._metrics_lock:
            entries, self._metrics = self._metrics, []
            receipts, self._receipts = self._receipts, []
        try:
            self._process.write(entries)
        except Exception as err:  # counted as dropped; on_lost asks their links to send them again
            with self._metrics_lock:
                self.dropped_batches += len(entries)
            if receipts and self.on_lost is not None:
                self.on_lost(receipts)
            _resolve(op, None, err)
        else:
            _resolve(op, receipts, None)

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Queue a write; the future resolves once it is committed."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(_Op(fn, future))
        return future

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Await a write from the event loop without blocking it."""
        return await asyncio.wrap_future(self.submit(fn))

    def prune(self) -> concurrent.futures.Future[int]:
        """Thin old records now (the writer also does it every ``prune_interval`` s); resolves to rows deleted."""
        if self.retention is None:
            raise ValueError("this store keeps every record (no retention_steps)")
        return self.submit(self.retention.prune)

    def add_metrics(self, job_id: str, rank: int, batch: EncodedBatch, receipt: Any = None) -> bool:
        """Queue a metric batch without waiting; False (and counted) when the writer is too far behind.

        Batches that arrive while the writer is busy wait together and go to SQLite in one
        transaction (``write_metric_batches``). Each connection's batches keep their order relative to its
        awaited writes (hello, control changes, disconnect), since those come before or after them.
        A ``receipt`` (not None) goes to ``on_stored`` once the batch is committed.
        """
        entry = metric_entry(job_id, rank, batch, time.time())
        with self._metrics_lock:
            if len(self._metrics) >= self.metrics_queue:
                self.dropped_batches += 1
                return False
            self._metrics.append(entry)
            if receipt is not None:
                self._receipts.append(receipt)
            first = len(self._metrics) == 1
        if first:  # the op queued for earlier batches takes this one too
            future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
            future.add_done_callback(self._committed)
            self._queue.put(_Op(None, future))
        return True

    def _committed(self, future: concurrent.futures.Future[list[Any]]) -> None:
        # The metric op's future resolves after COMMIT (on the writer thread).
        if future.exception() is not None:
            log.error("storing metric batches failed", exc_info=future.exception())
        elif future.result() and self.on_stored is not None:
            self.on_stored(future.result())

    # ---------------------------------------------------------------- reads

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlwriter.connect(self.path)
            self._local.conn = conn
            with self._readers_lock:
                self._readers.append(conn)
        return conn

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every SELECT inside sees the same committed state (in autocommit
        each would see its own, so a job's row and its ranks' rows could disagree)."""
        conn = self._reader()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def list_jobs(self) -> list[JobOut]:
        rows = self._reader().execute("SELECT * FROM jobs ORDER BY updated_at DESC").fetchall()
        cols = _columns(self._reader(), "jobs")
        return [_job_out(dict(zip(cols, row))) for row in rows]

    def get_job(self, job_id: str) -> JobDetail | None:
        with self._snapshot() as conn:
            return _job_detail(conn, job_id)

    def list_commands(self, job_id: str, limit: int = 1000) -> list[CommandOut]:
        rows = self._reader().execute(
            "SELECT * FROM (SELECT * FROM commands WHERE job_id = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
            (job_id, limit),
        ).fetchall()
        return [_command_out(row) for row in rows]

    def get_command(self, job_id: str, command_id: int) -> CommandOut | None:
        return _get_command(self._reader(), job_id, command_id)

    def pending_commands(self, job_id: str) -> list[CommandOut]:
        rows = self._reader().execute(
            "SELECT * FROM commands WHERE job_id = ? AND status = 'pending' ORDER BY id", (job_id,)
        ).fetchall()
        return [_command_out(row) for row in rows]

    def metrics(
        self,
        job_id: str,
        since_step: int = 0,
        ranks: list[int] | None = None,
        names: list[str] | None = None,
        limit: int = 100_000,
    ) -> dict[str, list[dict]]:
        """Stored series from ``since_step`` on (at most ``limit`` records of each kind, oldest first)."""
        with self._snapshot() as conn:
            return self._metrics_in(conn, job_id, since_step, ranks, names, limit)

    @staticmethod
    def _metrics_in(
        conn: sqlite3.Connection, job_id: str, since_step: int, ranks: list[int] | None, names: list[str] | None, limit: int
    ) -> dict[str, list[dict]]:
        rank_sql, rank_args = _rank_filter(ranks)
        out: dict[str, list[dict]] = {}
        for table in ("steps", "rounds"):
            rows = conn.execute(
                f"SELECT rank, body FROM {table} WHERE job_id = ? AND step >= ?{rank_sql} ORDER BY step, rank LIMIT ?",
                (job_id, since_step, *rank_args, limit),
            ).fetchall()
            out[table] = [_record(rank, body, names) for rank, body in rows]
        rows = conn.execute(
            f"SELECT rank, step, control FROM control_events WHERE job_id = ? AND step >= ?{rank_sql} ORDER BY id LIMIT ?",
            (job_id, since_step, *rank_args, limit),
        ).fetchall()
        out["control_events"] = [{"rank": r, "step": s, "control": json.loads(c)} for r, s, c in rows]
        return out

    def snapshot(self, job_id: str, budget: int, commands: int = 200, events: int = 1000) -> dict[str, Any] | None:
        """What a dashboard needs on connect: the job, recent series (bounded, downsampled), commands."""
        with self._snapshot():
            parts = self._snapshot_parts(job_id, budget, commands, events)
        if parts is None:
            return None
        head, series = parts
        return {
            **head,
            **{table: [_weighted(_record(rank, body, None), w) for rank, body, w in rows] for table, rows in series.items()},
        }

    def snapshot_json(self, job_id: str, budget: int, commands: int = 200, events: int = 1000) -> str | None:
        """``snapshot`` as JSON text, built without parsing the stored records (a snapshot holds thousands)."""
        with self._snapshot():
            parts = self._snapshot_parts(job_id, budget, commands, events)
        if parts is None:
            return None
        head, series = parts
        text = json.dumps(head)[:-1]
        for table, rows in series.items():
            text += f',"{table}":[' + ",".join(_record_json(rank, body, w) for rank, body, w in rows) + "]"
        return text + "}"

    def _snapshot_parts(
        self, job_id: str, budget: int, commands: int, events: int
    ) -> tuple[dict[str, Any], dict[str, list[tuple[int, str]]]] | None:
        conn = self._reader()
        job = _job_detail(conn, job_id)
        if job is None:
            return None
        per_rank = max(100, budget // max(1, job.world_size))
        recent_from = max(0, job.step - per_rank // 2)
        series = {table: _downsampled(conn, table, job_id, recent_from, per_rank // 2) for table in ("steps", "rounds")}
        rows = conn.execute(
            "SELECT rank, step, control FROM (SELECT * FROM control_events WHERE job_id = ? ORDER BY id DESC LIMIT ?)"
            " ORDER BY id",
            (job_id, events),
        ).fetchall()
        head = {
            "kind": "snapshot",
            "job": job.model_dump(mode="json"),
            "control_events": [{"rank": r, "step": s, "control": json.loads(c)} for r, s, c in rows],
            "commands": [c.model_dump(mode="json") for c in self.list_commands(job_id, commands)],
        }
        return head, series

    def stats(self) -> list[dict[str, Any]]:
        """Per-job figures for Prometheus."""
        conn = self._reader()
        out = []
        for job_id, step, control, mean, mx in conn.execute(
            "SELECT id, step, control, divergence_mean, divergence_max FROM jobs"
        ).fetchall():
            connected, dropped = conn.execute(
                "SELECT COALESCE(SUM(connected), 0), COALESCE(SUM(dropped), 0) FROM ranks WHERE job_id = ?", (job_id,)
            ).fetchone()
            by_status = dict(
                conn.execute("SELECT status, COUNT(*) FROM commands WHERE job_id = ? GROUP BY status", (job_id,))
            )
            out.append(
                {
                    "job_id": job_id,
                    "step": step,
                    "period": json.loads(control)["period"],
                    "divergence_mean": mean,
                    "divergence_max": mx,
                    "connected_ranks": connected,
                    "dropped": dropped,
                    "commands": by_status,
                }
            )
        return out


# ------------------------------------------------------------------------------ retention


class Retention:
    """Keeps the file bounded: each rank's latest ``retention_steps`` steps at full resolution, and
    at most ``history_records`` older step (and round) records, evenly thinned.

    Older records keep the steps that are multiples of a stride, the smallest power of two that
    leaves at most ``history_records`` of them; the stride doubles as the job grows, so what is kept
    at one stride is kept at the next. Control events and commands are never thinned. Runs on the
    writer thread (its state is the writer's alone); SQLite reuses the freed pages, so the file stops
    growing instead of shrinking.
    """

    def __init__(self, retention_steps: int, history_records: int):
        self.retention_steps = retention_steps
        self.history_records = history_records
        self._done: dict[tuple[str, int], tuple[int, int]] = {}  # (job, rank) -> (thinned below, stride)

    def stride(self, cutoff: int) -> int:
        """The spacing of the records kept below ``cutoff``."""
        stride = 1
        while cutoff > stride * self.history_records:
            stride *= 2
        return stride

    def prune(self, conn: sqlite3.Connection) -> int:
        deleted = 0
        for job_id, rank, step in conn.execute("SELECT job_id, rank, step FROM ranks").fetchall():
            cutoff = step - self.retention_steps
            stride = self.stride(cutoff)
            done_below, done_stride = self._done.get((job_id, rank), (0, 0))
            if cutoff <= 0 or stride == 1 or (stride == done_stride and cutoff <= done_below):
                continue
            start = done_below if stride == done_stride else 0  # a new stride re-thins everything older
            for table in ("steps", "rounds"):
                deleted += conn.execute(
                    f"DELETE FROM {table} WHERE job_id = ? AND rank = ? AND step >= ? AND step < ? AND step % ? != 0",
                    (job_id, rank, start, cutoff, stride),
                ).rowcount
            self._done[(job_id, rank)] = (cutoff, stride)
        return deleted


# ------------------------------------------------------------------------------ write operations
# Each takes the writer's connection and runs inside its transaction.


def hello(conn: sqlite3.Connection, msg: Hello, now: float) -> None:
    """A rank (re)connected: create or update its job and rank; rank 0 brings the control state."""
    row = conn.execute("SELECT world_size FROM jobs WHERE id = ?", (msg.job_id,)).fetchone()
    control, _ = _control_view(msg.control)
    if row is None:
        conn.execute(
            "INSERT INTO jobs (id, world_size, status, step, control, autotune, config, created_at, updated_at)"
            " VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?)",
            (msg.job_id, msg.world_size, msg.step, control, AutotuneView().model_dump_json(),
             msg.config.model_dump_json(), now, now),
        )
    elif row[0] != msg.world_size:
        (connected,) = conn.execute(
            "SELECT COUNT(*) FROM ranks WHERE job_id = ? AND connected = 1", (msg.job_id,)
        ).fetchone()
        if connected:
            raise Conflict(f"job {msg.job_id} runs with world size {row[0]}, not {msg.world_size}")
        # The same job id started again with another world size: forget the old ranks.
        conn.execute("DELETE FROM ranks WHERE job_id = ?", (msg.job_id,))
        conn.execute("UPDATE jobs SET world_size = ? WHERE id = ?", (msg.world_size, msg.job_id))
    conn.execute(
        "INSERT INTO ranks (job_id, rank, host, pid, step, last_seen, connected, closed_normally)"
        " VALUES (?, ?, ?, ?, ?, ?, 1, 0) ON CONFLICT (job_id, rank) DO UPDATE SET host = excluded.host,"
        " pid = excluded.pid, step = excluded.step, last_seen = excluded.last_seen, connected = 1, closed_normally = 0",
        (msg.job_id, msg.rank, msg.host, msg.pid, msg.step, now),
    )
    if msg.rank == 0:
        conn.execute(
            "UPDATE jobs SET control = ?, config = ? WHERE id = ?", (control, msg.config.model_dump_json(), msg.job_id)
        )
    conn.execute(
        "UPDATE jobs SET status = 'running', updated_at = ?, last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE id = ?",
        (now, now, msg.job_id),
    )
    _update_job_step(conn, msg.job_id)


def disconnect(conn: sqlite3.Connection, job_id: str, rank: int, normal: bool, now: float) -> None:
    """A rank's connection ended; the job is finished once every rank closed normally."""
    conn.execute(
        "UPDATE ranks SET connected = 0, closed_normally = ?, last_seen = ? WHERE job_id = ? AND rank = ?",
        (int(normal), now, job_id, rank),
    )
    connected, abnormal, known = conn.execute(
        "SELECT COALESCE(SUM(connected), 0), COALESCE(SUM(1 - closed_normally), 0), COUNT(*) FROM ranks WHERE job_id = ?",
        (job_id,),
    ).fetchone()
    world_size = conn.execute("SELECT world_size FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    if connected:
        status = "running"
    elif abnormal == 0 and known == world_size:
        status = "finished"
    else:
        status = "disconnected"
    conn.execute("UPDATE jobs SET status = ?, updated_at = ? WHERE id = ?", (status, now, job_id))


def write_metrics(conn: sqlite3.Connection, job_id: str, rank: int, batch: EncodedBatch, now: float) -> None:
    """Store one rank's batch (received at ``now``)."""
    write_metric_batches(conn, [(job_id, rank, batch, now)])


def metric_entry(job_id: str, rank: int, batch: EncodedBatch, now: float) -> sqlwriter.Entry:
    """A batch as the writer process takes it: plain tuples, so pickling it is all C (``sqlwriter.Entry``)."""
    events: list[tuple[int, str]] = []
    control = None
    if batch.control:  # rare: a control change
        events = [(e.step, e.control.model_dump_json()) for e in batch.control]
        control = _control_view(batch.control[-1].control) if rank == 0 else None
    latest = batch.latest
    return (
        job_id, rank, now, batch.steps, batch.rounds, events, control, batch.dropped, batch.top,
        None if latest is None else (latest.step, latest.divergence_mean, latest.divergence_max),
    )


def write_metric_batches(conn: sqlite3.Connection, entries: list[tuple[str, int, EncodedBatch, float]]) -> None:
    """Store ``(job_id, rank, batch, received_at)`` entries on ``conn`` (the writer process does the
    same with what ``add_metrics`` queues)."""
    sqlwriter.write_rows(conn, sqlwriter.metric_rows([metric_entry(*entry) for entry in entries]))


def _control_view(control: ControlView) -> tuple[str, int]:
    """``(body, version)`` of a worker's control view as the job keeps it (the autopilot's settings
    are the server's, in their own column)."""
    return control.model_dump_json(), control.version


def _update_job_step(conn: sqlite3.Connection, job_id: str) -> None:
    conn.execute(
        "UPDATE jobs SET step = COALESCE((SELECT MAX(step) FROM ranks WHERE job_id = ?), 0) WHERE id = ?",
        (job_id, job_id),
    )


def insert_command(
    conn: sqlite3.Connection, job_id: str, body: dict, author: str, now: float, note: str | None = None
) -> CommandOut:
    """Log a new pending command; ``UnknownJob`` if the job was never seen."""
    if conn.execute("SELECT 1 FROM jobs WHERE id = ?", (job_id,)).fetchone() is None:
        raise UnknownJob(job_id)
    cur = conn.execute(
        "INSERT INTO commands (job_id, author, created_at, body, type, status, updated_at, note)"
        " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
        (job_id, author, now, json.dumps(body), body["type"], now, note),
    )
    return _get_command(conn, job_id, cur.lastrowid)  # type: ignore[return-value]


def resolve_command(conn: sqlite3.Connection, job_id: str, ack: CommandAck, now: float) -> CommandOut | None:
    """Record rank 0's ack. Only a pending command changes (a re-sent ack is a no-op); returns it then."""
    cur = conn.execute(
        "UPDATE commands SET status = ?, applied_step = ?, reason = ?, updated_at = ?"
        " WHERE id = ? AND job_id = ? AND status = 'pending'",
        (ack.status, ack.applied_step, ack.reason, now, ack.command_id, job_id),
    )
    if ack.control is not None and ack.status == "applied":
        sqlwriter.set_controls(conn, [(job_id, *_control_view(ack.control), now)])
    if cur.rowcount == 0:
        return None
    return _get_command(conn, job_id, ack.command_id)


def set_autotune(conn: sqlite3.Connection, job_id: str, view: AutotuneView, now: float) -> int:
    """Store the autopilot settings; returns the job's current step (the command's applied step)."""
    row = conn.execute("SELECT step FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise UnknownJob(job_id)
    conn.execute("UPDATE jobs SET autotune = ?, updated_at = ? WHERE id = ?", (view.model_dump_json(), now, job_id))
    return row[0]


# ------------------------------------------------------------------------------ row mapping


def _columns(conn: sqlite3.Connection, table: str) -> list[str]:
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]


def _job_out(row: dict[str, Any]) -> JobOut:
    # Rows written before the view lost its autotune field carry a blank one: the column wins.
    control = JobControl.model_validate({**json.loads(row["control"]), "autotune": json.loads(row["autotune"])})
    return JobOut(
        id=row["id"],
        world_size=row["world_size"],
        status=row["status"],
        step=row["step"],
        control=control,
        config=AveragerConfig.model_validate_json(row["config"]) if row["config"] else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        divergence_mean=row.get("divergence_mean"),
        divergence_max=row.get("divergence_max"),
        last_seen=row.get("last_seen"),
    )


def _job_detail(conn: sqlite3.Connection, job_id: str) -> JobDetail | None:
    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return None
    job = _job_out(dict(zip(_columns(conn, "jobs"), row)))
    ranks = [
        RankOut(rank=r, host=h, pid=p, step=s, last_seen=ls, connected=bool(c), dropped=d)
        for r, h, p, s, ls, c, d in conn.execute(
            "SELECT rank, host, pid, step, last_seen, connected, dropped FROM ranks WHERE job_id = ? ORDER BY rank",
            (job_id,),
        )
    ]
    return JobDetail(**job.model_dump(), ranks=ranks)


# The table's column order, so ``SELECT *`` reads the same (``note`` came last, by ALTER TABLE on old files).
_COMMAND_COLUMNS = "id, job_id, author, created_at, body, type, status, applied_step, reason, updated_at, note"


def _get_command(conn: sqlite3.Connection, job_id: str, command_id: int) -> CommandOut | None:
    row = conn.execute(
        f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE id = ? AND job_id = ?", (command_id, job_id)
    ).fetchone()
    return None if row is None else _command_out(row)


def _command_out(row: tuple) -> CommandOut:
    if len(row) != 11:
        raise ValueError("unexpected command row")
    cid, job_id, author, created_at, body, ctype, status, applied_step, reason, updated_at, note = row
    return CommandOut(
        id=cid,
        job_id=job_id,
        author=author,
        created_at=created_at,
        command=json.loads(body),
        type=ctype,
        status=status,
        applied_step=applied_step,
        reason=reason,
        updated_at=updated_at,
        note=note,
    )


def _rank_filter(ranks: list[int] | None) -> tuple[str, list[int]]:
    if not ranks:
        return "", []
    return f" AND rank IN ({', '.join('?' * len(ranks))})", list(ranks)


def _record(rank: int, body: str, names: list[str] | None) -> dict:
    record = json.loads(body)
    if names:
        # Keep the requested fields; a name that is not a field is looked up among the user scalars.
        scalars = record.get("scalars") or {}
        kept = {"rank": rank, "step": record["step"]}
        for name in names:
            if name in record:
                kept[name] = record[name]
            elif name in scalars:
                kept[name] = scalars[name]
        return kept
    return {"rank": rank, **record}


def _weighted(record: dict, weight: int) -> dict:
    return {**record, "w": weight} if weight > 1 else record


def _record_json(rank: int, body: str, weight: int = 1) -> str:
    # ``_weighted(_record(rank, body, None), weight)`` as text: a stored body is a JSON object that starts with "{".
    head = f'"rank":{rank},"w":{weight}' if weight > 1 else f'"rank":{rank}'
    return f"{{{head},{body[1:]}" if body != "{}" else f"{{{head}}}"


def _downsampled(
    conn: sqlite3.Connection, table: str, job_id: str, recent_from: int, older: int
) -> list[tuple[int, str, int]]:
    """``(rank, body, weight)``: records from ``recent_from`` on in full, plus at most ``older``
    evenly spaced older ones per rank, each with how many records it stands for (every k-th of a
    rank's is kept: sums over them, such as time spent, must count each k times)."""
    recent = conn.execute(
        f"SELECT rank, body, 1 FROM {table} WHERE job_id = ? AND step >= ? ORDER BY step, rank", (job_id, recent_from)
    ).fetchall()
    old = conn.execute(
        f"SELECT rank, body, k FROM (SELECT rank, step, body, ROW_NUMBER() OVER (PARTITION BY rank ORDER BY step) AS rn,"
        f" (COUNT(*) OVER (PARTITION BY rank) + ? - 1) / ? AS k FROM {table} WHERE job_id = ? AND step < ?)"
        " WHERE (rn - 1) % k = 0 ORDER BY step, rank",
        (older, older, job_id, recent_from),
    ).fetchall()
    return old + recent
