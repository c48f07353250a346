"""The metric writer process: ingest's SQLite writes run in a process of their own.

Why a process: under an ingest flood the event loop holds the GIL most of the time, and a writer
*thread* had to win it back after every ``sqlite3_step`` (each statement lets it go), waiting up to
the switch interval each time; it ended each flood behind the loop and, in longer floods, filled
its queue. A child process writes on the other core and needs no GIL of ours: the store's thread
only hands it the batches as plain tuples (one pickle) and waits, off the GIL, for the commit.

Protocol, over the child's stdin and stdout: frames of a 4-byte big-endian length and a body.
The parent sends a pickled ``(entries, flush)``, a list of ``Entry`` and whether to write the coarse
rollups held back (``rollup.Held``); the child flattens the entries (``metric_rows``), writes them in
one transaction and answers, once committed, an empty body, or ``\x01`` when it holds coarse
rollups back (the parent sends a flush once its queue is empty); the error's text after rolling back.
EOF on stdin stops the child; it ignores SIGINT, SIGTERM and SIGHUP, so the server alone decides when.

Only the standard library is imported here, and the child runs this file as a script (``python -I
process.py``), not as ``-m avgctl.server.store.process``, which would first import the store
package and with it the server's models: a start took 0.1-0.2 s as a script, 0.8 s that way.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import io
import json
import logging
import os
import pickle
import signal
import sqlite3
import struct
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import BinaryIO, NamedTuple

if __package__:
    from avgctl.server.store import rollup
else:  # run as a script (above): its sibling, by path, since -I keeps the folder off sys.path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import rollup

log = logging.getLogger(__name__)

WAL_CHECKPOINT_PAGES = 10_000  # about 40 MB of WAL with 4-KiB pages
WAL_SIZE_LIMIT = 64 * 2**20
_LENGTH = struct.Struct(">I")
PIPE_BYTES = 2**20  # Linux's default fs.pipe-max-size
_STEP_COLUMNS = ("job_id", "rank", "step", "body")
_ROUND_COLUMNS = ("job_id", "rank", "step", "group_size", "body")


# One rank's metric batch in plain tuples (``writes.metric_entry`` makes them):
# (job_id, rank, received_at, steps [(step, body)], rounds [(step, group_size, body)],
#  control events [(step, control body)], rank 0's new control view (body, version) or None,
#  dropped, top step or None, latest round (step, divergence mean, divergence max) or None,
#  the steps' figures [(loss, drift, step_time, scalars or None)] and the rounds' [(divergence,
#  relative divergence)], one per record above, for the rollups)
Entry = tuple[
    str,
    int,
    float,
    list,
    list,
    list,
    tuple[str, int] | None,
    int,
    int | None,
    tuple[int, float, float] | None,
    list,
    list,
]


class MetricRows(NamedTuple):
    """Metric batches flattened into the rows and updates they make."""

    # The inserts' values, flat (a row after another), as one multi-row statement binds them.
    steps: list  # job_id, rank, step, body, ... (_STEP_COLUMNS)
    rounds: list  # job_id, rank, step, group_size, body, ... (_ROUND_COLUMNS)
    control_events: list[tuple]  # (job_id, rank, step, control)
    controls: list[tuple]  # rank 0's latest control view: (job_id, body, version, now), in order
    progress: list  # job_id, rank, step, last_seen, dropped, ...
    jobs: list[tuple]  # (step or None, last_seen, job_id)
    divergence: list[tuple]  # (mean, max, step, job_id, step)
    step_figures: list[rollup.Figures]  # one per row of ``steps``, in order
    round_figures: list[rollup.Figures]  # one per row of ``rounds``


def connect(path: str) -> sqlite3.Connection:
    """A connection to the store's file, as every one of the store's is made (here, since the child
    may import nothing else)."""
    # isolation_level=None: we issue BEGIN/COMMIT ourselves, one transaction per burst of writes.
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across process crashes
    conn.execute("PRAGMA busy_timeout=30000")
    return conn


def connect_writer(path: str) -> sqlite3.Connection:
    """A connection that commits, so it checkpoints: every WAL_CHECKPOINT_PAGES pages instead of
    SQLite's 1,000. Under an ingest flood each checkpoint stalled the writer on two fsyncs, and a
    page rewritten by many commits is copied back once per checkpoint, not per 1,000."""
    conn = connect(path)
    conn.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
    conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")  # what the WAL file shrinks back to
    return conn


def metric_rows(entries: list[Entry]) -> MetricRows:
    """The rows ``entries`` make, in arrival order: every record, and per rank and job the newest."""
    steps: list = []
    rounds: list = []
    events: list[tuple] = []
    controls: list[tuple] = []
    ranks: dict[tuple[str, int], tuple] = {}  # (job, rank) -> (max step, last seen, dropped)
    jobs: dict[str, list] = {}  # job -> [max step or None, last seen, latest round or None]
    step_figures: list[rollup.Figures] = []
    round_figures: list[rollup.Figures] = []
    for entry in entries:
        job_id, rank, now, batch_steps, batch_rounds, batch_events, control, dropped, top, latest = entry[:10]
        step_values, round_values = entry[10:]
        for (step, body), values in zip(batch_steps, step_values, strict=True):
            steps += (job_id, rank, step, body)
            step_figures.append((job_id, rank, step, values))
        for (step, size, body), values in zip(batch_rounds, round_values, strict=True):
            rounds += (job_id, rank, step, size, body)
            round_figures.append((job_id, rank, step, values))
        events.extend((job_id, rank, step, body) for step, body in batch_events)
        if control is not None:
            controls.append((job_id, *control, now))
        before = ranks.get((job_id, rank))
        ranks[job_id, rank] = (max(before[0] if before else 0, top or 0), now, dropped)
        job_row = jobs.setdefault(job_id, [None, now, None])
        if top is not None:
            job_row[0] = top if job_row[0] is None else max(job_row[0], top)
        job_row[1] = now
        if latest is not None and (job_row[2] is None or latest[0] >= job_row[2][0]):
            job_row[2] = latest
    progress: list = []
    for (job_id, rank), row in ranks.items():
        progress += (job_id, rank, *row)
    job_rows, divergence = [], []
    for job_id, (top, seen, latest) in jobs.items():
        job_rows.append((top, seen, job_id))
        if latest is not None:
            step, mean, peak = latest
            divergence.append((mean, peak, step, job_id, step))
    return MetricRows(steps, rounds, events, controls, progress, job_rows, divergence, step_figures, round_figures)


# ------------------------------------------------------------------------------------ SQL


def write_rows(conn: sqlite3.Connection, rows: MetricRows, held: rollup.Held | None = None, flush: bool = True) -> None:
    """Write ``rows`` inside the caller's transaction: multi-row inserts per table (``_in_chunks``),
    one statement for the ranks' progress and one update per job, and the rollups they change
    (the coarser levels' held back in ``held`` unless ``flush``: the writer process's, in a flood)."""
    if rows.control_events:
        # A link sends a batch again when it could not learn it was stored: keep one copy.
        conn.executemany(
            "INSERT INTO control_events (job_id, rank, step, control) SELECT ?, ?, ?, ? WHERE NOT EXISTS"
            " (SELECT 1 FROM control_events WHERE job_id = ? AND step = ? AND rank = ? AND control = ?)",
            [(job, rank, step, body, job, step, rank, body) for job, rank, step, body in rows.control_events],
        )
    set_controls(conn, rows.controls)
    replaced_steps = _insert_rows(conn, "steps", _STEP_COLUMNS, rows.steps)
    replaced_rounds = _insert_rows(conn, "rounds", _ROUND_COLUMNS, rows.rounds)
    added, removed = _changes(rows.step_figures, rows.steps, len(_STEP_COLUMNS), replaced_steps, _old_step_figures)
    more, fewer = _changes(rows.round_figures, rows.rounds, len(_ROUND_COLUMNS), replaced_rounds, _old_round_figures)
    counts = rollup.finest(added, more, removed, fewer)
    if held is None:
        rollup.write_every_level(conn, counts, _in_chunks)
    else:
        held.stage(conn, counts, flush, _in_chunks)
    _in_chunks(conn, _progress_sql, rows.progress, 5)
    conn.executemany(
        "UPDATE jobs SET step = MAX(step, COALESCE(?, step)), last_seen = MAX(COALESCE(last_seen, 0), ?) WHERE id = ?",
        rows.jobs,
    )
    # The job-wide divergence of its latest round (every rank reports the same figures for a round).
    conn.executemany(
        "UPDATE jobs SET divergence_mean = ?, divergence_max = ?, divergence_step = ?"
        " WHERE id = ? AND COALESCE(divergence_step, -1) <= ?",
        rows.divergence,
    )


def set_controls(conn: sqlite3.Connection, controls: list[tuple]) -> None:
    """Set jobs' control views from ``(job_id, body, version, now)`` rows, in order."""
    # An event sent again after a reconnect may be older than the state rank 0's hello brought: keep the newer.
    conn.executemany(
        "UPDATE jobs SET control = ?, updated_at = ? WHERE id = ? AND json_extract(control, '$.version') <= ?",
        [(body, now, job, version) for job, body, version, now in controls],
    )


