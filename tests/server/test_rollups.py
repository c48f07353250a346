"""Rollups and the series they serve, checked against the records themselves (real SQLite, the
store's writer process): any range and resolution, records sent twice or run again, non-finite
figures, retention, and a file from before the rollups."""

from __future__ import annotations

import json
import math
import random
import sqlite3
import statistics
import time

import pytest

from avgctl.protocol import Hello, MetricsBatch, RoundRecord, StepRecord
from avgctl.server import store as st
from avgctl.server.records import encode, received
from avgctl.server.store import history, process, rollup, schema, writes
from tests.support.frames import hello, uniform_round

JOB = "rollups"
RANKS = 3


def _hello(rank: int) -> Hello:
    return Hello.model_validate_json(hello(job_id=JOB, rank=rank, world_size=RANKS))


def _loss(rank: int, step: int, seed: int = 0) -> float:
    return random.Random(hash((rank, step, seed))).uniform(0.0, 10.0)


def _round(step: int, divergence: float) -> RoundRecord:
    record = uniform_round(step, divergence, group_size=RANKS)
    return record.model_copy(update={"relative_divergence": divergence / 10})


def _batch(rank: int, steps: range, seed: int = 0, special: dict[int, float] | None = None):
    special = special or {}
    records = [
        StepRecord(step=s, time=0.0, loss=special.get(s, _loss(rank, s, seed)), scalars={"acc": s / 100}) for s in steps
    ]
    rounds = [_round(s, _loss(rank, s, seed + 1)) for s in steps if s % 4 == 0]
    return encode(received(MetricsBatch(steps=records, rounds=rounds)))


def _write(store, rank: int, steps: range, chunk: int = 37, **options) -> None:
    for start in range(steps.start, steps.stop, chunk):
        store.add_metrics(JOB, rank, _batch(rank, range(start, min(start + chunk, steps.stop)), **options))
    store.submit(lambda c: None).result()  # queued after those batches: they are committed


@pytest.fixture
def store(tmp_path):
    s = st.Store(str(tmp_path / "r.db"))
    s.start()
    for rank in range(RANKS):
        s.submit(lambda c, r=rank: st.hello(c, _hello(r), time.time())).result()
    yield s
    s.close()


def _series(store, name: str, **query) -> dict:
    return json.loads(store.series_json(JOB, history.SeriesQuery(name, **query)))


