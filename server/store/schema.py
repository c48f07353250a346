"""The store's tables, and the numbered migrations that bring any file to the latest version.

A file's version is its ``PRAGMA user_version``: migration ``n`` (``MIGRATIONS[n - 1]``) takes a
file from version ``n - 1`` to ``n``, in one transaction with the version bump, so a start that
fails midway leaves the file as it was. A migration, once released, never changes: a new column or
table is a new one at the end of the list.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable

from avgctl.server.store import rollup

# Version 1's tables. ``CREATE ... IF NOT EXISTS``: a file from before the versions (0) may hold them.
_TABLES = (
    """CREATE TABLE IF NOT EXISTS jobs (
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
    )""",
    """CREATE TABLE IF NOT EXISTS ranks (
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
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS steps (
        job_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, body TEXT NOT NULL,
        PRIMARY KEY (job_id, rank, step)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS rounds (
        job_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, group_size INTEGER NOT NULL,
        body TEXT NOT NULL,
        PRIMARY KEY (job_id, rank, step, group_size)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS control_events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, control TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS control_events_job ON control_events (job_id, step)",
    """CREATE TABLE IF NOT EXISTS commands (
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
    )""",
    "CREATE INDEX IF NOT EXISTS commands_job ON commands (job_id, status, id)",
)

# Columns that files from before the versions may lack (the first release's tables had none of them).
_LATER_COLUMNS = (("commands", "note", "TEXT"), ("jobs", "last_seen", "REAL"), ("jobs", "divergence_step", "INTEGER"))


def _v1_tables(conn: sqlite3.Connection) -> None:
    """Every table, in its shape as of version 1; an unversioned file gets the columns it lacks
    (appended, so ``commands.note`` comes last there too)."""
    for statement in _TABLES:
        conn.execute(statement)
    for table, column, kind in _LATER_COLUMNS:
        if column not in columns(conn, table):
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")


def _v2_control_without_autotune(conn: sqlite3.Connection) -> None:
    """A job's ``control`` is the ranks' control view alone: drop the ``autotune`` key that rows
    written before the view lost it still carry (the autopilot's settings live in ``jobs.autotune``)."""
    conn.execute(
        "UPDATE jobs SET control = json_remove(control, '$.autotune') WHERE json_type(control, '$.autotune') IS NOT NULL"
    )


def _v3_job_secret(conn: sqlite3.Connection) -> None:
    """``jobs.secret_hash``: the sha256 (hex) of the secret the job's ranks share, bound at its first
    hello; a hello with another secret is refused. Jobs from before have NULL: the next hello binds them."""
    conn.execute("ALTER TABLE jobs ADD COLUMN secret_hash TEXT")


def _v4_counters(conn: sqlite3.Connection) -> None:
    """``counters``: the server's own running totals, kept across restarts (``dropped_metric_batches``:
    metric batches it did not store, and so never confirmed; their links sent them again)."""
    conn.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID")


def _v5_rollbacks(conn: sqlite3.Connection) -> None:
    """What a restore from a checkpoint undid. ``commands.control_version``: the control version
    rank 0's ack of an applied command reported (the ranks' version with it applied; NULL for
    ``set_autotune``, rejected commands and those acknowledged before this version);
    ``commands.rolled_back_at_step`` and ``rolled_back_at``: the step the job resumed at, and when,
    after a rank-0 hello brought a control version below that one (the command stays ``applied``);
    ``control_events.note``: why the server stored an event no rank reported (the restore's label)."""
    conn.execute("ALTER TABLE commands ADD COLUMN control_version INTEGER")
    conn.execute("ALTER TABLE commands ADD COLUMN rolled_back_at_step INTEGER")
    conn.execute("ALTER TABLE commands ADD COLUMN rolled_back_at REAL")
    conn.execute("ALTER TABLE control_events ADD COLUMN note TEXT")


def _v6_rollups(conn: sqlite3.Connection) -> None:
    """``series`` and ``rollups``: each series' min, mean and max per rank over power-of-two buckets
    of steps (``rollup``), filled from the records the file holds (thinned ones as they are)."""
    for statement in rollup.TABLES:
        conn.execute(statement)
    rollup.backfill(conn)


def _v7_rollups_behind(conn: sqlite3.Connection) -> None:
    """``rollups_behind``: the spans of finest buckets whose coarser rollups a writer process holds
    back (``rollup.Held``), for the next one to bring up to date if it died. Schema 6's writer
    flagged the same in ``counters``: a file left flagged gets its coarser levels rebuilt."""
    conn.execute(rollup.BEHIND_TABLE)
    flagged = conn.execute("SELECT value FROM counters WHERE name = ?", (rollup.OLD_BEHIND,)).fetchone()
    if flagged and flagged[0]:
        rollup.coarse_from_finest(conn)
    conn.execute("DELETE FROM counters WHERE name = ?", (rollup.OLD_BEHIND,))


MIGRATIONS: tuple[Callable[[sqlite3.Connection], None], ...] = (
    _v1_tables,
    _v2_control_without_autotune,
    _v3_job_secret,
    _v4_counters,
    _v5_rollbacks,
    _v6_rollups,
    _v7_rollups_behind,
)
LATEST = len(MIGRATIONS)


class NewerSchema(RuntimeError):
    """The file was written by a newer avgctl: its schema version is beyond ``LATEST``."""


def version(conn: sqlite3.Connection) -> int:
    """The file's schema version (0: unversioned, a file from before the migrations, or a new one)."""
    return conn.execute("PRAGMA user_version").fetchone()[0]


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the migrations the file lacks, each in its own transaction; returns the version reached.

    ``conn`` is in autocommit mode (``isolation_level=None``), outside a transaction.
    """
    while True:
        conn.execute("BEGIN IMMEDIATE")  # the write lock first: two servers starting on one file migrate it once
        try:
            current = version(conn)
            if current > LATEST:
                raise NewerSchema(f"the store's file has schema version {current}; this avgctl knows up to {LATEST}")
            if current == LATEST:
                conn.execute("COMMIT")
                return current
            MIGRATIONS[current](conn)
            conn.execute(f"PRAGMA user_version = {current + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def columns(conn: sqlite3.Connection, table: str) -> list[str]:
    """``table``'s column names, in the file's order."""
    return [row[1] for row in conn.execute(f"PRAGMA table_info({table})")]