def _insert_rows(conn: sqlite3.Connection, table: str, columns: tuple[str, ...], values: list) -> dict[int, str]:
    """Insert rows (``values`` flat), the newest copy of a key winning: a batch sent again, or steps
    run again after a restart from a checkpoint. Returns ``{row index: the body it replaced}`` for
    the rows whose key was taken (by a stored row or an earlier one of ``values``).

    ``INSERT OR IGNORE`` first, which cost 25-35% less than ``OR REPLACE`` per row when no key is
    taken (nearly always); a chunk that met a taken key is undone (to its savepoint), the bodies it
    would replace are read, and it is written again with ``OR REPLACE``."""
    width = len(columns)
    replaced: dict[int, str] = {}
    for start, count, chunk in _chunks(conn, values, width):
        conn.execute("SAVEPOINT chunk")
        if conn.execute(_insert_sql(table, columns, "IGNORE", count), chunk).rowcount < count:
            conn.execute("ROLLBACK TO chunk")
            replaced.update(_taken(conn, table, columns, start, chunk))
            conn.execute(_insert_sql(table, columns, "REPLACE", count), chunk)
        conn.execute("RELEASE chunk")
    return replaced


def _taken(conn: sqlite3.Connection, table: str, columns: tuple[str, ...], start: int, chunk: list) -> dict[int, str]:
    """The rows of ``chunk`` (row ``start`` on) whose key is taken, with the body they replace."""
    width = len(columns)
    key_columns = " AND ".join(f"{column} = ?" for column in columns[:-1])
    bodies: dict[tuple, str] = {}  # a key's latest body: stored, or an earlier row's of the chunk
    taken: dict[int, str] = {}
    for i in range(len(chunk) // width):
        key = tuple(chunk[i * width : (i + 1) * width - 1])
        old = bodies.get(key)
        if old is None:
            found = conn.execute(f"SELECT body FROM {table} WHERE {key_columns}", key).fetchone()
            old = None if found is None else found[0]
        if old is not None:
            taken[start + i] = old
        bodies[key] = chunk[(i + 1) * width - 1]
    return taken


def _changes(
    figures: list[rollup.Figures],
    values: list,
    width: int,
    replaced: dict[int, str],
    old_figures: Callable[[str], tuple],
) -> tuple[list[rollup.Figures], list[rollup.Figures]]:
    """What the rollups gain and lose from rows written with ``figures``, ``replaced`` as
    ``_insert_rows`` says: a row sent again with the same body changes nothing, one with another
    body swaps the old figures for its own."""
    if not replaced:
        return figures, []
    added, removed = [], []
    for i, record in enumerate(figures):
        old = replaced.get(i)
        if old is None:
            added.append(record)
        elif old != values[(i + 1) * width - 1]:
            added.append(record)
            removed.append((*record[:3], old_figures(old)))
    return added, removed


def _number(value) -> float:
    """A figure from a stored body: a float, or the protocol's spelling of a non-finite one."""
    return float(value)  # float() reads "NaN", "Infinity" and "-Infinity" too


def _old_step_figures(body: str) -> tuple:
    record = json.loads(body)
    values = [None if record.get(name) is None else _number(record[name]) for name in rollup.STEP_NAMES]
    scalars = {name: _number(value) for name, value in (record.get("scalars") or {}).items()}
    return (*values, scalars or None)


def _old_round_figures(body: str) -> tuple:
    record = json.loads(body)
    return tuple(_number(record[name]) for name in rollup.ROUND_NAMES)


def _in_chunks(conn: sqlite3.Connection, sql_for: Callable[[int], str], values: list, width: int) -> None:
    """Run ``sql_for(count)`` (a statement taking ``count`` rows' values) over ``values`` by chunks."""
    for _start, count, chunk in _chunks(conn, values, width):
        conn.execute(sql_for(count), chunk)


def _chunks(conn: sqlite3.Connection, values: list, width: int) -> Iterator[tuple[int, int, list]]:
    """``values`` (one row's ``width`` values after another) as chunks ``(first row, rows, values)``.

    One statement per chunk, not ``executemany`` or a statement per row: each statement releases
    the GIL around its ``sqlite3_step`` and must take it back, and in the server's own process (the
    writes its writer thread makes) that means waiting on the busy event loop for up to the switch
    interval (5 ms) each time: with a thread spinning beside it, a commit of 256 batches from 64
    ranks took 450-560 ms with an update per rank, 70-78 ms with the one progress statement. Chunks
    hold a power-of-two number of rows (the binary digits of the count), so a few statement texts
    cover every count and stay in sqlite3's statement cache.
    """
    rows = len(values) // width
    largest = _power_of_two_floor(conn.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER) // width)
    start = 0
    while start < rows:
        count = min(largest, _power_of_two_floor(rows - start))
        yield start, count, values[start * width : (start + count) * width]
        start += count


def _power_of_two_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@functools.lru_cache(maxsize=64)
def _insert_sql(table: str, columns: tuple[str, ...], conflict: str, count: int) -> str:
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT OR {conflict} INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row] * count)


