"""The dashboard hub and the metric writer without sockets: one frame per job per tick, batched writes."""

from __future__ import annotations

import json
import sqlite3

from avgctl.protocol import ControlEvent, ControlView
from avgctl.server import store as st
from avgctl.server.api import DashboardMetrics
from avgctl.server.hub import Hub, Thinned
from avgctl.server.store import process
from tests.support.frames import batch, encoded, store_with_two_ranks


def test_one_frame_per_job_per_tick_shared_by_its_clients():
    hub = Hub(interval=0.05, max_queue=8)
    a, b = hub.subscribe("job-1", None), hub.subscribe("job-1", None)
    other = hub.subscribe("job-2", None)
    for rank in (2, 0, 1):
        hub.publish_metrics("job-1", rank, encoded(batch(1, 4)))
    hub.publish_metrics("job-1", 0, encoded(batch(5, 4)))
    hub.publish_metrics("job-3", 0, encoded(batch(1, 4)))  # nobody watches it
    hub._flush()
    assert len(a._queue) == len(b._queue) == 1 and not other._queue
    (_, text_a), (_, text_b) = a._queue[0], b._queue[0]
    assert text_a is text_b  # serialized once
    frame = json.loads(text_a)
    assert frame["kind"] == "metrics_batch" and [item["rank"] for item in frame["items"]] == [0, 1, 2]
    first = frame["items"][0]
    assert [s["step"] for s in first["steps"]] == list(range(1, 9)) and [r["step"] for r in first["rounds"]] == [4, 8]
    assert first["control"] == [] and first["steps"][0]["scalars"] == {"lr": 0.1}
    hub._flush()  # nothing new: nothing sent
    assert len(a._queue) == 1


def test_the_spliced_frame_is_what_its_schema_serializes():
    hub = Hub()
    client = hub.subscribe("job-1", None)
    with_control = batch(1, 4, control=[ControlEvent(step=3, control=ControlView(period=4, warmup_steps=0))])
    hub.publish_metrics("job-1", 1, encoded(with_control))
    hub.publish_metrics("job-1", 0, encoded(batch(1, 2, rounds=False)))
    hub._flush()
    ((_, text),) = client._queue
    assert DashboardMetrics.model_validate_json(text).model_dump_json() == text


def test_metric_batches_are_written_together(tmp_path):
    store = store_with_two_ranks(tmp_path)
    try:
        entries = [
            ("job-1", 1, encoded(batch(1, 8)), 10.0),
            ("job-1", 0, encoded(batch(1, 12)), 11.0),
            ("job-1", 1, encoded(batch(9, 1)), 12.0),  # no round: keeps step 12's figures
        ]
        store.submit(lambda c: st.write_metric_batches(c, entries)).result()
        job = store.get_job("job-1")
        assert job.step == 12 and [(r.rank, r.step, r.dropped) for r in job.ranks] == [(0, 12, 3), (1, 9, 3)]
        assert (job.divergence_mean, job.divergence_max) == (0.1, 0.3)
        assert job.last_seen >= 12.0  # the hello was later than these made-up receive times
        stored = store.metrics("job-1")
        # The dashboard's snapshot text is spliced from the stored records, not re-encoded: same content.
        snap = json.loads(store.snapshot_json("job-1", 100))  # 100 records per rank: all of them, in full
        assert {table: snap[table] for table in stored} == stored
        assert snap["kind"] == "snapshot" and snap["job"] == store.get_job("job-1").model_dump(mode="json")
        assert store.snapshot_json("nope", 100) is None
        assert len(stored["steps"]) == 21 and [r["step"] for r in stored["rounds"] if r["rank"] == 1] == [4, 8]
        # Ingest's path: batches queued while the writer is busy go out together, none lost.
        for first in range(13, 113):
            assert store.add_metrics("job-1", 0, encoded(batch(first, 1, rounds=False)))
        store.submit(lambda c: None).result()  # queued after them: they are committed
        assert store.get_job("job-1").ranks[0].step == 112 and store.dropped_batches == 0
    finally:
        store.close()


def test_a_commits_rank_progress_touches_only_ranks_that_said_hello_and_keeps_their_identity(tmp_path):
    store = store_with_two_ranks(tmp_path)
    try:
        before = {r.rank: (r.host, r.pid, r.connected) for r in store.get_job("job-1").ranks}
        entries = [("job-1", rank, encoded(batch(1, 4 + rank)), 20.0 + rank) for rank in (0, 1, 7)]
        entries.append(("ghost-job", 0, encoded(batch(1, 2)), 20.0))
        store.submit(lambda c: st.write_metric_batches(c, entries)).result()
        ranks = store.get_job("job-1").ranks
        assert [(r.rank, r.step, r.last_seen, r.dropped) for r in ranks] == [(0, 4, 20.0, 3), (1, 5, 21.0, 3)]
        assert {r.rank: (r.host, r.pid, r.connected) for r in ranks} == before
        assert store.get_job("ghost-job") is None
        # A rank's step never goes back (a batch sent again after a reconnect is an old one).
        store.submit(lambda c: st.write_metric_batches(c, [("job-1", 0, encoded(batch(1, 2)), 30.0)])).result()
        assert [(r.step, r.last_seen) for r in store.get_job("job-1").ranks][0] == (4, 30.0)
    finally:
        store.close()