def _expected(values: dict[tuple[int, int], float], first: int, last: int, bucket: int) -> dict[str, dict]:
    """What the answer must hold, computed from every value: {rank: {min, mean, max}}."""
    out: dict[str, dict] = {}
    for rank in sorted({r for r, _ in values}):
        start, end = first // bucket, last // bucket
        cells = {}
        for (r, step), value in values.items():  # whole buckets: the range widened to them
            if r == rank and start * bucket <= step < (end + 1) * bucket:
                cells.setdefault(step // bucket, []).append(value)
        out[str(rank)] = {
            key: [fn(cells[b]) if b in cells else None for b in range(start, end + 1)]
            for key, fn in (("min", min), ("mean", statistics.fmean), ("max", max))
        }
    return out


def _close(answer: dict, expected: dict) -> None:
    for rank, figures in expected.items():
        for key, values in figures.items():
            got = answer["ranks"][rank][key]
            assert got == pytest.approx(values, rel=1e-12), (rank, key)


def test_any_range_and_resolution_equals_the_records(store):
    for rank in range(RANKS):
        _write(store, rank, range(0, 3000))
    losses = {(r, s): _loss(r, s) for r in range(RANKS) for s in range(3000)}
    for first, last, points in (
        (0, 2999, 600),
        (0, 2999, 10),
        (17, 1234, 50),
        (100, 355, 600),
        (5, 5, 1),
        (0, 2999, 3),
    ):
        answer = _series(store, "loss", from_step=first, to_step=last, points=points)
        bucket = answer["bucket_steps"]
        assert bucket & (bucket - 1) == 0 and len(answer["steps"]) <= points
        assert answer["steps"] == [b * bucket for b in range(first // bucket, last // bucket + 1)]
        assert answer["from_step"] == answer["steps"][0] and answer["to_step"] == answer["steps"][-1] + bucket - 1
        assert bucket == 1 or (last // (bucket // 2) - first // (bucket // 2) + 1) > points, "the finest that fits"
        _close(answer, _expected(losses, first, last, bucket))
        means = [answer["ranks"][str(r)]["mean"] for r in range(RANKS)]
        for i, column in enumerate(zip(*means)):
            assert answer["group"]["median"][i] == pytest.approx(statistics.median(column))
            assert answer["group"]["min"][i] == min(column) and answer["group"]["max"][i] == max(column)
    # Per-round figures and the user's scalars roll up the same way.
    divergence = {(r, s): _loss(r, s, 1) for r in range(RANKS) for s in range(0, 3000, 4)}
    answer = _series(store, "divergence", points=40)
    _close(answer, _expected(divergence, 0, 2999, answer["bucket_steps"]))
    answer = _series(store, "scalars.acc", points=40, ranks=[1])
    assert list(answer["ranks"]) == ["1"]
    _close(answer, _expected({(1, s): s / 100 for s in range(3000)}, 0, 2999, answer["bucket_steps"]))


def test_a_whole_run_query_reads_rollups_not_records(store):
    for rank in range(RANKS):
        _write(store, rank, range(0, 5000), chunk=500)
    store.submit(lambda c: c.execute("DELETE FROM steps")).result()  # the records gone: rollups remain
    answer = _series(store, "loss", points=100)
    assert answer["bucket_steps"] == 64
    _close(answer, _expected({(r, s): _loss(r, s) for r in range(RANKS) for s in range(5000)}, 0, 4999, 64))


def test_records_sent_again_count_once_and_steps_run_again_replace(store):
    _write(store, 0, range(0, 200))
    _write(store, 0, range(0, 200))  # a link sending what it could not learn was stored
    # In one transaction too: the same batch twice in a row, before any commit.
    again = _batch(0, range(40, 60))
    store.add_metrics(JOB, 0, again)
    store.add_metrics(JOB, 0, again)
    _write(store, 0, range(100, 150), seed=7)  # a restore from a checkpoint: steps 100-149 run again
    values = {(0, s): _loss(0, s, 7 if 100 <= s < 150 else 0) for s in range(200)}
    answer = _series(store, "loss", from_step=0, to_step=199, points=4, ranks=[0])
    assert answer["bucket_steps"] == 64
    expected = _expected(values, 0, 199, 64)["0"]
    assert answer["ranks"]["0"]["mean"] == pytest.approx(expected["mean"], rel=1e-12)
    counted = store._readers.connection().execute(
        "SELECT SUM(n) FROM rollups JOIN series ON series.id = rollups.series WHERE name = 'loss' AND level = 4"
    )
    assert counted.fetchone()[0] == 200


def test_non_finite_figures_are_data(store):
    special = {3: math.nan, 20: math.inf, 40: -math.inf, 41: math.inf}
    _write(store, 0, range(0, 64), special=special)
    answer = _series(store, "loss", from_step=0, to_step=63, points=4, ranks=[0])
    figures = answer["ranks"]["0"]
    assert figures["mean"][0] == "NaN"  # a NaN in the bucket (spelled as the protocol does)
    assert figures["mean"][1] == "Infinity" and figures["max"][1] == "Infinity"
    assert figures["mean"][2] == "NaN" and figures["min"][2] == "-Infinity"  # +inf and -inf
    assert figures["mean"][3] == pytest.approx(statistics.fmean(_loss(0, s) for s in range(48, 64)))
    assert figures["min"][0] == min(_loss(0, s) for s in range(16) if s != 3)  # extremes skip NaN
    assert answer["group"]["median"][:3] == ["NaN", "Infinity", "NaN"]
    text = store.series_json(JOB, history.SeriesQuery("loss", from_step=0, to_step=63, points=4, ranks=[0]))
    json.loads(text, parse_constant=lambda token: pytest.fail(f"bare {token}: not JSON"))


def test_retention_thins_records_not_rollups(tmp_path):
    s = st.Store(str(tmp_path / "t.db"), retention_steps=100, history_records=20, prune_interval=3600)
    s.start()
    try:
        s.submit(lambda c: st.hello(c, _hello(0), time.time())).result()
        _write(s, 0, range(0, 4000), chunk=400)
        assert s.prune().result() > 3000
        answer = json.loads(s.series_json(JOB, history.SeriesQuery("loss", points=50)))
        _close(answer, _expected({(0, s): _loss(0, s) for s in range(4000)}, 0, 3999, answer["bucket_steps"]))
        # Buckets finer than the rollups' come from records only where they are all kept.
        old = json.loads(s.series_json(JOB, history.SeriesQuery("loss", from_step=0, to_step=99, points=100)))
        assert old["bucket_steps"] == 2**rollup.FINEST_LEVEL
        recent = json.loads(s.series_json(JOB, history.SeriesQuery("loss", from_step=3950, to_step=3999, points=100)))
        assert recent["bucket_steps"] == 1
        assert recent["ranks"]["0"]["mean"] == [_loss(0, s) for s in range(3950, 4000)]
    finally:
        s.close()


def test_bad_queries_are_refused_with_a_reason(store):
    _write(store, 0, range(0, 10))
    cases = [
        (history.SeriesQuery("los"), "unknown series"),
        (history.SeriesQuery("scalars."), "unknown series"),
        (history.SeriesQuery("scalars.never"), "has recorded no"),
        (history.SeriesQuery("loss", points=0), "points must be"),
        (history.SeriesQuery("loss", points=5001), "points must be"),
        (history.SeriesQuery("loss", from_step=10, to_step=5), "before from_step"),
        (history.SeriesQuery("loss", points=5000, from_step=0, to_step=2**62, ranks=list(range(500))), "fewer points"),
    ]
    for query, reason in cases:
        with pytest.raises(history.BadQuery, match=reason):
            store.series_json(JOB, query)
    assert store.series_json("no-such-job", history.SeriesQuery("loss")) is None
    # A huge range is cheap: the bucket grows with it (rows read stay about points x ranks).
    answer = json.loads(store.series_json(JOB, history.SeriesQuery("loss", from_step=0, to_step=2**62)))
    assert len(answer["steps"]) <= 600 and answer["ranks"]["0"]["mean"][0] == pytest.approx(
        statistics.fmean(_loss(0, s) for s in range(10))
    )


def _one_rank_file(path: str, queries: list[history.SeriesQuery], **options) -> list[str]:
    """A store's file holding rank 0's steps 0..699, closed; the ``queries``' answers before."""
    s = st.Store(path)
    s.start()
    try:
        s.submit(lambda c: st.hello(c, _hello(0), time.time())).result()
        _write(s, 0, range(0, 700), **options)
        return [s.series_json(JOB, query) for query in queries]
    finally:
        s.close()


def _reopened_as(path: str, version: int, *statements: str) -> st.Store:
    """A store started on the file at ``path`` once ``statements`` made it as schema ``version`` left it."""
    conn = sqlite3.connect(path)
    for statement in statements:
        conn.execute(statement)
    conn.execute(f"PRAGMA user_version = {version}")
    conn.commit()
    conn.close()
    s = st.Store(path)
    s.start()
    return s


def _assert_same_rows(rows: list[tuple], expected: list[tuple]) -> None:
    """Rollup rows equal but for the sums, which may be taken in another order."""
    assert [row[:-1] for row in rows] == [row[:-1] for row in expected]  # counts, extremes
    assert [row[-1] for row in rows] == pytest.approx([row[-1] for row in expected], rel=1e-12)


def test_a_file_from_before_the_rollups_is_rolled_up_once(tmp_path):
    path = str(tmp_path / "v5.db")
    queries = [history.SeriesQuery("loss", points=20), history.SeriesQuery("divergence", points=20)]
    before, before_divergence = _one_rank_file(path, queries, special={5: math.nan, 6: -math.inf})
    s = _reopened_as(path, 5, *(f"DROP TABLE {table}" for table in ("rollups", "series", "rollups_behind")))
    try:
        # Equal up to the order the sums were taken in (per batch as written, in one pass here).
        for name, earlier in (("loss", before), ("divergence", before_divergence)):
            after = json.loads(s.series_json(JOB, history.SeriesQuery(name, points=20)))
            assert after == _approx(json.loads(earlier))
    finally:
        s.close()


def _approx(answer: dict) -> dict:
    """``answer`` with its finite figures compared to 1e-12 (non-finite ones spelled, compared as text)."""
    figures = lambda values: [v if v is None or isinstance(v, str) else pytest.approx(v, rel=1e-12) for v in values]  # noqa: E731
    return {
        **answer,
        "ranks": {r: {k: figures(v) for k, v in f.items()} for r, f in answer["ranks"].items()},
        "group": {k: figures(v) for k, v in answer["group"].items()},
    }


def test_figures_whose_sum_overflows_are_still_spelled(store):
    _write(store, 0, range(0, 32), special={s: 1e308 for s in range(32)})
    for points in (2, 32):  # from the rollups, and from the records
        text = store.series_json(JOB, history.SeriesQuery("loss", from_step=0, to_step=31, points=points, ranks=[0]))
        means = json.loads(text)["ranks"]["0"]["mean"]
        assert means[0] in ("Infinity", 1e308), text  # never null, which would read as "no record"


def test_a_flood_holds_the_coarse_levels_back_until_it_stops(tmp_path):
    conn = process.connect_writer(str(tmp_path / "h.db"))
    schema.migrate(conn)
    held = rollup.Held(hold_seconds=3600)

    def commit(entries, flush=False):
        conn.execute("BEGIN")
        process.write_rows(conn, process.metric_rows(entries), held, flush)
        conn.execute("COMMIT")
        held.committed()

    entries = [writes.metric_entry(JOB, 0, _batch(0, range(s, s + 10)), 0.0) for s in range(0, 200, 10)]
    for entry in entries[:10]:
        commit([entry])
    levels = dict(conn.execute("SELECT level, COUNT(*) FROM rollups GROUP BY level").fetchall())
    assert set(levels) == {rollup.FINEST_LEVEL}, "only the finest level while the flood lasts"
    span = (0, 99 >> rollup.FINEST_LEVEL)  # the finest buckets of steps 0..99, their coarser rows behind
    assert conn.execute("SELECT first_bucket, last_bucket FROM rollups_behind").fetchall() == [span]
    conn.execute("BEGIN")  # a transaction that fails keeps nothing of its records in the held deltas
    process.write_rows(conn, process.metric_rows(entries[10:12]), held, False)
    conn.execute("ROLLBACK")
    held.rolled_back()
    for entry in entries[10:]:
        commit([entry])
    commit([], flush=True)
    assert conn.execute("SELECT COUNT(*) FROM rollups_behind").fetchone() == (0,)
    stored = sorted(conn.execute("SELECT * FROM rollups WHERE level > ?", (rollup.FINEST_LEVEL,)).fetchall())
    conn.execute("DELETE FROM rollups")
    conn.execute("DELETE FROM steps")
    conn.execute("DELETE FROM rounds")
    process.write_rows(conn, process.metric_rows(entries))  # the same records, every level at once
    at_once = sorted(conn.execute("SELECT * FROM rollups WHERE level > ?", (rollup.FINEST_LEVEL,)).fetchall())
    _assert_same_rows(at_once, stored)
    conn.close()


def test_a_writer_that_died_holding_deltas_back_is_repaired_by_the_next(store):
    _write(store, 0, range(0, 500))
    expected = store.series_json(JOB, history.SeriesQuery("loss", points=4, ranks=[0]))
    # As a killed writer process leaves the file: coarse levels short of what it held, its span marked.
    store.submit(lambda c: c.execute("DELETE FROM rollups WHERE level > ? AND bucket > 0", (rollup.FINEST_LEVEL,)))
    mark = "INSERT INTO rollups_behind VALUES (?, 0, ?)"
    store.submit(lambda c: c.execute(mark, (JOB, 499 >> rollup.FINEST_LEVEL))).result()
    assert store.series_json(JOB, history.SeriesQuery("loss", points=4, ranks=[0])) != expected
    store._writer.process._stop(kill=True)  # the next batch starts a new writer process, which repairs
    _write(store, 1, range(0, 10))
    assert store.series_json(JOB, history.SeriesQuery("loss", points=4, ranks=[0])) == expected


def test_what_a_dead_writer_held_back_is_coarsened_by_the_next(tmp_path):
    conn = process.connect_writer(str(tmp_path / "d.db"))
    schema.migrate(conn)
    held = rollup.Held(hold_seconds=3600)
    nan = {s: math.nan for s in range(330, 340)}
    early = [writes.metric_entry(JOB, r, _batch(r, range(s, s + 30)), 0.0) for s in range(0, 300, 30) for r in (0, 1)]
    late = [writes.metric_entry(JOB, r, _batch(r, range(s, s + 30)), 0.0) for s in range(300, 600, 30) for r in (0, 1)]
    rerun = [writes.metric_entry(JOB, 0, _batch(0, range(320, 350), seed=7, special=nan), 0.0)]  # other figures
    for entries, flush in ((early, True), (late, False), (rerun, False)):
        conn.execute("BEGIN")
        process.write_rows(conn, process.metric_rows(entries), held, flush)
        conn.execute("COMMIT")
        held.committed()
    # The writer dies here, holding back the coarser rows of steps 300..599: their span is in the file.
    conn.execute("BEGIN")
    assert rollup.repair(conn) and not rollup.repair(conn)
    conn.execute("COMMIT")
    repaired = sorted(conn.execute("SELECT * FROM rollups").fetchall())
    for table in ("rollups", "steps", "rounds"):
        conn.execute(f"DELETE FROM {table}")
    process.write_rows(conn, process.metric_rows(early + late + rerun))  # every level at once
    at_once = sorted(conn.execute("SELECT * FROM rollups").fetchall())
    _assert_same_rows(repaired, at_once)
    conn.close()


def test_a_file_whose_schema_6_writer_died_holding_coarse_levels_gets_them_rebuilt(tmp_path):
    path = str(tmp_path / "v6.db")
    (before,) = _one_rank_file(path, [history.SeriesQuery("loss", points=4)])
    s = _reopened_as(  # as schema 6's writer left it: coarse levels short, the flag set
        path,
        6,
        f"DELETE FROM rollups WHERE level > {rollup.FINEST_LEVEL} AND bucket > 0",
        f"INSERT INTO counters VALUES ('{rollup.OLD_BEHIND}', 1)",
        "DROP TABLE rollups_behind",
    )
    try:
        assert json.loads(s.series_json(JOB, history.SeriesQuery("loss", points=4))) == _approx(json.loads(before))
        flag = "SELECT COUNT(*) FROM counters WHERE name = ?"
        assert s.submit(lambda c: c.execute(flag, (rollup.OLD_BEHIND,)).fetchone()).result() == (0,)
    finally:
        s.close()


def test_a_writer_with_nothing_to_repair_writes_nothing(tmp_path):
    # It starts beside the store's writer thread: a write of its own would fail that thread's
    # transaction at once had it read first (SQLITE_BUSY_SNAPSHOT), as a hello's did in CI.
    conn = process.connect_writer(str(tmp_path / "n.db"))
    schema.migrate(conn)
    before = conn.total_changes
    conn.execute("BEGIN")
    assert not rollup.repair(conn)
    conn.execute("COMMIT")
    assert conn.total_changes == before
    conn.close()