@functools.lru_cache(maxsize=32)
def _progress_sql(count: int) -> str:
    """Set ``count`` ranks' progress, each row ``(job_id, rank, step, last_seen, dropped)``, in one
    statement: an upsert of the joined rows, so only ranks that have a row (a hello) are touched,
    and every one of them conflicts (portable to SQLite 3.24, which lacks ``UPDATE ... FROM``)."""
    values = ", ".join(["(?, ?, ?, ?, ?)"] * count)
    return (
        "INSERT INTO ranks (job_id, rank, host, pid, step, last_seen, connected, closed_normally, dropped)"
        " SELECT r.job_id, r.rank, r.host, r.pid, v.column3, v.column4, r.connected, r.closed_normally, v.column5"
        f" FROM (VALUES {values}) AS v JOIN ranks AS r ON r.job_id = v.column1 AND r.rank = v.column2"
        " WHERE true"  # SQLite's parser needs a WHERE between a SELECT and ON CONFLICT
        " ON CONFLICT (job_id, rank) DO UPDATE SET step = MAX(step, excluded.step),"
        " last_seen = excluded.last_seen, dropped = excluded.dropped"
    )


# ------------------------------------------------------------------------------------ frames


def _send(stream: BinaryIO, body: bytes) -> None:
    stream.write(_LENGTH.pack(len(body)))
    stream.write(body)  # a large body goes to the pipe as it is, not copied into the buffer
    stream.flush()


