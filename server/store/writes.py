"""The store's writes: each takes the writer's connection and runs inside its transaction.

``Store.write`` / ``Store.submit`` queue them on the writer thread; ``metric_entry`` is ingest's,
made on the event loop and written by the writer process (``process.write_rows``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import sqlite3

from avgctl.protocol import CommandAck, ControlView, Hello
from avgctl.server.api import AutotuneView, CommandOut
from avgctl.server.records import EncodedBatch
from avgctl.server.store import process
from avgctl.server.store.reads import get_command

log = logging.getLogger(__name__)


class UnknownJob(LookupError):
    """No job with that id."""


class Conflict(ValueError):
    """A write that contradicts what is stored (e.g. a hello with another world size). Its message
    goes to the sender: it names nothing the sender did not send (no host, pid or world size)."""


class NotMember(PermissionError):
    """A hello whose ``job_secret`` is not the one the job was bound to: not a process of this job."""


def secret_hash(secret: str) -> str:
    """What the store keeps of a job's secret (sha256, hex): a stolen file does not give it away."""
    return hashlib.sha256(secret.encode()).hexdigest()


def hello(conn: sqlite3.Connection, msg: Hello, now: float) -> None:
    """A rank (re)connected: create or update its job and rank; rank 0 brings the control state.

    The job is bound to the hello's secret at its first hello (or the first since the store knew
    secrets); ``NotMember`` for any other secret, before anything is read or written for it.
    """
    row = conn.execute("SELECT world_size, secret_hash FROM jobs WHERE id = ?", (msg.job_id,)).fetchone()
    presented = secret_hash(msg.job_secret)
    control, _ = _control_view(msg.control)
    if row is None:
        conn.execute(
            "INSERT INTO jobs (id, world_size, status, step, control, autotune, config, created_at, updated_at,"
            " secret_hash) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?)",
            (
                msg.job_id,
                msg.world_size,
                msg.step,
                control,
                AutotuneView().model_dump_json(),
                msg.config.model_dump_json(),
                now,
                now,
                presented,
            ),
        )
    elif row[1] is not None and not hmac.compare_digest(row[1], presented):
        raise NotMember("not a process of this job")
    if row is not None and row[1] is None:
        conn.execute("UPDATE jobs SET secret_hash = ? WHERE id = ?", (presented, msg.job_id))
    if row is not None and row[0] != msg.world_size:
        (connected,) = conn.execute(
            "SELECT COUNT(*) FROM ranks WHERE job_id = ? AND connected = 1", (msg.job_id,)
        ).fetchone()
        if connected:
            raise Conflict(f"world size {msg.world_size} contradicts the running job")
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


def write_metrics(
    conn: sqlite3.Connection, job_id: str, rank: int, batch: EncodedBatch, now: float, max_ahead: int | None = None
) -> None:
    """Store one rank's batch (received at ``now``). Rank 0's newest control view becomes the job's
    if it is newer and at most ``max_ahead`` versions past the stored one (None: no bound); its
    control events are stored as they are, either way."""
    entry = metric_entry(job_id, rank, batch, now)
    control = entry[6]
    if control is not None and not _reachable(conn, job_id, control[1], max_ahead):
        entry = (*entry[:6], None, *entry[7:])
    process.write_rows(conn, process.metric_rows([entry]))


def metric_entry(job_id: str, rank: int, batch: EncodedBatch, now: float) -> process.Entry:
    """A batch as the writer process takes it: plain tuples, so pickling it is all C (``process.Entry``)."""
    events: list[tuple[int, str]] = []
    control = None
    if batch.control:  # rare: a control change
        events = [(e.step, e.control.model_dump_json()) for e in batch.control]
        control = _control_view(batch.control[-1].control) if rank == 0 else None
    latest = batch.latest
    return (
        job_id,
        rank,
        now,
        batch.steps,
        batch.rounds,
        events,
        control,
        batch.dropped,
        batch.top,
        None if latest is None else (latest.step, latest.divergence_mean, latest.divergence_max),
    )


def write_metric_batches(conn: sqlite3.Connection, entries: list[tuple[str, int, EncodedBatch, float]]) -> None:
    """Store ``(job_id, rank, batch, received_at)`` entries on ``conn`` (the writer process does the
    same with what ``add_metrics`` queues)."""
    process.write_rows(conn, process.metric_rows([metric_entry(*entry) for entry in entries]))


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
    return get_command(conn, job_id, cur.lastrowid)  # type: ignore[return-value]


def resolve_command(
    conn: sqlite3.Connection, job_id: str, ack: CommandAck, now: float, max_ahead: int | None = None
) -> CommandOut | None:
    """Record rank 0's ack. Only a pending command changes (a re-sent ack is a no-op); returns it then.

    An applied command's control view becomes the job's, unless it is older than the stored one or
    more than ``max_ahead`` versions newer (the commands delivered and not yet acknowledged: each
    applied one adds one; None: no bound).
    """
    cur = conn.execute(
        "UPDATE commands SET status = ?, applied_step = ?, reason = ?, updated_at = ?"
        " WHERE id = ? AND job_id = ? AND status = 'pending'",
        (ack.status, ack.applied_step, ack.reason, now, ack.command_id, job_id),
    )
    if cur.rowcount == 0:
        return None
    if ack.control is not None and ack.status == "applied" and _reachable(conn, job_id, ack.control.version, max_ahead):
        process.set_controls(conn, [(job_id, *_control_view(ack.control), now)])
    return get_command(conn, job_id, ack.command_id)


def _reachable(conn: sqlite3.Connection, job_id: str, version: int, max_ahead: int | None) -> bool:
    """Whether the job's own exchange can have reached control ``version``: at most ``max_ahead``
    past the stored one. A view beyond it would hide every real update (``set_controls`` keeps the
    highest version), so it is ignored."""
    if max_ahead is None:
        return True
    row = conn.execute("SELECT json_extract(control, '$.version') FROM jobs WHERE id = ?", (job_id,)).fetchone()
    stored = 0 if row is None or row[0] is None else int(row[0])
    if version <= stored + max_ahead:
        return True
    log.warning(
        "ignored control version %d of job %s: at most %d past the stored %d", version, job_id, max_ahead, stored
    )
    return False


def set_autotune(conn: sqlite3.Connection, job_id: str, view: AutotuneView, now: float) -> int:
    """Store the autopilot settings; returns the job's current step (the command's applied step)."""
    row = conn.execute("SELECT step FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise UnknownJob(job_id)
    conn.execute("UPDATE jobs SET autotune = ?, updated_at = ? WHERE id = ?", (view.model_dump_json(), now, job_id))
    return row[0]


def report_autotune(
    conn: sqlite3.Connection, job_id: str, view: AutotuneView, expected: tuple[bool, float | None]
) -> bool:
    """Store the autopilot's report on a job, unless its settings are no longer ``expected``
    (``(enabled, target_divergence)``); returns whether it was stored."""
    row = conn.execute("SELECT autotune FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        return False
    stored = AutotuneView.model_validate_json(row[0])
    # set_autotune owns the settings: a report that a newer switch overtook must not undo it.
    if (stored.enabled, stored.target_divergence) != expected:
        return False
    conn.execute("UPDATE jobs SET autotune = ? WHERE id = ?", (view.model_dump_json(), job_id))
    return True
