"""The store's reads: jobs, commands, metric series, the dashboard's snapshot and the Prometheus figures.

Each takes a read connection (``Readers``: one per thread; WAL lets them run beside the writers).
A read of several statements that must agree runs inside ``Readers.snapshot()``.
"""

from __future__ import annotations

import contextlib
import json
import math
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

from avgctl.protocol import AveragerConfig
from avgctl.server.api import CommandOut, JobControl, JobDetail, JobOut, RankOut
from avgctl.server.records import json_text
from avgctl.server.store import process


class Readers:
    """The read connections to one file, one per thread that reads, closed together."""

    def __init__(self, path: str):
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()

    def connection(self) -> sqlite3.Connection:
        """This thread's connection (autocommit: each statement sees the latest commit)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = process.connect(self.path)
            self._local.conn = conn
            with self._lock:
                self._all.append(conn)
        return conn

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: every SELECT inside sees the same committed state (in autocommit
        each would see its own, so a job's row and its ranks' rows could disagree)."""
        conn = self.connection()
        conn.execute("BEGIN")
        try:
            yield conn
        finally:
            conn.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            for conn in self._all:
                conn.close()
            self._all.clear()


# ------------------------------------------------------------------------------ jobs


def list_jobs(conn: sqlite3.Connection) -> list[JobOut]:
    cur = conn.execute("SELECT * FROM jobs ORDER BY updated_at DESC")
    names = [d[0] for d in cur.description]
    return [_job_out(dict(zip(names, row))) for row in cur.fetchall()]


def get_job(conn: sqlite3.Connection, job_id: str) -> JobDetail | None:
    """The job and its ranks; run it in a ``snapshot()``, so both are of one commit."""
    cur = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,))
    row = cur.fetchone()
    if row is None:
        return None
    job = _job_out(dict(zip([d[0] for d in cur.description], row)))
    ranks = [
        RankOut(rank=r, host=h, pid=p, step=s, last_seen=ls, connected=bool(c), dropped=d)
        for r, h, p, s, ls, c, d in conn.execute(
            "SELECT rank, host, pid, step, last_seen, connected, dropped FROM ranks WHERE job_id = ? ORDER BY rank",
            (job_id,),
        )
    ]
    return JobDetail(**job.model_dump(), ranks=ranks)


def _job_out(row: dict[str, Any]) -> JobOut:
    return JobOut(
        id=row["id"],
        world_size=row["world_size"],
        status=row["status"],
        step=row["step"],
        control=JobControl(**json.loads(row["control"]), autotune=json.loads(row["autotune"])),
        config=AveragerConfig.model_validate_json(row["config"]) if row["config"] else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        divergence_mean=_divergence(row["divergence_mean"], row["divergence_step"]),
        divergence_max=_divergence(row["divergence_max"], row["divergence_step"]),
        last_seen=row["last_seen"],
    )


def _divergence(value: float | None, step: int | None) -> float | None:
    # SQLite stores a NaN as NULL (an infinity as itself). The column is set with its round's step,
    # so NULL beside a step was a NaN: the round happened and its figure was not a number.
    return math.nan if value is None and step is not None else value


# ------------------------------------------------------------------------------ commands

# Named, not ``*``: ``_command_out`` takes them by position (files differ in their columns' order).
_COMMAND_COLUMNS = (
    "id, job_id, author, created_at, body, type, status, applied_step, reason, updated_at, note,"
    " control_version, rolled_back_at_step, rolled_back_at"
)


def list_commands(conn: sqlite3.Connection, job_id: str, limit: int = 1000) -> list[CommandOut]:
    """The job's latest ``limit`` commands, oldest first."""
    rows = conn.execute(
        f"SELECT {_COMMAND_COLUMNS} FROM (SELECT * FROM commands WHERE job_id = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
        (job_id, limit),
    ).fetchall()
    return [_command_out(row) for row in rows]


def get_command(conn: sqlite3.Connection, job_id: str, command_id: int) -> CommandOut | None:
    row = conn.execute(
        f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE id = ? AND job_id = ?", (command_id, job_id)
    ).fetchone()
    return None if row is None else _command_out(row)


def pending_commands(conn: sqlite3.Connection, job_id: str) -> list[CommandOut]:
    rows = conn.execute(
        f"SELECT {_COMMAND_COLUMNS} FROM commands WHERE job_id = ? AND status = 'pending' ORDER BY id", (job_id,)
    ).fetchall()
    return [_command_out(row) for row in rows]


def _command_out(row: tuple) -> CommandOut:
    cid, job_id, author, created_at, body, ctype, status, applied_step, reason, updated_at, note, *rest = row
    control_version, rolled_back_at_step, rolled_back_at = rest
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
        control_version=control_version,
        rolled_back_at_step=rolled_back_at_step,
        rolled_back_at=rolled_back_at,
    )


# ------------------------------------------------------------------------------ metric series