_DONE = b""  # the child's answer: committed
_HELD = b"\x01"  # committed, with coarse rollups held back (anything else: the error's text)


def _pickle(entries: object) -> bytes:
    # ``fast``: no memo. Entries are plain trees, and the memo cost a third of the pickling.
    out = io.BytesIO()
    pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.fast = True
    pickler.dump(entries)
    return out.getvalue()


def _read(stream: BinaryIO) -> bytes | None:
    """The next frame's body; None at a clean EOF."""
    head = stream.read(_LENGTH.size)
    if not head:
        return None
    if len(head) < _LENGTH.size:
        raise EOFError("the stream ended inside a frame")
    (length,) = _LENGTH.unpack(head)
    body = stream.read(length)
    if len(body) < length:
        raise EOFError("the stream ended inside a frame")
    return body


class WriterError(RuntimeError):
    """The writer process could not write a batch of rows (nothing of it was committed)."""


class WriterProcess:
    """The parent's handle on the child; used from one thread (the store's writer) at a time."""

    def __init__(self, path: str):
        self.path = path
        self._child: subprocess.Popen | None = None

    def start(self) -> None:
        self._child = subprocess.Popen(
            # -I: the script's folder (the store package's modules) stays off sys.path, as do PYTHON* variables.
            [sys.executable, "-I", os.path.abspath(__file__), self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._child.stdin is not None
        with contextlib.suppress(ImportError, AttributeError, OSError):  # Linux only; capped by fs.pipe-max-size
            # A commit's entries (about 500 bytes a batch) pass in a few writes, not one per 64 KiB:
            # this halved the server's CPU per batch in the hand-off.
            import fcntl

            fcntl.fcntl(self._child.stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    @property
    def pid(self) -> int | None:
        return None if self._child is None else self._child.pid

    def write(self, entries: list[Entry], flush: bool = False) -> bool:
        """Commit ``entries`` in the child; ``WriterError`` when they were not. True when the child
        holds coarse rollups back (``rollup.Held``): a ``flush`` (with or without entries) writes them."""
        if self._child is None:
            log.warning("starting a new metric writer process; the last one failed")
            self.start()
        assert self._child is not None and self._child.stdin is not None and self._child.stdout is not None
        try:
            _send(self._child.stdin, _pickle((entries, flush)))
            answer = _read(self._child.stdout)
            if answer is None:
                raise EOFError("it exited")
        except (OSError, EOFError) as err:
            self._stop(kill=True)  # the next write starts a new one
            raise WriterError(f"the metric writer process failed: {err}") from None
        if answer not in (_DONE, _HELD):
            raise WriterError(answer.decode(errors="replace"))
        return answer == _HELD

    def close(self) -> None:
        """Let the child finish what it has and exit (EOF on its stdin)."""
        self._stop(kill=False)

    def _stop(self, kill: bool) -> None:
        child, self._child = self._child, None
        if child is None:
            return
        if kill:
            child.kill()
        try:
            if child.stdin is not None:
                child.stdin.close()
        except OSError:
            pass  # a dead child's pipe
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        finally:
            if child.stdout is not None:
                child.stdout.close()


def serve(path: str, requests: BinaryIO, answers: BinaryIO) -> None:
    """The child's loop: one transaction per frame of rows, an answer per frame, until EOF."""
    # A frame unpickles into tens of thousands of tuples, which set off collection after collection
    # (a tenth of the child's time); they hold no reference cycles, so nothing needs collecting.
    gc.disable()
    # Ctrl-C in a terminal (or a stop, or the terminal closing: SIGHUP) signals the whole process
    # group: the server then shuts down and flushes what is queued through this process, so the
    # server alone says when it stops (EOF).
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    conn = connect_writer(path)
    held = rollup.Held()
    try:
        conn.execute("BEGIN")
        if rollup.repair(conn):
            log.warning("rebuilt the coarse rollups: the last metric writer process died holding some back")
        conn.execute("COMMIT")
        while (body := _read(requests)) is not None:
            entries, flush = pickle.loads(body)
            conn.execute("BEGIN")
            try:
                write_rows(conn, metric_rows(entries), held, flush)
                conn.execute("COMMIT")
            except Exception as err:  # told to the parent, which fails the batches' future
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                held.rolled_back()
                _send(answers, f"{type(err).__name__}: {err}".encode())
            else:
                held.committed()
                _send(answers, _HELD if held.spans else _DONE)
        if held.spans:  # the server is stopping: what is held back, written
            conn.execute("BEGIN")
            write_rows(conn, metric_rows([]), held, flush=True)
            conn.execute("COMMIT")
            held.committed()
    finally:
        conn.close()


if __name__ == "__main__":
    serve(sys.argv[1], sys.stdin.buffer, sys.stdout.buffer)
