"""Rollups: every series' min, mean and max per rank over power-of-two buckets of steps, kept as
records are written, so a whole-run query reads about one row per bucket and rank.

A series is a job's figure by name (``loss``, ``drift``, ``step_time`` and ``scalars.<name>`` from
step records, ``divergence`` and ``relative_divergence`` from round records), numbered in the
``series`` table. Level ``k`` holds buckets of ``2**k`` steps (bucket ``b`` covers steps
``b * 2**k`` to ``(b + 1) * 2**k - 1``); the levels stored are ``LEVELS`` (every second power of
two: a query at a level between two merges pairs of the finer one's rows). Below the finest level
a query reads the records themselves.

A row counts what went in: ``n`` values, of which ``nan``, ``pinf`` and ``ninf`` were NaN, +inf
and -inf (non-finite figures are data); ``lo``/``hi`` are the extremes of the values that are not
NaN, ``total`` the sum of the finite ones. Records are folded in once: a record sent again with
the same text is not counted again, and one stored again with another text (steps run again after
a restore from a checkpoint) replaces the old one's count and sum; the old value's extremes stay.
Retention thins records, never rollups, so they stay exact for the whole run.

Only the standard library is imported: the writer process loads this file beside its own.
"""

from __future__ import annotations

import functools
import math
import sqlite3
import time
from collections.abc import Callable, Iterable

FINEST_LEVEL = 4  # buckets of 16 steps: below, the records themselves are read
LEVEL_STRIDE = 2  # every second power of two is stored
COARSEST_LEVEL = 20  # about a million steps a bucket
LEVELS = tuple(range(FINEST_LEVEL, COARSEST_LEVEL + 1, LEVEL_STRIDE))
STEP_NAMES = ("loss", "drift", "step_time")
ROUND_NAMES = ("divergence", "relative_divergence")
SCALAR_PREFIX = "scalars."

TABLES = (
    """CREATE TABLE series (
        id INTEGER PRIMARY KEY,
        job_id TEXT NOT NULL,
        name TEXT NOT NULL,
        UNIQUE (job_id, name)
    )""",
    # Keyed for the query: one series, one level, a range of buckets, every rank.
    """CREATE TABLE rollups (
        series INTEGER NOT NULL, level INTEGER NOT NULL, bucket INTEGER NOT NULL, rank INTEGER NOT NULL,
        n INTEGER NOT NULL, nan INTEGER NOT NULL, pinf INTEGER NOT NULL, ninf INTEGER NOT NULL,
        lo REAL, hi REAL, total REAL NOT NULL,
        PRIMARY KEY (series, level, bucket, rank)
    ) WITHOUT ROWID""",
)

# A record's figures: (job_id, rank, step, values), the values a step's ``(loss, drift, step_time,
# scalars or None)`` or a round's ``(divergence, relative divergence)`` (None: not recorded).
Figures = tuple[str, int, int, tuple]
# A bucket's counts: [n, nan, pinf, ninf, lo, hi, total].
Counts = list
Spans = dict[str, tuple[int, int]]  # per job, a first and last finest bucket


def empty() -> Counts:
    return [0, 0, 0, 0, None, None, 0.0]


def add(counts: Counts, value: float, sign: int = 1) -> None:
    """Fold ``value`` in (``sign`` -1: take it out again, but for the extremes)."""
    counts[0] += sign
    if value != value:  # NaN
        counts[1] += sign
        return
    if value == math.inf:
        counts[2] += sign
    elif value == -math.inf:
        counts[3] += sign
    else:
        counts[6] += sign * value
    if sign > 0:
        counts[4] = value if counts[4] is None or value < counts[4] else counts[4]
        counts[5] = value if counts[5] is None or value > counts[5] else counts[5]


def merge(into: Counts, other: Counts) -> None:
    for i in range(4):
        into[i] += other[i]
    if other[4] is not None:
        into[4] = other[4] if into[4] is None else min(into[4], other[4])
        into[5] = other[5] if into[5] is None else max(into[5], other[5])
    into[6] += other[6]