def metrics(
    conn: sqlite3.Connection,
    job_id: str,
    since_step: int = 0,
    ranks: list[int] | None = None,
    names: list[str] | None = None,
    limit: int = 100_000,
) -> dict[str, list[dict]]:
    """Stored series from ``since_step`` on (at most ``limit`` records of each kind, oldest first):
    ``metrics_text`` read back, for callers that want the records as objects."""
    series = json.loads("".join(metrics_text(conn, job_id, since_step, ranks, names, limit)))
    del series["job_id"]
    return series


# Rows fetched from SQLite per piece of a streamed answer (``metrics_text``): at the ~150 bytes of
# a typical record, pieces of ~150 KB, so the server holds a few of them whatever the answer's size.
STREAM_ROWS = 256


def metrics_text(
    conn: sqlite3.Connection,
    job_id: str,
    since_step: int = 0,
    ranks: list[int] | None = None,
    names: list[str] | None = None,
    limit: int = 100_000,
) -> Iterator[str]:
    """``metrics`` as pieces of one JSON object (``MetricsOut``'s), written as SQLite yields the rows:
    the stored record texts are spliced (parsed only to keep ``names``), never gathered into one
    list. Run it inside one read transaction, so the three series are of one commit."""
    rank_sql, rank_args = _rank_filter(ranks)
    yield '{"job_id":' + json.dumps(job_id)
    for table in ("steps", "rounds"):
        cur = conn.execute(
            f"SELECT rank, body FROM {table} WHERE job_id = ? AND step >= ?{rank_sql} ORDER BY step, rank LIMIT ?",
            (job_id, since_step, *rank_args, limit),
        )
        yield from _array(
            f',"{table}":[',
            cur,
            (lambda rank, body: json_text(_record(rank, body, names))) if names else _record_json,
        )
    cur = conn.execute(
        f"SELECT rank, step, control, note FROM control_events WHERE job_id = ? AND step >= ?{rank_sql}"
        " ORDER BY id LIMIT ?",
        (job_id, since_step, *rank_args, limit),
    )
    yield from _array(',"control_events":[', cur, _control_event_json)
    yield "}"


def control_event(rank: int, step: int, control: str, note: str | None) -> dict:
    """A stored control event as readers get it: ``note`` only on those the server stored itself (a
    restore from a checkpoint: ``writes.Restore``)."""
    event = {"rank": rank, "step": step, "control": json.loads(control)}
    if note is not None:
        event["note"] = note
    return event


def _control_event_json(rank: int, step: int, control: str, note: str | None) -> str:
    text = f'{{"rank":{rank},"step":{step},"control":{control}'
    return text + ("}" if note is None else f',"note":{json.dumps(note)}}}')


def stream_metrics(
    path: str,
    job_id: str,
    since_step: int = 0,
    ranks: list[int] | None = None,
    names: list[str] | None = None,
    limit: int = 100_000,
) -> Iterator[bytes]:
    """``metrics_text`` encoded, on a connection of its own (a streamed answer's pieces are read on
    whichever of the server's threads is free, and the readers' connections are one per thread),
    in one read transaction that ends, with the connection, when the stream ends or is dropped."""
    conn = process.connect(path)
    try:
        conn.execute("BEGIN")
        for piece in metrics_text(conn, job_id, since_step, ranks, names, limit):
            yield piece.encode()
    finally:
        conn.close()  # ends the read transaction


def _array(opening: str, cur: sqlite3.Cursor, text) -> Iterator[str]:
    """``opening``, the rows of ``cur`` as ``text(*row)`` joined by commas, then ``]``: one piece per
    ``STREAM_ROWS`` rows."""
    piece, sep = opening, ""
    while rows := cur.fetchmany(STREAM_ROWS):
        piece += sep + ",".join(text(*row) for row in rows)
        sep = ","
        yield piece
        piece = ""
    yield piece + "]"


# A snapshot's record texts, at most (half for steps, half for rounds), whatever the records' size:
# the default 20,000 step records of ~170 bytes are ~3.4 MB and fit; 20,000 of the largest the
# protocol takes (~2.9 KB) were 58 MB, and a server held 4-5 copies of it while sending it.
SNAPSHOT_BYTES = 8 * 2**20
# A stored record longer than this is left out of snapshots (one stored before scalar names were
# bounded; a step record is under 4 KB now); the REST API still serves it.
SNAPSHOT_RECORD_BYTES = 16 * 2**10
SNAPSHOT_SAMPLE = 256  # records whose mean size sizes the snapshot


