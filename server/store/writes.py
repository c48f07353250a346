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
from dataclasses import dataclass

from avgctl.protocol import CommandAck, ControlView, Hello
from avgctl.protocol.commands import NOT_DILOCO
from avgctl.protocol.hierarchy import InvalidHierarchy, hierarchy_periods
from avgctl.server.api import AutotuneView, CommandOut
from avgctl.server.records import EncodedBatch
from avgctl.server.store import process
from avgctl.server.store.reads import control_event, get_command

log = logging.getLogger(__name__)


class UnknownJob(LookupError):
    """No job with that id."""


class Conflict(ValueError):
    """A write that contradicts what is stored (e.g. a hello with another world size). Its message
    goes to the sender: it names nothing the sender did not send (no host, pid or world size)."""


class NotMember(PermissionError):
    """A hello whose ``job_secret`` is not the one the job was bound to: not a process of this job."""


class JobFinished(Exception):
    """A command for a finished job: no rank is left to apply it (the REST answer is 409)."""


class InapplicableCommand(ValueError):
    """A command the job's averager can never apply (a ``set_hierarchy`` that does not fit its group
    sizes, a ``set_outer_lr`` for an averager without an outer optimizer); the message says why (the
    REST answer is 422)."""


"""Why a ``set_outer_lr`` for a job that is not DiLoCo is refused: rank 0's own words for it
(``worker/control_state.py``), so the answer reads the same whichever side refuses."""


FINISHED_REASON = "the job finished before the command was applied"
"""The reason of every command still pending when its job finished."""


def secret_hash(secret: str) -> str:
    """What the store keeps of a job's secret (sha256, hex): a stolen file does not give it away."""
    return hashlib.sha256(secret.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Restore:
    """A job resumed from an earlier state: its rank 0 said hello with a lower control version
    than the job had, or at an earlier step (a restart from a checkpoint, or from scratch)."""

    job_id: str
    step: int
    """The step the job resumed at (rank 0's hello)."""
    from_version: int
    to_version: int
    from_step: int
    """Rank 0's last step before."""
    event: dict
    """The control event stored for it, as readers get it (``reads.control_event``): the restored
    control state from ``step`` on, its ``note`` the label dashboards show."""
    rolled_back: list[CommandOut]
    """The applied commands whose control version the restored state lacks, now marked rolled back."""


def restore_label(step: int, from_version: int, to_version: int) -> str:
    """``restored from checkpoint (version 3 -> 2)``: what a restore's control event says."""
    versions = f"version {from_version} -> {to_version}" if from_version != to_version else f"version {to_version}"
    return f"restarted from step 0 ({versions})" if step == 0 else f"restored from checkpoint ({versions})"


def hello(conn: sqlite3.Connection, msg: Hello, now: float) -> Restore | None:
    """A rank (re)connected: create or update its job and rank; rank 0 brings the control state.

    The job is bound to the hello's secret at its first hello (or the first since the store knew
    secrets); ``NotMember`` for any other secret, before anything is read or written for it.
    A rank-0 hello that takes the job back (``_restore``) is recorded, and returned.
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
    restore = _restore(conn, msg, now) if row is not None and msg.rank == 0 else None
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
    return restore


def _restore(conn: sqlite3.Connection, msg: Hello, now: float) -> Restore | None:
    """Record what rank 0's hello undid, if it takes the job back: a control version below the
    stored one, or a step before rank 0's last one (a hello at step 0 with the same version is a
    new start with nothing to undo). Only rank 0's exchange moves the version, one per applied
    command, and a live process never goes back, so a lower version is a process that resumed
    from an earlier state. The applied commands above it are marked rolled back at the hello's
    step, and a control event there carries the restored state, labelled."""
    (stored,) = conn.execute(
        "SELECT json_extract(control, '$.version') FROM jobs WHERE id = ?", (msg.job_id,)
    ).fetchone()
    stored = int(stored or 0)
    row = conn.execute("SELECT step FROM ranks WHERE job_id = ? AND rank = 0", (msg.job_id,)).fetchone()
    last_step = row[0] if row is not None else msg.step
    version = msg.control.version
    if version >= stored and not 0 < msg.step < last_step:
        return None
    ids = [
        cid
        for (cid,) in conn.execute(
            "SELECT id FROM commands WHERE job_id = ? AND status = 'applied' AND control_version > ?"
            " AND rolled_back_at IS NULL ORDER BY id",
            (msg.job_id, version),
        )
    ]
    conn.executemany(
        "UPDATE commands SET rolled_back_at_step = ?, rolled_back_at = ?, updated_at = ? WHERE id = ?",
        [(msg.step, now, now, cid) for cid in ids],
    )
    label = restore_label(msg.step, stored, version)
    body, _ = _control_view(msg.control)
    conn.execute(
        "INSERT INTO control_events (job_id, rank, step, control, note) VALUES (?, 0, ?, ?, ?)",
        (msg.job_id, msg.step, body, label),
    )
    log.warning(
        "job %s resumed at step %d (rank 0 was at step %d): %s; commands rolled back: %s",
        msg.job_id,
        msg.step,
        last_step,
        label,
        ", ".join(map(str, ids)) or "none",
    )
    return Restore(
        job_id=msg.job_id,
        step=msg.step,
        from_version=stored,
        to_version=version,
        from_step=last_step,
        event=control_event(0, msg.step, body, label),
        rolled_back=[get_command(conn, msg.job_id, cid) for cid in ids],  # type: ignore[misc]
    )


def disconnect(conn: sqlite3.Connection, job_id: str, rank: int, normal: bool, now: float) -> list[CommandOut]:
    """A rank's connection ended; the job is finished once every rank closed normally. Then its
    pending commands are rejected (``FINISHED_REASON``) in the same transaction, and returned, so
    the caller can announce them; no later run under the job's id applies them."""
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
    return reject_pending(conn, job_id, now) if status == "finished" else []