def finest(
    steps: Iterable[Figures],
    rounds: Iterable[Figures] = (),
    removed_steps: Iterable[Figures] = (),
    removed_rounds: Iterable[Figures] = (),
) -> dict[tuple, Counts]:
    """The finest level's counts the records change: ``{(job_id, name, rank, bucket): counts}``;
    the ``removed`` ones are taken out again.

    Records are grouped by finest bucket first and each figure's column reduced with builtins
    (``min``, ``max``, ``sum``: C loops), value by value only where a column holds a None or a
    non-finite figure. The coarser levels are summed up from these in SQL (``coarsen``).
    """
    folded: dict[tuple, Counts] = {}
    for records, names, sign in (
        (steps, STEP_NAMES, 1),
        (rounds, ROUND_NAMES, 1),
        (removed_steps, STEP_NAMES, -1),
        (removed_rounds, ROUND_NAMES, -1),
    ):
        groups: dict[tuple, list[tuple]] = {}
        for job_id, rank, step, values in records:
            group = groups.get((job_id, rank, step >> FINEST_LEVEL))
            if group is None:
                groups[(job_id, rank, step >> FINEST_LEVEL)] = [values]
            else:
                group.append(values)
        for (job_id, rank, bucket), group in groups.items():
            columns = tuple(zip(*group))
            for name, column in zip(names, columns):
                _fold_column(folded, (job_id, name, rank, bucket), column, sign)
            if len(names) < len(columns) and any(columns[-1]):  # a step's scalars, after its figures
                scalars: dict[str, list] = {}
                for figures in columns[-1]:
                    for name, value in (figures or {}).items():
                        scalars.setdefault(name, []).append(value)
                for name, column in scalars.items():
                    _fold_column(folded, (job_id, SCALAR_PREFIX + name, rank, bucket), column, sign)
    return folded


def _fold_column(finest: dict[tuple, Counts], key: tuple, column: tuple | list, sign: int) -> None:
    """Fold one series' values of one finest bucket into ``finest[key]``."""
    if None in column:
        column = [value for value in column if value is not None]
        if not column:
            return
    total = sum(column)
    if sign == 1 and total - total == 0.0:  # nearly always: finite figures coming in
        counts = [len(column), 0, 0, 0, min(column), max(column), total]
        if key in finest:
            merge(finest[key], counts)
        else:
            finest[key] = counts
        return
    counts = finest.get(key)
    if counts is None:
        counts = finest[key] = empty()
    for value in column:
        add(counts, value, sign)