def snapshot_json(
    conn: sqlite3.Connection, job_id: str, budget: int, commands: int = 200, events: int = 1000
) -> str | None:
    """What a dashboard needs on connect, as JSON text: the job, recent series (bounded,
    downsampled), control events and commands. The records are spliced from their stored text,
    not parsed (a snapshot holds thousands); their texts are at most ``SNAPSHOT_BYTES``."""
    job = get_job(conn, job_id)
    if job is None:
        return None
    per_rank = max(100, budget // max(1, job.world_size))
    rows = conn.execute(
        "SELECT rank, step, control, note FROM"
        " (SELECT * FROM control_events WHERE job_id = ? ORDER BY id DESC LIMIT ?) ORDER BY id",
        (job_id, events),
    ).fetchall()
    head = {
        "kind": "snapshot",
        "job": job.model_dump(mode="json"),
        "control_events": [control_event(*row) for row in rows],
        "commands": [c.model_dump(mode="json") for c in list_commands(conn, job_id, commands)],
    }
    parts = [json_text(head)[:-1]]  # a diverged job's figures as strings, never bare NaN tokens
    for table in ("steps", "rounds"):
        # The record budget, cut to what fits the table's share of SNAPSHOT_BYTES at its records' size.
        fits = SNAPSHOT_BYTES // 2 // max(1, _typical_size(conn, table, job_id))
        per_table = max(1, min(per_rank, fits // max(1, job.world_size)))
        records, room = [], SNAPSHOT_BYTES // 2
        for rank, body, w in _downsampled(conn, table, job_id, max(0, job.step - per_table // 2), per_table // 2):
            text = _record_json(rank, body, w)
            room -= len(text) + 1
            if room < 0:  # the typical size misjudged these (a safety net: the newest are left out)
                break
            records.append(text)
        parts += (f',"{table}":[', ",".join(records), "]")
        del records  # the joined text is all that is kept of them
    parts.append("}")
    return "".join(parts)


def _typical_size(conn: sqlite3.Connection, table: str, job_id: str) -> int:
    """Mean text length of the job's newest records of ``table`` (a sample of SNAPSHOT_SAMPLE)."""
    (size,) = conn.execute(
        # In the key's order (the last rank's newest), so SQLite reads SNAPSHOT_SAMPLE rows, not the job's.
        f"SELECT AVG(LENGTH(body)) FROM (SELECT body FROM {table} WHERE job_id = ? AND LENGTH(body) <= ?"
        f" ORDER BY job_id DESC, rank DESC, step DESC LIMIT {SNAPSHOT_SAMPLE})",
        (job_id, SNAPSHOT_RECORD_BYTES),
    ).fetchone()
    return int(size or 1) + 16  # the rank and weight spliced in


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


def _record_json(rank: int, body: str, weight: int = 1) -> str:
    # The record as ``_record(rank, body, None)`` makes it, plus ``"w": weight`` when it stands for
    # more than one, as text: a stored body is a JSON object that starts with "{".
    head = f'"rank":{rank},"w":{weight}' if weight > 1 else f'"rank":{rank}'
    return f"{{{head},{body[1:]}" if body != "{}" else f"{{{head}}}"


def _downsampled(
    conn: sqlite3.Connection, table: str, job_id: str, recent_from: int, older: int
) -> Iterator[tuple[int, str, int]]:
    """``(rank, body, weight)``: at most ``older`` evenly spaced records per rank from before
    ``recent_from``, each with how many records it stands for (every k-th of a rank's is kept: sums
    over them, such as time spent, must count each k times), then those from ``recent_from`` on in
    full; records longer than ``SNAPSHOT_RECORD_BYTES`` left out. Rows are read as they are used.

    The window runs over the keys alone and the kept rows' texts are joined in after: with the
    texts in the window, SQLite sorted every older record's text to keep a few thousand.
    """
    key = "w.rank = t.rank AND w.step = t.step" + (" AND w.group_size = t.group_size" if table == "rounds" else "")
    extra = ", group_size" if table == "rounds" else ""
    yield from conn.execute(
        f"SELECT t.rank, t.body, w.k FROM (SELECT rank, step{extra},"
        " ROW_NUMBER() OVER (PARTITION BY rank ORDER BY step) AS rn,"
        f" (COUNT(*) OVER (PARTITION BY rank) + ? - 1) / ? AS k FROM {table} WHERE job_id = ? AND step < ?) AS w"
        f" JOIN {table} AS t ON t.job_id = ? AND {key}"
        " WHERE (w.rn - 1) % w.k = 0 AND LENGTH(t.body) <= ? ORDER BY w.step, w.rank",
        (older, older, job_id, recent_from, job_id, SNAPSHOT_RECORD_BYTES),
    )
    yield from conn.execute(
        f"SELECT rank, body, 1 FROM {table} WHERE job_id = ? AND step >= ? AND LENGTH(body) <= ? ORDER BY step, rank",
        (job_id, recent_from, SNAPSHOT_RECORD_BYTES),
    )


# ------------------------------------------------------------------------------ Prometheus


def stats(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Per-job figures for Prometheus."""
    out = []
    for job_id, step, control, mean, mx, at in conn.execute(
        "SELECT id, step, control, divergence_mean, divergence_max, divergence_step FROM jobs"
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
                "divergence_mean": _divergence(mean, at),  # Prometheus writes NaN and +Inf as they are
                "divergence_max": _divergence(mx, at),
                "connected_ranks": connected,
                "dropped": dropped,
                "commands": by_status,
            }
        )
    return out
