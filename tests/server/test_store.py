"""The store on a real SQLite file: its schema versions, what its writes leave for its reads, retention."""

from __future__ import annotations

import json
import sqlite3
import time

import pytest

from avgctl.protocol import CommandAck, ControlEvent, ControlView, Hello
from avgctl.server import store as st
from avgctl.server.api import AutotuneView
from avgctl.server.store import schema
from tests.support.frames import batch, encoded, hello

# The tables as the first release made them, before the schema had versions (user_version 0):
# no commands.note, jobs.last_seen or jobs.divergence_step, and the autopilot's settings inside
# each job's control view as well as in their own column.
_UNVERSIONED = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, world_size INTEGER NOT NULL, status TEXT NOT NULL, step INTEGER NOT NULL DEFAULT 0,
    control TEXT NOT NULL, autotune TEXT NOT NULL, config TEXT, divergence_mean REAL, divergence_max REAL,
    created_at REAL NOT NULL, updated_at REAL NOT NULL
);
CREATE TABLE ranks (
    job_id TEXT NOT NULL, rank INTEGER NOT NULL, host TEXT NOT NULL, pid INTEGER NOT NULL,
    step INTEGER NOT NULL DEFAULT 0, last_seen REAL NOT NULL, connected INTEGER NOT NULL,
    closed_normally INTEGER NOT NULL DEFAULT 0, dropped INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (job_id, rank)
) WITHOUT ROWID;
CREATE TABLE steps (
    job_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (job_id, rank, step)
) WITHOUT ROWID;
CREATE TABLE rounds (
    job_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, group_size INTEGER NOT NULL,
    body TEXT NOT NULL, PRIMARY KEY (job_id, rank, step, group_size)
) WITHOUT ROWID;
CREATE TABLE control_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT NOT NULL, rank INTEGER NOT NULL, step INTEGER NOT NULL, control TEXT NOT NULL
);
CREATE INDEX control_events_job ON control_events (job_id, step);
CREATE TABLE commands (
    id INTEGER PRIMARY KEY AUTOINCREMENT, job_id TEXT NOT NULL, author TEXT NOT NULL, created_at REAL NOT NULL,
    body TEXT NOT NULL, type TEXT NOT NULL, status TEXT NOT NULL, applied_step INTEGER, reason TEXT,
    updated_at REAL NOT NULL
);
CREATE INDEX commands_job ON commands (job_id, status, id);
INSERT INTO jobs VALUES ('old', 2, 'running', 40,
    '{"period":8,"warmup_steps":0,"averaging_paused":false,"training_paused":false,"hierarchy":null,"version":3,"autotune":{"enabled":false,"target_divergence":null}}',
    '{"enabled":true,"target_divergence":0.2}',
    '{"kind":"periodic","period":4,"warmup_steps":0,"group_sizes":null}', 0.1, 0.3, 1.0, 2.0);
INSERT INTO ranks VALUES ('old', 0, 'h', 10, 40, 2.0, 1, 0, 0), ('old', 1, 'h', 11, 39, 2.0, 1, 0, 0);
INSERT INTO steps VALUES ('old', 0, 40, '{"step":40,"time":1.0,"loss":0.5}');
INSERT INTO commands (job_id, author, created_at, body, type, status, applied_step, reason, updated_at)
    VALUES ('old', 'ann', 1.5, '{"type":"set_period","period":8}', 'set_period', 'applied', 30, NULL, 1.6);