def series_ids(conn: sqlite3.Connection, keys: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
    """The ids of the ``(job_id, name)`` series, numbering the new ones."""
    wanted = set(keys)
    conn.executemany("INSERT OR IGNORE INTO series (job_id, name) VALUES (?, ?)", sorted(wanted))
    jobs = sorted({job for job, _ in wanted})
    marks = ", ".join("?" * len(jobs))
    found = conn.execute(f"SELECT job_id, name, id FROM series WHERE job_id IN ({marks})", jobs)
    return {(job, name): sid for job, name, sid in found if (job, name) in wanted}


@functools.lru_cache(maxsize=32)
def _upsert_sql(count: int) -> str:
    """Add ``count`` rows' counts to the stored ones (a row that is new is inserted)."""
    rows = ", ".join(["(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"] * count)
    return (
        f"INSERT INTO rollups (series, level, bucket, rank, n, nan, pinf, ninf, lo, hi, total) VALUES {rows}"
        " ON CONFLICT (series, level, bucket, rank) DO UPDATE SET"
        " n = n + excluded.n, nan = nan + excluded.nan, pinf = pinf + excluded.pinf, ninf = ninf + excluded.ninf,"
        " lo = COALESCE(MIN(lo, excluded.lo), lo, excluded.lo), hi = COALESCE(MAX(hi, excluded.hi), hi, excluded.hi),"
        " total = total + excluded.total"
    )


UPSERT_WIDTH = 11


def write(conn: sqlite3.Connection, finest: dict[tuple, Counts], in_chunks: Callable) -> None:
    """Add ``finest``'s counts to the finest level's stored rows, inside the caller's transaction;
    ``in_chunks`` runs a multi-row statement over flat values (the writer's ``_in_chunks``)."""
    if not finest:
        return
    ids = series_ids(conn, {(job, name) for job, name, *_ in finest})
    values: list = []
    for (job, name, rank, bucket), counts in finest.items():
        values += (ids[job, name], FINEST_LEVEL, bucket, rank, *counts)
    in_chunks(conn, _upsert_sql, values, UPSERT_WIDTH)


def write_every_level(conn: sqlite3.Connection, finest: dict[tuple, Counts], in_chunks: Callable) -> None:
    """``write``, then the coarser levels over the buckets it touched (``coarsen``)."""
    write(conn, finest, in_chunks)
    coarsen(conn, spans(finest))


def mean(n: int, nan: int, pinf: int, ninf: int, total: float | None) -> float | None:
    """A bucket's mean as IEEE arithmetic would give it (None: no values)."""
    if n <= 0:
        return None
    if nan or (pinf and ninf) or total is None:
        return math.nan
    if pinf:
        return math.inf
    if ninf:
        return -math.inf
    return total / n


# What a stored record's figure is, in SQL over ``json_each``: non-finite ones are spelled as strings.
_NUMBER = "CASE WHEN type IN ('real', 'integer') THEN value WHEN value = 'Infinity' THEN 9e999 WHEN value = '-Infinity' THEN -9e999 END"
_RECORD_FIGURES = f"""
    SELECT s.job_id, s.rank, s.step, e.key AS name, e.value AS value, e.type AS type
        FROM steps AS s, json_each(s.body) AS e WHERE e.key IN {STEP_NAMES!r} AND e.type != 'null'
    UNION ALL
    SELECT s.job_id, s.rank, s.step, '{SCALAR_PREFIX}' || e.key, e.value, e.type
        FROM steps AS s, json_each(s.body, '$.scalars') AS e WHERE e.type != 'null'
    UNION ALL
    SELECT r.job_id, r.rank, r.step, e.key, e.value, e.type
        FROM rounds AS r, json_each(r.body) AS e WHERE e.key IN {ROUND_NAMES!r} AND e.type != 'null'
"""


def backfill(conn: sqlite3.Connection) -> None:
    """Roll up the records a file already holds (all of them: run once, on an empty ``rollups``)."""
    conn.execute(f"CREATE TEMP TABLE figures AS {_RECORD_FIGURES}")
    conn.execute("INSERT OR IGNORE INTO series (job_id, name) SELECT DISTINCT job_id, name FROM figures")
    conn.execute(
        f"""INSERT INTO rollups
        SELECT se.id, {FINEST_LEVEL}, f.step >> {FINEST_LEVEL}, f.rank, COUNT(*),
            SUM(f.value = 'NaN' AND f.type = 'text'), SUM(f.value = 'Infinity' AND f.type = 'text'),
            SUM(f.value = '-Infinity' AND f.type = 'text'),
            MIN({_NUMBER}), MAX({_NUMBER}), TOTAL(CASE WHEN f.type IN ('real', 'integer') THEN f.value END)
        FROM figures AS f JOIN series AS se ON se.job_id = f.job_id AND se.name = f.name
        GROUP BY se.id, f.step >> {FINEST_LEVEL}, f.rank"""
    )
    conn.execute("DROP TABLE figures")
    coarse_from_finest(conn)


def coarse_from_finest(conn: sqlite3.Connection) -> None:
    """Every coarser level's rows from the finest level's."""
    every = conn.execute(
        f"SELECT se.job_id, MIN(r.bucket), MAX(r.bucket) FROM rollups AS r JOIN series AS se ON se.id = r.series"
        f" WHERE r.level = {FINEST_LEVEL} GROUP BY se.job_id"
    )
    coarsen(conn, {job: (first, last) for job, first, last in every.fetchall()})


# ------------------------------------------------------------------ held back in a flood

HOLD_SECONDS = 1.0  # in a flood, the coarse levels lag the records by at most this
# The spans of finest buckets whose coarser rows a writer holds back, per job: a writer that dies
# holding some leaves them here, and the next one brings those rows up to date (``repair``).
BEHIND_TABLE = """CREATE TABLE rollups_behind (
    job_id TEXT PRIMARY KEY, first_bucket INTEGER NOT NULL, last_bucket INTEGER NOT NULL
) WITHOUT ROWID"""
OLD_BEHIND = "coarse_rollups_behind"  # schema 6's flag in ``counters`` for the same


class Held:
    """The coarser levels the writer process holds back while batches keep coming.

    In a flood each commit's records fall in the same coarse buckets as the last commit's. The
    finest level is written every commit; the coarser levels' rows over the finest buckets written
    since (``spans``, per job) are summed up from the level below, in SQL, once a second or when the
    flood stops (``coarsen``). Only what a committed transaction wrote is kept (``stage`` then
    ``committed`` or ``rolled_back``). Each commit that holds some back widens its jobs' spans in
    ``rollups_behind``, one row a job: a writer that dies leaves them, and the next one coarsens
    them (``repair``).
    """

    def __init__(self, hold_seconds: float = HOLD_SECONDS):
        self.hold_seconds = hold_seconds
        self.spans: Spans = {}
        self.since: float | None = None  # when the oldest span held was committed
        self._staged: tuple[Spans, bool] | None = None  # this transaction's: (spans, flushed)

    def stage(self, conn: sqlite3.Connection, counts: dict[tuple, Counts], flush: bool, in_chunks: Callable) -> None:
        """Write the finest level's ``counts`` (``finest``'s), and bring the coarser levels up to
        date over everything held with them when ``flush`` or when the held spans are due; mark
        their spans otherwise (inside the caller's transaction)."""
        write(conn, counts, in_chunks)
        touched = spans(counts)
        due = self.since is not None and time.monotonic() - self.since >= self.hold_seconds
        if flush or due:
            coarsen(conn, _widened(self.spans, touched.items()))
            if self.spans:
                conn.execute("DELETE FROM rollups_behind")
            self._staged = (touched, True)
        else:
            conn.executemany(
                "INSERT INTO rollups_behind (job_id, first_bucket, last_bucket) VALUES (?, ?, ?) ON CONFLICT (job_id)"
                " DO UPDATE SET first_bucket = MIN(first_bucket, excluded.first_bucket),"
                " last_bucket = MAX(last_bucket, excluded.last_bucket)",
                [(job, first, last) for job, (first, last) in touched.items()],
            )
            self._staged = (touched, False)

    def committed(self) -> None:
        """The staged transaction committed: what it held back is held."""
        assert self._staged is not None
        spans, flushed = self._staged
        self._staged = None
        if flushed:
            self.spans, self.since = {}, None
            return
        self.spans = _widened(self.spans, spans.items())
        if self.since is None and spans:
            self.since = time.monotonic()

    def rolled_back(self) -> None:
        self._staged = None


def spans(finest: dict[tuple, Counts]) -> Spans:
    """Per job, the first and last bucket ``finest``'s counts touch."""
    return _widened({}, ((job, (bucket, bucket)) for job, _name, _rank, bucket in finest))


def _widened(spans: Spans, more: Iterable[tuple[str, tuple[int, int]]]) -> Spans:
    both = dict(spans)
    for job, (first, last) in more:
        if job in both:
            first, last = min(first, both[job][0]), max(last, both[job][1])
        both[job] = (first, last)
    return both


def coarsen(conn: sqlite3.Connection, spans: Spans) -> None:
    """Sum up each job's coarser levels over its span of finest buckets from the finest level's
    rows, each level's touched buckets from the level below (whole buckets: exact)."""
    for job_id, (first, last) in spans.items():
        for level in LEVELS[1:]:
            lo, hi = first >> (level - FINEST_LEVEL), last >> (level - FINEST_LEVEL)
            conn.execute(
                f"""INSERT OR REPLACE INTO rollups
                SELECT series, {level}, bucket >> {LEVEL_STRIDE}, rank, SUM(n), SUM(nan), SUM(pinf), SUM(ninf),
                    MIN(lo), MAX(hi), SUM(total)
                FROM rollups WHERE series IN (SELECT id FROM series WHERE job_id = ?)
                    AND level = {level - LEVEL_STRIDE} AND bucket BETWEEN ? AND ?
                GROUP BY series, bucket >> {LEVEL_STRIDE}, rank""",
                (job_id, lo << LEVEL_STRIDE, ((hi + 1) << LEVEL_STRIDE) - 1),
            )


def repair(conn: sqlite3.Connection) -> bool:
    """Bring the coarser levels up to date where a writer died holding them back (in the caller's
    transaction); True when there were any."""
    if conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'rollups_behind'").fetchone() is None:
        return False  # a file the store has not set up (yet)
    behind = conn.execute("SELECT job_id, first_bucket, last_bucket FROM rollups_behind").fetchall()
    if not behind:
        # Nearly always. No write then: the child starts beside the store's writer thread, whose
        # transaction would fail at once (SQLITE_BUSY_SNAPSHOT) if the file changed under its read.
        return False
    coarsen(conn, {job: (first, last) for job, first, last in behind})
    conn.execute("DELETE FROM rollups_behind")
    return True
