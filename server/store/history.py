"""History at any zoom: a series over a range of steps in at most ``points`` buckets per rank,
read from the rollups (``rollup``) or, for short ranges, from the records themselves; and the
layers' shares of the divergence per round, for the heatmap.

A query reads about ``buckets x ranks`` rows whatever the range: the bucket is the smallest power
of two of steps that gives at most ``points`` buckets, read from the stored level at or below it
(pairs merged when it falls between two). Buckets finer than the rollups' finest come from the
records while they are kept at full resolution and the read stays under ``RAW_RECORDS``; otherwise
the finest rollups serve, so the answer is coarser than asked, never wrong.
"""

from __future__ import annotations

import json
import math
import re
import sqlite3
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgspec

from avgctl.server.records import figure
from avgctl.server.store import rollup

DEFAULT_POINTS = 600
MAX_POINTS = 5000
MAX_CELLS = 2_000_000  # buckets x ranks in one answer (about 20 bytes of JSON each)
RAW_RECORDS = 200_000  # records one query may read at full resolution
FIXED_NAMES = rollup.STEP_NAMES + rollup.ROUND_NAMES
NAMES_HELP = ", ".join(FIXED_NAMES) + " or scalars.<name>"


class BadQuery(ValueError):
    """The query cannot be answered as asked; the text says why (a 4xx)."""


@dataclass(frozen=True, slots=True)
class SeriesQuery:
    name: str
    from_step: int | None = None
    to_step: int | None = None
    points: int = DEFAULT_POINTS
    ranks: list[int] | None = None  # None: every rank of the job