"""


def _raw(path, sql: str) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def _columns(path, table: str) -> list[str]:
    return [row[1] for row in _raw(path, f"PRAGMA table_info({table})")]


@pytest.fixture
def path(tmp_path) -> str:
    return str(tmp_path / "s.db")


@pytest.fixture
def store(path):
    s = st.Store(path)
    s.start()
    yield s
    s.close()


def _opened(path: str) -> None:
    """Start and close a store on ``path``: what a server start does to the file."""
    s = st.Store(path)
    s.start()
    s.close()


def _hello(rank: int, **kw) -> Hello:
    return Hello.model_validate_json(hello(rank=rank, pid=100 + rank, **kw))


def _say_hello(store: st.Store, rank: int, **kw) -> None:
    store.submit(lambda c: st.hello(c, _hello(rank, **kw), time.time())).result()


# ------------------------------------------------------------------------------ schema versions


def test_a_new_file_reaches_the_latest_version_with_every_column(path):
    _opened(path)
    assert _raw(path, "PRAGMA user_version") == [(schema.LATEST,)] and schema.LATEST == len(schema.MIGRATIONS) >= 3
    assert _columns(path, "jobs")[-3:] == ["last_seen", "divergence_step", "secret_hash"]
    assert _columns(path, "commands")[-4:] == ["note", "control_version", "rolled_back_at_step", "rolled_back_at"]
    assert _columns(path, "control_events")[-1] == "note"


def test_a_file_from_before_the_versions_migrates_and_keeps_its_rows(path):
    conn = sqlite3.connect(path)
    conn.executescript(_UNVERSIONED)
    conn.close()
    store = st.Store(path)
    store.start()
    try:
        assert _raw(path, "PRAGMA user_version") == [(schema.LATEST,)]
        assert _columns(path, "commands")[-4] == "note" and "divergence_step" in _columns(path, "jobs")
        # The view's stale autotune key is gone from the row; the column's settings are what reads show.
        ((control,),) = _raw(path, "SELECT control FROM jobs")
        assert json.loads(control) == {
            "period": 8,
            "warmup_steps": 0,
            "averaging_paused": False,
            "training_paused": False,
            "hierarchy": None,
            "version": 3,
        }
        job = store.get_job("old")
        assert job.control.autotune == AutotuneView(enabled=True, target_divergence=0.2) and job.control.period == 8
        assert job.status == "disconnected" and [r.connected for r in job.ranks] == [False, False]
        assert job.last_seen is None and store.list_jobs()[0].id == "old"
        (command,) = store.list_commands("old")
        assert (command.author, command.applied_step, command.note) == ("ann", 30, None)
        assert store.metrics("old")["steps"] == [{"rank": 0, "step": 40, "time": 1.0, "loss": 0.5}]
        assert store.stats()[0]["period"] == 8
        # The migrated file takes today's writes: a note, a rank's hello, its metrics.
        store.submit(lambda c: st.insert_command(c, "old", {"type": "average_now"}, "bo", 3.0, note="why")).result()
        assert store.list_commands("old")[-1].note == "why"
        _say_hello(store, 0, job_id="old")
        store.submit(lambda c: st.write_metrics(c, "old", 0, encoded(batch(41, 4)), 4.0)).result()
        assert store.get_job("old").step == 44
    finally:
        store.close()


def test_the_second_migration_drops_only_the_control_views_autotune_key(path):
    conn = sqlite3.connect(path, isolation_level=None)
    schema.MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    view = ControlView(period=4, warmup_steps=0).model_dump_json()
    for job_id, control in (("stale", view[:-1] + ',"autotune":{"enabled":true}}'), ("clean", view)):
        conn.execute(
            "INSERT INTO jobs (id, world_size, status, control, autotune, created_at, updated_at)"
            " VALUES (?, 1, 'finished', ?, '{\"enabled\":false,\"target_divergence\":null}', 1.0, 1.0)",
            (job_id, control),
        )
    conn.close()
    _opened(path)
    assert dict(_raw(path, "SELECT id, control FROM jobs")) == {"stale": view, "clean": view}
    assert _raw(path, "PRAGMA user_version") == [(schema.LATEST,)]


# A start marks every job and rank disconnected (jobs.status, updated_at; ranks.connected): the rest must stand.
_KEPT = {
    "schema": "SELECT type, name, sql FROM sqlite_master ORDER BY name",
    "jobs": "SELECT id, world_size, step, control, autotune, config, divergence_mean, divergence_max, created_at,"
    " last_seen, divergence_step FROM jobs",
    "ranks": "SELECT job_id, rank, host, pid, step, last_seen, closed_normally, dropped FROM ranks",
    "steps": "SELECT * FROM steps",
    "rounds": "SELECT * FROM rounds",
    "commands": "SELECT * FROM commands",
}


def test_reopening_a_file_at_the_latest_version_leaves_its_tables_and_rows_alone(store, path):
    _say_hello(store, 0)
    store.submit(lambda c: st.write_metrics(c, "job-1", 0, encoded(batch(1, 4)), 1.0)).result()
    store.submit(lambda c: st.insert_command(c, "job-1", {"type": "average_now"}, "ann", 1.0, note="n")).result()
    store.close()
    before = {name: _raw(path, sql) for name, sql in _KEPT.items()}
    _opened(path)
    assert {name: _raw(path, sql) for name, sql in _KEPT.items()} == before
    assert _raw(path, "PRAGMA user_version") == [(schema.LATEST,)] and len(before["steps"]) == 4


def test_a_file_from_a_newer_avgctl_is_refused_and_left_as_it_was(path):
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {schema.LATEST + 1}")
    conn.close()
    with pytest.raises(schema.NewerSchema, match=f"version {schema.LATEST + 1}"):
        st.Store(path).start()
    assert _raw(path, "PRAGMA user_version") == [(schema.LATEST + 1,)]
    assert _raw(path, "SELECT name FROM sqlite_master") == []


def test_a_migration_that_fails_leaves_the_file_as_it_was(path):
    conn = sqlite3.connect(path)
    conn.execute("CREATE VIEW commands AS SELECT 1 AS id")  # version 1 cannot index it (nor add commands.note)
    conn.close()
    with pytest.raises(sqlite3.OperationalError, match="views may not be indexed"):
        st.Store(path).start()
    assert _raw(path, "PRAGMA user_version") == [(0,)]
    assert _raw(path, "SELECT type, name FROM sqlite_master") == [("view", "commands")]  # no table of version 1


# ------------------------------------------------------------------------------ writes, then reads


def test_a_hello_makes_the_job_and_its_rank_and_a_conflicting_world_size_is_refused(store):
    _say_hello(store, 0)
    _say_hello(store, 1)
    job = store.get_job("job-1")
    assert (job.world_size, job.status, [r.rank for r in job.ranks]) == (2, "running", [0, 1])
    assert job.control.autotune == AutotuneView() and job.config.kind == "periodic"
    with pytest.raises(st.Conflict):
        store.submit(lambda c: st.hello(c, _hello(0, world_size=3), time.time())).result()


def test_a_job_is_finished_once_every_rank_closed_normally(store):
    for rank in (0, 1):
        _say_hello(store, rank)
    store.submit(lambda c: st.disconnect(c, "job-1", 0, True, time.time())).result()
    assert store.get_job("job-1").status == "running"
    store.submit(lambda c: st.disconnect(c, "job-1", 1, True, time.time())).result()
    assert store.get_job("job-1").status == "finished"


def test_a_command_is_pending_until_rank_0s_ack_and_an_applied_one_sets_the_control_view(store):
    _say_hello(store, 0)
    with pytest.raises(st.UnknownJob):
        store.submit(lambda c: st.insert_command(c, "nope", {"type": "average_now"}, "ann", 1.0)).result()
    out = store.submit(
        lambda c: st.insert_command(c, "job-1", {"type": "set_period", "period": 8}, "ann", 1.0)
    ).result()
    assert [c.id for c in store.pending_commands("job-1")] == [out.id] and store.get_command("job-1", out.id) == out
    ack = CommandAck(
        command_id=out.id, status="applied", applied_step=5, control=ControlView(period=8, warmup_steps=0, version=1)
    )
    resolved = store.submit(lambda c: st.resolve_command(c, "job-1", ack, 2.0)).result()
    assert (resolved.status, resolved.applied_step) == ("applied", 5) and store.pending_commands("job-1") == []
    assert store.get_job("job-1").control.period == 8
    assert store.submit(lambda c: st.resolve_command(c, "job-1", ack, 3.0)).result() is None  # a re-sent ack
    assert store.list_commands("job-1") == [resolved] and store.stats()[0]["commands"] == {"applied": 1}


def test_the_autopilots_report_yields_to_newer_settings(store):
    _say_hello(store, 0)
    on = AutotuneView(enabled=True, target_divergence=0.1)
    store.submit(lambda c: st.set_autotune(c, "job-1", on, 1.0)).result()
    report = AutotuneView(enabled=True, target_divergence=0.1, state="active", note="steady")
    assert store.submit(lambda c: st.report_autotune(c, "job-1", report, (True, 0.1))).result()
    assert store.get_job("job-1").control.autotune == report
    stale = AutotuneView(enabled=True, target_divergence=0.5, state="calibrating")
    assert not store.submit(lambda c: st.report_autotune(c, "job-1", stale, (True, 0.5))).result()
    assert store.get_job("job-1").control.autotune == report
    assert not store.submit(lambda c: st.report_autotune(c, "nope", report, (True, 0.1))).result()


def test_queued_metric_batches_read_back_as_their_records(store):
    for rank in (0, 1):
        _say_hello(store, rank)
    for rank in (0, 1):
        assert store.add_metrics("job-1", rank, encoded(batch(1, 8)))
    store.submit(lambda c: None).result()  # queued after them: they are committed
    series = store.metrics("job-1", since_step=5, ranks=[1], names=["loss", "lr"])
    assert series["steps"] == [{"rank": 1, "step": s, "loss": 1.0, "lr": 0.1} for s in range(5, 9)]
    assert [(r["rank"], r["step"]) for r in store.metrics("job-1")["rounds"]] == [(0, 4), (1, 4), (0, 8), (1, 8)]
    job = store.get_job("job-1")
    assert (job.step, job.divergence_max, store.dropped_batches) == (8, 0.3, 0)
    snap = json.loads(store.snapshot_json("job-1", 1000))
    assert snap["steps"] == store.metrics("job-1")["steps"] and snap["job"]["id"] == "job-1"


# ------------------------------------------------------------------------------ retention


def test_retention_keeps_recent_steps_in_full_a_bounded_history_and_every_control_event(path):
    store = st.Store(path, retention_steps=50, history_records=20, prune_interval=3600)
    store.start()
    try:
        _say_hello(store, 0)
        event = [ControlEvent(step=1, control=ControlView(period=4, warmup_steps=0))]
        store.submit(lambda c: st.write_metrics(c, "job-1", 0, encoded(batch(1, 999, control=event)), 1.0)).result()
        assert store.prune().result() > 0
        steps = [r["step"] for r in store.metrics("job-1")["steps"]]
        assert [s for s in steps if s >= 999 - 50] == list(range(949, 1000))
        assert 0 < len([s for s in steps if s < 949]) <= 20
        assert [e["step"] for e in store.metrics("job-1")["control_events"]] == [1]
        assert store.prune().result() == 0  # nothing new: nothing to thin
    finally:
        store.close()
