"""The store's reads: jobs, commands, metric series, the dashboard's snapshot and the Prometheus figures.

Each takes a read connection (``Readers``: one per thread; WAL lets them run beside the writers).
A read of several statements that must agree runs inside ``Readers.snapshot()``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

from avgctl.protocol import AveragerConfig
from avgctl.server.api import CommandOut, JobControl, JobDetail, JobOut, RankOut
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
        divergence_mean=row["divergence_mean"],
        divergence_max=row["divergence_max"],
        last_seen=row["last_seen"],
    )


# ------------------------------------------------------------------------------ commands

# Named, not ``*``: ``_command_out`` takes them by position (``note`` is last in every file).
_COMMAND_COLUMNS = "id, job_id, author, created_at, body, type, status, applied_step, reason, updated_at, note"


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


# ------------------------------------------------------------------------------ metric series


def metrics(
    conn: sqlite3.Connection,
    job_id: str,
    since_step: int = 0,
    ranks: list[int] | None = None,
    names: list[str] | None = None,
    limit: int = 100_000,
) -> dict[str, list[dict]]:
    """Stored series from ``since_step`` on (at most ``limit`` records of each kind, oldest first)."""
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


def snapshot_json(
    conn: sqlite3.Connection, job_id: str, budget: int, commands: int = 200, events: int = 1000
) -> str | None:
    """What a dashboard needs on connect, as JSON text: the job, recent series (bounded,
    downsampled), control events and commands. The records are spliced from their stored text,
    not parsed (a snapshot holds thousands)."""
    job = get_job(conn, job_id)
    if job is None:
        return None
    per_rank = max(100, budget // max(1, job.world_size))
    recent_from = max(0, job.step - per_rank // 2)
    rows = conn.execute(
        "SELECT rank, step, control FROM (SELECT * FROM control_events WHERE job_id = ? ORDER BY id DESC LIMIT ?)"
        " ORDER BY id",
        (job_id, events),
    ).fetchall()
    head = {
        "kind": "snapshot",
        "job": job.model_dump(mode="json"),
        "control_events": [{"rank": r, "step": s, "control": json.loads(c)} for r, s, c in rows],
        "commands": [c.model_dump(mode="json") for c in list_commands(conn, job_id, commands)],
    }
    text = json.dumps(head)[:-1]
    for table in ("steps", "rounds"):
        records = _downsampled(conn, table, job_id, recent_from, per_rank // 2)
        text += f',"{table}":[' + ",".join(_record_json(rank, body, w) for rank, body, w in records) + "]"
    return text + "}"


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


# ------------------------------------------------------------------------------ Prometheus


def stats(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Per-job figures for Prometheus."""
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