def series(conn: sqlite3.Connection, job_id: str, query: SeriesQuery, full_resolution_from: dict[int, int]) -> str:
    """The answer ``GET /api/jobs/{id}/series`` gives, as JSON text (run in a ``Readers.snapshot()``). Buckets
    are aligned (bucket ``b`` holds steps ``b * bucket_steps`` on), whole at both ends: the answer's
    ``from_step`` and ``to_step`` are the steps they cover, the asked range widened to them.

    ``full_resolution_from``: per rank, the first step whose records retention still keeps at full
    resolution (0 for every rank when nothing is thinned).
    """
    if query.name not in FIXED_NAMES and not (
        query.name.startswith(rollup.SCALAR_PREFIX) and len(query.name) > len(rollup.SCALAR_PREFIX)
    ):
        raise BadQuery(f"unknown series {query.name!r}: the names are {NAMES_HELP}")
    if not 1 <= query.points <= MAX_POINTS:
        raise BadQuery(f"points must be from 1 to {MAX_POINTS}, got {query.points}")
    job_step = conn.execute("SELECT step FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
    first = 0 if query.from_step is None else query.from_step
    last = max(job_step, first) if query.to_step is None else query.to_step
    if last < first:
        raise BadQuery(f"to_step ({last}) is before from_step ({first})")
    ranks = query.ranks
    if ranks is None:
        ranks = [
            r for (r,) in conn.execute("SELECT DISTINCT rank FROM ranks WHERE job_id = ? ORDER BY rank", (job_id,))
        ]
    ranks = sorted(set(ranks))
    level = _bucket_level(first, last, query.points)
    buckets = (last >> level) - (first >> level) + 1
    if buckets * max(len(ranks), 1) > MAX_CELLS:
        raise BadQuery(
            f"{buckets} buckets x {len(ranks)} ranks is more than {MAX_CELLS:,} figures: ask for fewer points or ranks"
        )
    sid = conn.execute("SELECT id FROM series WHERE job_id = ? AND name = ?", (job_id, query.name)).fetchone()
    if sid is None and query.name not in FIXED_NAMES:
        raise BadQuery(f"job {job_id!r} has recorded no {query.name!r}")
    raw = level < rollup.FINEST_LEVEL and _raw_allowed(first, last, ranks, full_resolution_from)
    if not raw:
        level = max(level, rollup.FINEST_LEVEL)
    start, end = first >> level, last >> level
    table = _Table(start, end - start + 1, ranks)
    # Whole buckets: the first and last cover their 2**level steps, as the rollups hold them.
    first, last = start << level, ((end + 1) << level) - 1
    if raw:
        _read_records(conn, job_id, query.name, first, last, level, table)
    elif sid is not None:
        _read_rollups(conn, sid[0], first, last, level, table, None if query.ranks is None else ranks)
    return answer_json(table.answer(query.name, first, last, level), table.non_finite)


def _bucket_level(first: int, last: int, points: int) -> int:
    """The smallest ``k`` whose aligned buckets of ``2**k`` steps cover the range in at most ``points``."""
    level = max(0, math.ceil(math.log2(max((last - first + 1) / points, 1))))
    while (last >> level) - (first >> level) + 1 > points:
        level += 1
    return level


def _raw_allowed(first: int, last: int, ranks: list[int], full_from: dict[int, int]) -> bool:
    within = all(first >= full_from.get(rank, 0) for rank in ranks)
    return within and (last - first + 1) * max(len(ranks), 1) <= RAW_RECORDS


class _Table:
    """Each rank's min, mean and max per bucket, as a read fills them."""

    def __init__(self, start: int, buckets: int, ranks: list[int]):
        self.start = start
        self.buckets = buckets
        self.ranks = ranks
        self.lows: dict[int, list] = {rank: [None] * buckets for rank in ranks}
        self.means: dict[int, list] = {rank: [None] * buckets for rank in ranks}
        self.highs: dict[int, list] = {rank: [None] * buckets for rank in ranks}
        self.non_finite = False  # some figure is NaN or infinite (so the JSON must spell it)

    def fill(self, rows: Iterable[tuple]) -> None:
        """From rows ``(bucket, rank, lo, hi, mean, any non-finite)``, one per cell."""
        start = self.start
        cells = {rank: (self.lows[rank], self.means[rank], self.highs[rank]) for rank in self.ranks}
        for bucket, rank, lo, hi, mean, odd in rows:
            row = cells.get(rank)
            if row is None:
                continue
            i = bucket - start
            if odd or mean - mean != 0.0:  # rare: a non-finite figure, or a sum past 1.8e308
                self.non_finite = True
                lo = math.nan if lo is None else lo
                hi = math.nan if hi is None else hi
            row[0][i] = lo
            row[1][i] = mean
            row[2][i] = hi

    def answer(self, name: str, first: int, last: int, level: int) -> dict[str, Any]:
        return {
            "name": name,
            "from_step": first,
            "to_step": last,
            "bucket_steps": 1 << level,
            "steps": [(self.start + i) << level for i in range(self.buckets)],
            "ranks": {
                str(rank): {"min": self.lows[rank], "mean": self.means[rank], "max": self.highs[rank]}
                for rank in self.ranks
            },
            "group": _group(list(self.means.values()), self.buckets),
        }


def _group(rows: list[list], buckets: int) -> dict[str, list]:
    """Per bucket, the min, median and max of the ranks' means that are not NaN (NaN when all are)."""
    lows, medians, highs = [], [], []
    for column in zip(*rows) if rows else [()] * buckets:
        known = sorted(v for v in column if v is not None and v == v)
        if not known:
            figure = math.nan if any(v is not None for v in column) else None
            lows.append(figure), medians.append(figure), highs.append(figure)
            continue
        mid = len(known) // 2
        lows.append(known[0])
        highs.append(known[-1])
        medians.append(known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2)
    return {"min": lows, "median": medians, "max": highs}


def _read_rollups(
    conn: sqlite3.Connection, sid: int, first: int, last: int, level: int, table: _Table, ranks: list[int] | None
) -> None:
    """Fill ``table`` from the stored level at or below ``level``, its buckets merged up to ``level``'s."""
    stored = max(lvl for lvl in rollup.LEVELS if lvl <= min(level, rollup.COARSEST_LEVEL))
    shift = level - stored
    # A few ranks of many: looked up by rank; else every rank's rows of the range, in key order.
    only = "" if ranks is None else f" AND rank IN ({', '.join('?' * len(ranks))})"
    where = f"WHERE series = ? AND level = ? AND bucket BETWEEN ? AND ?{only}"
    params = (sid, stored, first >> stored, last >> stored, *(ranks or ()))
    if shift == 0:
        table.fill(
            conn.execute(f"SELECT bucket, rank, lo, hi, total / n, nan + pinf + ninf FROM rollups {where}", params)
        )
    else:
        table.fill(
            conn.execute(
                f"SELECT bucket >> {shift} AS b, rank, MIN(lo), MAX(hi), SUM(total) / SUM(n), SUM(nan + pinf + ninf)"
                f" FROM rollups {where} GROUP BY b, rank",
                params,
            )
        )
    if table.non_finite:  # the buckets holding a non-finite figure: their means as IEEE gives them
        odd = conn.execute(
            f"SELECT bucket >> {shift} AS b, rank, SUM(n), SUM(nan), SUM(pinf), SUM(ninf), SUM(total) FROM rollups"
            f" {where} GROUP BY b, rank HAVING SUM(nan + pinf + ninf) > 0",
            params,
        )
        for bucket, rank, n, nan, pinf, ninf, total in odd:
            if rank in table.means:
                table.means[rank][bucket - table.start] = rollup.mean(n, nan, pinf, ninf, total)


def _read_records(
    conn: sqlite3.Connection, job_id: str, name: str, first: int, last: int, level: int, table: _Table
) -> None:
    """Fill ``table`` from the records themselves. Python's float arithmetic gives a bucket's mean
    as IEEE does (NaN in, NaN out); the extremes skip NaN unless every value is one."""
    if name in rollup.ROUND_NAMES:
        source, path = "rounds", f"$.{name}"
    elif name in rollup.STEP_NAMES:
        source, path = "steps", f"$.{name}"
    else:
        source, path = "steps", "$.scalars." + json.dumps(name[len(rollup.SCALAR_PREFIX) :])
    marks = ", ".join("?" * len(table.ranks))
    rows = conn.execute(
        f"SELECT rank, step, json_extract(body, ?) FROM {source}"
        f" WHERE job_id = ? AND rank IN ({marks}) AND step BETWEEN ? AND ?",
        (path, job_id, *table.ranks, first, last),
    )
    start, lows, sums, highs = table.start, table.lows, table.means, table.highs
    counts = {rank: [0] * table.buckets for rank in table.ranks}
    for rank, step, value in rows:
        if value is None:
            continue
        if type(value) is not float:
            value = float(value)  # an integer, or the protocol's "NaN", "Infinity", "-Infinity"
            if value - value != 0.0:
                table.non_finite = True
        i = (step >> level) - start
        n = counts[rank]
        if n[i] == 0:
            lows[rank][i] = sums[rank][i] = highs[rank][i] = value
        else:
            sums[rank][i] += value
            lo, hi = lows[rank][i], highs[rank][i]
            if value < lo or lo != lo:
                lows[rank][i] = value
            if value > hi or hi != hi:
                highs[rank][i] = value
        n[i] += 1
    for rank, n in counts.items():
        means = sums[rank]
        for i, count in enumerate(n):
            if count > 1:
                means[i] /= count
                if means[i] - means[i] != 0.0:  # a sum past 1.8e308
                    table.non_finite = True


def answer_json(answer: dict[str, Any], non_finite: bool) -> str:
    """``answer`` as JSON, non-finite figures spelled as the protocol does (``"NaN"``, ...)."""
    if not non_finite:
        return _ENCODE(answer).decode()  # msgspec: a whole run's 10^5 figures in a fraction of json's time
    # The arrays hold only numbers and nulls, so json's bare tokens for non-finite ones can be quoted.
    arrays = _BARE.sub(r'"\1"', json.dumps({"ranks": answer["ranks"], "group": answer["group"]}, separators=(",", ":")))
    head = {k: answer[k] for k in ("name", "from_step", "to_step", "bucket_steps", "steps")}
    return json.dumps(head, separators=(",", ":"))[:-1] + "," + arrays[1:]


_ENCODE = msgspec.json.Encoder().encode
_BARE = re.compile(r"(-?Infinity|NaN)")


DEFAULT_LAYER_COLUMNS = 200


def layers(
    conn: sqlite3.Connection, job_id: str, first: int | None, last: int | None, points: int, rank: int
) -> dict[str, Any]:
    """Each layer's share of ``rank``'s squared divergence per round, in at most ``points`` columns
    (a column's share is the mean over its rounds). A round carries every layer's share when the
    model has at most ``MAX_TOP_LAYERS`` layers, else its top ones (``complete`` false: the others'
    cells are null). Rows are the layers, the largest mean share first. At a step with rounds at
    several levels, the largest group's round counts; rounds without layers' shares are left out."""
    if not 1 <= points <= MAX_POINTS:
        raise BadQuery(f"points must be from 1 to {MAX_POINTS}, got {points}")
    first = 0 if first is None else first
    last = 2**62 if last is None else last
    if last < first:
        raise BadQuery(f"to_step ({last}) is before from_step ({first})")
    rounds = conn.execute(
        "SELECT step, json_extract(body, '$.top_layers'), json_extract(body, '$.layers_total') FROM rounds AS r"
        " WHERE job_id = ? AND rank = ? AND step BETWEEN ? AND ? AND json_array_length(body, '$.top_layers') > 0"
        " AND group_size ="
        " (SELECT MAX(group_size) FROM rounds WHERE job_id = r.job_id AND rank = r.rank AND step = r.step)"
        " ORDER BY step",
        (job_id, rank, first, last),
    ).fetchall()
    per_column = max(1, math.ceil(len(rounds) / points))
    columns = [rounds[i : i + per_column] for i in range(0, len(rounds), per_column)]
    sums: dict[str, list[float]] = {}
    counts: dict[str, list[int]] = {}
    complete, total = True, None
    for j, column in enumerate(columns):
        for _step, shares, layers_total in column:
            pairs = json.loads(shares) if shares else []
            total = layers_total if layers_total is not None else total
            complete = complete and layers_total is not None and len(pairs) >= layers_total
            for layer, share in pairs:
                sums.setdefault(layer, [0.0] * len(columns))[j] += float(share)
                counts.setdefault(layer, [0] * len(columns))[j] += 1
    order = sorted(sums, key=lambda layer: -sum(sums[layer]))
    return {
        "from_step": first,
        "to_step": min(last, rounds[-1][0]) if rounds else first,
        "rank": rank,
        "layers": order,
        "steps": [column[0][0] for column in columns],
        "shares": [[figure(s / c) if c else None for s, c in zip(sums[layer], counts[layer])] for layer in order],
        "layers_total": total,
        "complete": complete and bool(rounds),
    }
