"""The store's retention: recent steps at full resolution, older ones thinned, the file bounded."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time

import pytest

from avgctl.protocol import AveragerConfig, ControlEvent, ControlView, Hello, MetricsBatch, RoundRecord, StepRecord
from avgctl.server import store as st
from avgctl.server.records import EncodedBatch, encode, received
from avgctl.server.settings import Settings

JOB = "retention"


def _hello(rank: int) -> Hello:
    return Hello(
        job_id=JOB,
        rank=rank,
        world_size=2,
        host="h",
        pid=rank + 1,
        job_secret="retention-job-secret",
        config=AveragerConfig(kind="periodic", period=4, warmup_steps=0),
        control=ControlView(period=4, warmup_steps=0),
    )


def _batch(first: int, n: int) -> EncodedBatch:
    steps = [
        StepRecord(step=s, time=0.0, step_time=0.01, loss=1.0, scalars={"acc": 0.5}) for s in range(first, first + n)
    ]
    rounds = [
        RoundRecord(
            step=s,
            group_size=2,
            divergence=0.1,
            relative_divergence=0.01,
            divergence_mean=0.1,
            divergence_max=0.1,
            relative_mean=0.01,
            relative_max=0.01,
            seconds=0.0,
            bytes=8,
            exact=True,
        )
        for s in range(first, first + n)
        if s % 4 == 0
    ]
    control = [ControlEvent(step=first, control=ControlView(period=4, warmup_steps=0))] if first % 1000 == 0 else []
    return encode(received(MetricsBatch(steps=steps, rounds=rounds, control=control)))


@pytest.fixture
def store(tmp_path):
    s = st.Store(str(tmp_path / "r.db"), retention_steps=100, history_records=50, prune_interval=3600)
    s.start()
    for rank in (0, 1):
        s.submit(lambda c, r=rank: st.hello(c, _hello(r), time.time())).result()
    yield s
    s.close()


def _write(store: st.Store, first: int, last: int, chunk: int = 100) -> None:
    for start in range(first, last, chunk):
        for rank in (0, 1):
            batch = _batch(start, min(chunk, last - start))
            store.submit(lambda c, r=rank, b=batch: st.write_metrics(c, JOB, r, b, time.time())).result()


def _steps(store: st.Store, table: str = "steps", rank: int = 0) -> list[int]:
    return [rec["step"] for rec in store.metrics(JOB, ranks=[rank])[table]]


def test_recent_steps_full_older_thinned_evenly(store):
    _write(store, 0, 3000)
    assert store.prune().result() > 0
    for rank in (0, 1):
        steps = _steps(store, rank=rank)
        recent = [s for s in steps if s >= 2999 - 100]
        older = [s for s in steps if s < 2999 - 100]
        assert recent == list(range(2899, 3000))  # the latest retention_steps, untouched
        assert 0 < len(older) <= 50  # at most history_records older ones
        stride = older[1] - older[0]
        assert older == list(range(0, 2899, stride)), "evenly spaced, from step 0"
        rounds = _steps(store, "rounds", rank)
        assert [s for s in rounds if s >= 2899] == list(range(2900, 3000, 4))
        assert all(s % stride == 0 for s in rounds if s < 2899)
    # Control events carry the command history: never thinned.
    assert [e["step"] for e in store.metrics(JOB, ranks=[0])["control_events"]] == [0, 1000, 2000]


def test_what_is_kept_at_one_stride_is_kept_at_the_next(store):
    _write(store, 0, 1200)
    store.prune().result()
    before = [s for s in _steps(store) if s < 1000]
    _write(store, 1200, 6000)
    store.prune().result()
    after = [s for s in _steps(store) if s < 1000]
    assert set(after) <= set(before) and after, "thinning only ever removes, evenly"
    assert len([s for s in _steps(store) if s < 5899]) <= 50
    assert store.prune().result() == 0  # nothing new: nothing to do


def test_file_stops_growing(tmp_path):
    store = st.Store(str(tmp_path / "f.db"), retention_steps=500, history_records=100, prune_interval=0.0)
    store.start()
    try:
        for rank in (0, 1):
            store.submit(lambda c, r=rank: st.hello(c, _hello(r), time.time())).result()
        sizes = []
        for block in range(12):
            _write(store, block * 2000, (block + 1) * 2000, chunk=200)
            store.prune().result()
            store.submit(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()).result()
            sizes.append(os.path.getsize(tmp_path / "f.db") - _rollup_bytes(tmp_path / "f.db"))
        rows = store._readers.connection().execute("SELECT COUNT(*) FROM steps").fetchone()[0]
    finally:
        store.close()
    assert rows <= 2 * (500 + 1 + 100)
    # After the first blocks, freed pages are reused: the last half of the run adds nothing but the
    # rollups (never thinned: they hold the whole run at coarser resolutions; tests/server/test_rollups.py),
    # whose pages lie among the records' (hence a few pages of slack).
    assert sizes[-1] <= sizes[len(sizes) // 2] + 4 * 4096, sizes


def _rollup_bytes(path) -> int:
    """Bytes in the pages that hold the rollups."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return conn.execute(f"SELECT SUM(pgsize) FROM dbstat WHERE name IN {_ROLLUP_OBJECTS}").fetchone()[0]


_ROLLUP_OBJECTS = "('rollups', 'series', 'sqlite_autoindex_series_1')"


def test_the_writer_prunes_by_itself(tmp_path):
    store = st.Store(str(tmp_path / "w.db"), retention_steps=100, history_records=20, prune_interval=0.0)
    store.start()
    try:
        store.submit(lambda c: st.hello(c, _hello(0), time.time())).result()
        store.add_metrics(JOB, 0, _batch(0, 2000))
        store.submit(lambda c: None).result()  # a second burst: the writer prunes after each
        store.submit(lambda c: None).result()
        assert len(_steps(store)) <= 101 + 20
    finally:
        store.close()


def test_settings_and_defaults():
    assert Settings().retention_steps == 20_000 and Settings().history_records == 5_000
    assert Settings(retention_steps=None).retention_steps is None
    with pytest.raises(ValueError):
        st.Store("x.db", retention_steps=0)
    keep_all = st.Store("x.db")
    assert keep_all.retention is None
    with pytest.raises(ValueError):
        keep_all.prune()
