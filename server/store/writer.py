"""The writer thread: every write, in arrival order, one transaction per burst.

So metric ingest never waits on the disk inside the event loop, and a write the caller awaits (a
hello, a new command) is committed before its future resolves. The thread hands the metric batches
queued by ingest to the writer process (``process``), which commits them on a core of its own, and
runs the other writes itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from avgctl.server.records import EncodedBatch
from avgctl.server.store import process
from avgctl.server.store.writes import metric_entry

log = logging.getLogger(__name__)
T = TypeVar("T")
_DROPPED = "dropped_metric_batches"  # its row in ``counters`` (schema version 4)


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


class Writer:
    """The op queue, the thread that runs it, and the hand-off of metric batches to the writer process.

    ``housekeeping`` (if any) runs on the thread, in a transaction of its own, after a burst once
    every ``housekeeping_interval`` seconds (the store's retention).
    """

    def __init__(
        self,
        path: str,
        metrics_queue: int,
        housekeeping: Callable[[sqlite3.Connection], Any] | None = None,
        housekeeping_interval: float = 1.0,
    ):
        self.metrics_queue = metrics_queue
        self.housekeeping = housekeeping
        self.housekeeping_interval = housekeeping_interval
        self._next_housekeeping = 0.0
        # Metric batches not stored: refused (the writer fell behind) or lost with the writer
        # process; none of them was confirmed. Loaded at start and saved by the writer (``counters``).
        self.dropped_batches = 0
        self._unsaved_drops = 0  # counted, not yet added to the stored total
        self.on_stored: Callable[[list[Any]], None] | None = None
        self.on_lost: Callable[[list[Any]], None] | None = None
        # Metric batches waiting for the writer: ingest appends here, and the first batch of a burst
        # queues the one op that writes the whole burst (so a non-empty list always has its op queued).
        self._metrics: list[process.Entry] = []
        self._receipts: list[Any] = []  # what add_metrics was given, for on_stored
        self._metrics_lock = threading.Lock()
        self._queue: queue.Queue[_Op | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.process = process.WriterProcess(path)

    def start(self, conn: sqlite3.Connection) -> None:
        """Start the writer process and the thread, which writes on ``conn`` (and closes it at the end)."""
        row = conn.execute("SELECT value FROM counters WHERE name = ?", (_DROPPED,)).fetchone()
        self.dropped_batches = row[0] if row else 0
        self.process.start()
        self._thread = threading.Thread(target=self._run, args=(conn,), name="avgctl-store-writer", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Write what is queued, then stop the thread and the writer process."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self.process.close()

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Queue a write; the future resolves once it is committed."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._queue.put(_Op(fn, future))
        return future

    async def write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Await a write from the event loop without blocking it."""
        return await asyncio.wrap_future(self.submit(fn))

    def add_metrics(self, job_id: str, rank: int, batch: EncodedBatch, receipt: Any = None) -> bool:
        """Queue a metric batch without waiting; False (and counted) when the writer is too far behind.

        Batches that arrive while the writer is busy wait together and go to SQLite in one
        transaction (in the writer process). Each connection's batches keep their order relative to
        its awaited writes (hello, control changes, disconnect), since those come before or after
        them. A ``receipt`` (not None) goes to ``on_stored`` once the batch is committed, or to
        ``on_lost`` at once when it is refused: a refused batch is never confirmed (a later
        ``stored`` would cover it), and its link must send it again.
        """
        entry = metric_entry(job_id, rank, batch, time.time())
        with self._metrics_lock:
            refused = len(self._metrics) >= self.metrics_queue
            if not refused:
                self._metrics.append(entry)
                if receipt is not None:
                    self._receipts.append(receipt)
                first = len(self._metrics) == 1
        if refused:
            self._count_dropped(1)
            if receipt is not None and self.on_lost is not None:
                self.on_lost([receipt])
            return False
        if first:  # the op queued for earlier batches takes this one too
            future: concurrent.futures.Future[list[Any]] = concurrent.futures.Future()
            future.add_done_callback(self._committed)
            self._queue.put(_Op(None, future))
        return True

    def _count_dropped(self, n: int) -> None:
        """Count ``n`` batches not stored; the writer adds them to the stored total in its next burst."""
        with self._metrics_lock:
            self.dropped_batches += n
            first = self._unsaved_drops == 0
            self._unsaved_drops += n
        if first:  # one op saves every drop counted until it runs
            self._queue.put(_Op(self._save_dropped, None))

    def _save_dropped(self, conn: sqlite3.Connection) -> None:
        with self._metrics_lock:
            n, self._unsaved_drops = self._unsaved_drops, 0
        conn.execute(
            "INSERT INTO counters (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
            (_DROPPED, n),
        )

    def _committed(self, future: concurrent.futures.Future[list[Any]]) -> None:
        # The metric op's future resolves after COMMIT (on the writer thread).
        if future.exception() is not None:
            log.error("storing metric batches failed", exc_info=future.exception())
        elif future.result() and self.on_stored is not None:
            self.on_stored(future.result())

    # ---------------------------------------------------------------- the thread

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
                if self.housekeeping is not None and time.monotonic() >= self._next_housekeeping:
                    self._execute(conn, [_Op(self.housekeeping, None)])
                    self._next_housekeeping = time.monotonic() + self.housekeeping_interval
            if self._unsaved_drops:  # counted in the last burst, after the stop
                self._execute(conn, [_Op(self._save_dropped, None)])
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
            held = self.process.write(entries)
        except Exception as err:  # counted as dropped; on_lost asks their links to send them again
            self._count_dropped(len(entries))
            if receipts and self.on_lost is not None:
                self.on_lost(receipts)
            _resolve(op, None, err)
            return
        _resolve(op, receipts, None)
        with self._metrics_lock:
            idle = not self._metrics
        if held and idle:  # the flood is over (or never was): the coarse rollups it held back, written
            try:
                self.process.write([], flush=True)
            except Exception:  # the next writer process rebuilds them (rollup.repair)
                log.exception("writing the held-back coarse rollups failed")
