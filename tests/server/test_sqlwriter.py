"""The metric writer process: what it commits, how a failure shows, and that it never outlives its server."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys

import pytest
from starlette.websockets import WebSocketDisconnect

from avgctl.protocol import ControlEvent, ControlView
from avgctl.server import store as st
from avgctl.server.store import process
from tests.support.frames import batch, encoded, hello, store_with_two_ranks
from tests.support.polling import wait_for
from tests.support.servers import WORKER, auth

_TABLES = {
    "steps": "SELECT job_id, rank, step, body FROM steps ORDER BY job_id, rank, step",
    "rounds": "SELECT job_id, rank, step, group_size, body FROM rounds ORDER BY job_id, rank, step",
    "control_events": "SELECT job_id, rank, step, control FROM control_events ORDER BY id",
    "ranks": "SELECT job_id, rank, step, dropped FROM ranks ORDER BY job_id, rank",  # last_seen: when queued
    "jobs": "SELECT id, step, control, divergence_mean, divergence_max, divergence_step FROM jobs",  # last_seen: the hello's
}


def _contents(path: str) -> dict[str, list]:
    conn = sqlite3.connect(path)
    try:
        return {table: conn.execute(sql).fetchall() for table, sql in _TABLES.items()}
    finally:
        conn.close()


def _entries() -> list[tuple]:
    """Both ranks, rounds, and control events from both (rank 0's also sets the job's control)."""
    event = ControlEvent(step=6, control=ControlView(period=2, warmup_steps=0, version=7))
    return [
        ("job-1", 1, encoded(batch(1, 8)), 10.0),
        ("job-1", 0, encoded(batch(1, 12, control=[event])), 11.0),
        ("job-1", 1, encoded(batch(9, 2, rounds=False, control=[event])), 12.0),
        ("ghost-job", 0, encoded(batch(1, 2)), 13.0),  # no hello: its records, not its progress
    ]


def test_the_process_stores_what_the_writer_thread_would(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    by_thread, by_process = store_with_two_ranks(tmp_path / "a"), store_with_two_ranks(tmp_path / "b")
    try:
        by_thread.submit(lambda c: st.write_metric_batches(c, _entries())).result()
        for entry in _entries():
            assert by_process.add_metrics(*entry[:3])
        by_process.submit(lambda c: None).result()  # queued after them: they are committed
    finally:
        by_thread.close()
        by_process.close()
    stored = _contents(by_thread.path)
    assert len(stored["steps"]) == 24 and len(stored["control_events"]) == 2
    assert json.loads(stored["jobs"][0][2])["version"] == 7
    assert _contents(by_process.path) == stored


def test_a_failed_write_is_answered_with_its_error_and_the_process_goes_on(tmp_path):
    path = str(tmp_path / "w.db")
    sqlite3.connect(path).close()  # no tables yet
    writer = process.WriterProcess(path)
    writer.start()
    try:
        entry = st.metric_entry("job-1", 0, encoded(batch(1, 4)), 10.0)
        with pytest.raises(process.WriterError, match="OperationalError: no such table"):
            writer.write([entry])
        pid = writer.pid
        store = st.Store(path)
        store.start()  # creates the tables
        store.close()
        writer.write([entry])
        assert writer.pid == pid
        assert [r[2] for r in _contents(path)["steps"]] == [1, 2, 3, 4]
    finally:
        writer.close()


def test_close_lets_the_process_finish_and_exit(tmp_path):
    store = store_with_two_ranks(tmp_path)
    child = store._writer.process._child
    assert store.add_metrics("job-1", 0, encoded(batch(1, 4)))
    store.close()
    assert child.returncode == 0 and store._writer.process.pid is None
    assert len(_contents(store.path)["steps"]) == 4


def test_a_killed_process_loses_only_its_write_and_the_next_batch_starts_a_new_one(tmp_path):
    store = store_with_two_ranks(tmp_path)
    lost: list = []
    store.on_lost = lost.extend
    try:
        first = store._writer.process.pid
        os.kill(first, signal.SIGKILL)
        assert store.add_metrics("job-1", 0, encoded(batch(1, 4)), receipt="seq 0")
        store.submit(lambda c: None).result()
        assert lost == ["seq 0"] and store.dropped_batches == 1 and store.get_job("job-1").ranks[0].step == 0
        assert store.add_metrics("job-1", 0, encoded(batch(5, 4)), receipt="seq 1")
        store.submit(lambda c: None).result()
        assert store.get_job("job-1").ranks[0].step == 8 and store._writer.process.pid != first and lost == ["seq 0"]
    finally:
        store.close()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # exited, not yet reaped
    except FileNotFoundError:
        return True


_PARENT = """
import sys, time
from avgctl.server.store.process import WriterProcess
writer = WriterProcess(sys.argv[1])
writer.start()
print(writer.pid, flush=True)
time.sleep(600)
"""


def test_the_process_exits_when_its_server_is_killed(tmp_path):
    parent = subprocess.Popen(
        [sys.executable, "-c", _PARENT, str(tmp_path / "w.db")], stdout=subprocess.PIPE, text=True
    )
    try:
        child = int(parent.stdout.readline())
        assert not _gone(child)
        parent.kill()  # SIGKILL: no finally, no close; the child reads EOF on its stdin
        parent.wait()
        wait_for(lambda: _gone(child), what="the writer process exited")
    finally:
        parent.kill()
        parent.stdout.close()


def test_batches_the_writer_lost_are_sent_again_on_a_new_connection(client):
    store = client.app.state.store
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
        r0.send_text(hello(world_size=1, link="L1"))
        wait_for(lambda: client.get("/api/jobs/job-1").status_code == 200)
        os.kill(store._writer.process.pid, signal.SIGKILL)
        r0.send_text(batch(1, 4, seq=0))
        with pytest.raises(WebSocketDisconnect) as closed:
            r0.receive_text()
        assert (closed.value.code, closed.value.reason) == (1011, "metric batches not stored; send them again")
    assert store.dropped_batches == 1 and client.get("/api/jobs/job-1/metrics").json()["steps"] == []
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as again:  # what the link does
        again.send_text(hello(world_size=1, link="L1"))
        again.send_text(batch(1, 4, seq=0))
        assert json.loads(again.receive_text()) == {"kind": "stored", "seq": 0}
    assert [s["step"] for s in client.get("/api/jobs/job-1/metrics").json()["steps"]] == [1, 2, 3, 4]


def test_steps_run_again_replace_what_was_stored_and_a_repeat_changes_nothing(tmp_path):
    store = store_with_two_ranks(tmp_path)
    try:
        for first, loss in ((1, 1.0), (3, 2.0), (3, 2.0)):  # steps 3-4 re-run after a restart, then a repeat
            assert store.add_metrics("job-1", 0, encoded(batch(first, 4, rank_loss=loss)))
            store.submit(lambda c: None).result()
        losses = [(s["step"], s["loss"]) for s in store.metrics("job-1")["steps"]]
        assert losses == [(1, 1.0), (2, 1.0), (3, 2.0), (4, 2.0), (5, 2.0), (6, 2.0)]
        assert [r["step"] for r in store.metrics("job-1")["rounds"]] == [4]
    finally:
        store.close()


def test_a_ctrl_c_to_the_process_group_leaves_the_writer_to_its_server(tmp_path):
    store = store_with_two_ranks(tmp_path)
    try:
        assert store.add_metrics("job-1", 0, encoded(batch(1, 4)))
        store.submit(lambda c: None).result()  # the process is up and serving
        pid = store._writer.process.pid
        for sig in (signal.SIGINT, signal.SIGTERM):
            os.kill(pid, sig)
        assert store.add_metrics("job-1", 0, encoded(batch(5, 4)))
        store.submit(lambda c: None).result()
        assert (
            store.get_job("job-1").ranks[0].step == 8
            and store._writer.process.pid == pid
            and store.dropped_batches == 0
        )
    finally:
        store.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="pipe sizes are Linux's")
def test_the_pipe_to_the_process_holds_a_large_commit_in_few_writes(tmp_path):
    import fcntl

    writer = process.WriterProcess(str(tmp_path / "w.db"))
    writer.start()
    try:
        assert fcntl.fcntl(writer._child.stdin.fileno(), fcntl.F_GETPIPE_SZ) == process.PIPE_BYTES
    finally:
        writer.close()