def test_the_writer_checkpoints_its_wal_at_its_own_size_and_trims_it_back(tmp_path):
    store = store_with_two_ranks(tmp_path)
    try:
        pragmas = store.submit(
            lambda c: [
                c.execute(f"PRAGMA {p}").fetchone()[0]
                for p in ("wal_autocheckpoint", "journal_size_limit", "journal_mode")
            ]
        ).result()
        assert pragmas == [process.WAL_CHECKPOINT_PAGES, process.WAL_SIZE_LIMIT, "wal"]
    finally:
        store.close()


def test_a_snapshots_older_records_say_how_many_each_stands_for(tmp_path):
    store = store_with_two_ranks(tmp_path)
    try:
        entries = [("job-1", rank, encoded(batch(1, 1000)), 10.0) for rank in (0, 1)]  # rounds every 4 steps
        store.submit(lambda c: st.write_metric_batches(c, entries)).result()
        snap = json.loads(
            store.snapshot_json("job-1", 200)
        )  # 100 records per rank: steps from 950 in full, 50 older ones
        for table, total in (("steps", 949), ("rounds", 237)):  # of each rank's, below step 950
            stored = {(r["rank"], r["step"]): r for r in store.metrics("job-1")[table]}
            assert all({k: v for k, v in r.items() if k != "w"} == stored[r["rank"], r["step"]] for r in snap[table])
            old = [r for r in snap[table] if r["rank"] == 0 and r["step"] < 950]
            recent = [r for r in snap[table] if r["rank"] == 0 and r["step"] >= 950]
            assert all("w" not in r for r in recent) and len(old) <= 50
            weights = {r["w"] for r in old}
            assert weights == {-(-total // 50)}  # every k-th kept, k the least that keeps at most 50
            assert abs(len(old) * weights.pop() - total) < -(-total // 50)
    finally:
        store.close()


def test_a_job_read_is_one_snapshot_even_when_a_write_lands_between_its_queries(tmp_path):
    store = store_with_two_ranks(tmp_path)
    try:
        reader = store._readers.connection()
        landed = []

        def write_between(statement: str) -> None:
            # After the job's row was read and before its ranks are, the writer commits a batch.
            if not landed and statement.startswith("SELECT rank, host"):
                landed.append(True)
                entries = [("job-1", r, encoded(batch(1, 8 + r)), 10.0) for r in (0, 1)]
                store.submit(lambda c: st.write_metric_batches(c, entries)).result()

        reader.set_trace_callback(write_between)
        job = store.get_job("job-1")
        reader.set_trace_callback(None)
        assert landed
        assert job.step == max(r.step for r in job.ranks)  # both from before the write, or both after
        assert store.get_job("job-1").step == 9
    finally:
        store.close()


def test_rows_beyond_one_statements_parameter_limit_are_all_written(tmp_path):
    store = store_with_two_ranks(tmp_path)
    store.close()
    conn = process.connect(store.path)
    try:
        conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 14)  # at most two step rows (4 values) per INSERT
        conn.execute("BEGIN")
        st.write_metric_batches(conn, [("job-1", 0, encoded(batch(1, 10)), 10.0)])  # 10 steps, 2 rounds
        conn.execute("COMMIT")
        assert [s for (s,) in conn.execute("SELECT step FROM steps ORDER BY step")] == list(range(1, 11))
        assert [s for (s,) in conn.execute("SELECT step FROM rounds ORDER BY step")] == [4, 8]
    finally:
        conn.close()


def test_thinned_keeps_at_most_its_cap_evenly_spaced_from_the_first_and_the_newest():
    for cap in (1, 2, 5, 8):
        for offered in (0, 1, cap, cap + 1, 3 * cap + 2, 1000):
            thinned = Thinned(cap)
            items = [str(i) for i in range(offered)]
            for start in range(0, offered, 3):  # in batches, as ranks send them
                thinned.extend(items[start : start + 3])
            kept = [int(x) for x in thinned.kept()]
            if offered <= cap:
                assert kept == list(range(offered))
                continue
            spaced = [int(x) for x in thinned.items]
            assert spaced[0] == 0 and len(spaced) <= cap
            assert len({b - a for a, b in zip(spaced, spaced[1:])}) <= 1  # even spacing: one stride
            # Never thinner than needed: the stride is the least power of two that fits the cap.
            assert len(spaced) > cap // 2
            assert kept == (spaced if spaced[-1] == offered - 1 else [*spaced, offered - 1])


def test_a_fast_rank_is_thinned_for_dashboards_and_a_slow_one_is_not():
    hub = Hub(interval=0.05, live_steps=100)  # 5 step records per rank per tick
    client = hub.subscribe("job-1", None)
    hub.publish_metrics("job-1", 0, encoded(batch(1, 8, rounds=False)))  # steps 1-8
    hub.publish_metrics("job-1", 0, encoded(batch(9, 8, rounds=False)))  # steps 9-16
    hub.publish_metrics("job-1", 1, encoded(batch(1, 4, rounds=False)))  # steps 1-4
    hub._flush()
    ((_, text),) = client._queue
    fast, slow = json.loads(text)["items"]
    assert [s["step"] for s in fast["steps"]] == [1, 5, 9, 13, 16]  # every 4th, and the newest
    assert fast["step_weight"] == 16 / 5  # each stands for this many steps, for sums of step time
    assert [s["step"] for s in slow["steps"]] == [1, 2, 3, 4] and slow["step_weight"] == 1.0
    assert DashboardMetrics.model_validate_json(text).model_dump_json() == text