def reject_pending(conn: sqlite3.Connection, job_id: str | None, now: float) -> list[CommandOut]:
    """Reject the pending commands of ``job_id`` (None: of every finished job) as ``FINISHED_REASON``;
    returns them as they are now, oldest first."""
    where = "job_id = ?" if job_id is not None else "job_id IN (SELECT id FROM jobs WHERE status = 'finished')"
    args = (job_id,) if job_id is not None else ()
    ids = conn.execute(f"SELECT job_id, id FROM commands WHERE status = 'pending' AND {where} ORDER BY id", args)
    ids = ids.fetchall()
    conn.executemany(
        "UPDATE commands SET status = 'rejected', reason = ?, updated_at = ? WHERE id = ? AND status = 'pending'",
        [(FINISHED_REASON, now, cid) for _, cid in ids],
    )
    return [get_command(conn, jid, cid) for jid, cid in ids]  # type: ignore[misc]


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
        batch.step_values,
        batch.round_values,
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
    """Log a new pending command; ``UnknownJob`` if the job was never seen, ``JobFinished`` if it
    finished, ``InapplicableCommand`` if its averager can never apply it. Nothing is logged then.

    Checked in the writer's transaction, so a job cannot finish between the check and the insert
    (``disconnect`` rejects what is pending when it finishes)."""
    row = conn.execute("SELECT status, config, control FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is None:
        raise UnknownJob(job_id)
    status, config, control = row
    if status == "finished":
        raise JobFinished(f"job {job_id!r} finished: no rank is left to apply a command")
    if body["type"] == "set_hierarchy":
        try:
            hierarchy_periods(_group_sizes(config, control), body["periods"])
        except InvalidHierarchy as err:
            raise InapplicableCommand(str(err)) from None
    if body["type"] == "set_outer_lr" and not _is_diloco(config, control):
        raise InapplicableCommand(NOT_DILOCO)
    cur = conn.execute(
        "INSERT INTO commands (job_id, author, created_at, body, type, status, updated_at, note)"
        " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
        (job_id, author, now, json.dumps(body), body["type"], now, note),
    )
    return get_command(conn, job_id, cur.lastrowid)  # type: ignore[return-value]


def _group_sizes(config: str | None, control: str) -> list[int] | None:
    """The job's group sizes as its latest rank-0 hello told them (None: not hierarchical). The
    averager's config names them; a job stored before configs were kept has its control's levels."""
    if config:
        return json.loads(config).get("group_sizes")
    hierarchy = json.loads(control).get("hierarchy")
    return None if hierarchy is None else sorted(int(size) for size in hierarchy)


def _is_diloco(config: str | None, control: str) -> bool:
    """Whether the job's averager is DiLoCo, as its latest rank-0 hello told (its config's kind); a
    job stored before configs were kept predates DiLoCo, unless its control holds an outer lr."""
    if config:
        return json.loads(config).get("kind") == "diloco"
    return json.loads(control).get("outer_lr") is not None


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
        # The version it brought: a restore to a lower one rolls it back (``_restore``).
        conn.execute("UPDATE commands SET control_version = ? WHERE id = ?", (ack.control.version, ack.command_id))
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
