"""Websockets through TestClient: ingest validation and close codes, the dashboard stream."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from avgctl.protocol import ControlEvent, ControlView
from avgctl.server.app import create_app
from tests.support.frames import batch, hello
from tests.support.polling import wait_for
from tests.support.servers import CONTROL, WORKER, auth, make_settings


def closed_with(ws) -> tuple[int, str]:
    with pytest.raises(WebSocketDisconnect) as info:
        ws.receive_text()
    return info.value.code, info.value.reason


BAD_FIRST_FRAMES = [
    ("{not json", 1008, "malformed JSON"),
    ("[]", 1008, "invalid message"),
    ('{"kind": "hello"}', 1008, "invalid message"),
    ('{"kind": "teleport"}', 1008, "invalid message"),
    (batch(1, 2), 1008, "first frame must be a hello"),
    (hello(rank=2, world_size=2), 1008, "not below world size"),
    (hello().replace("job-1", "bad id"), 1008, "job_id"),
    (hello().replace('"rank":0', '"rank":"zero"'), 1008, "rank"),
    (json.dumps({**json.loads(hello()), "pid": 2**63}), 1008, "pid"),  # SQLite could not store it
    ("x" * 5000, 1009, "larger than"),
]


@pytest.mark.parametrize("frame,code,reason", BAD_FIRST_FRAMES, ids=[str(i) for i in range(len(BAD_FIRST_FRAMES))])
def test_bad_first_frame_closes_with_reason(client, frame, code, reason):
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as ws:
        ws.send_text(frame)
        got_code, got_reason = closed_with(ws)
    assert got_code == code and reason in got_reason
    assert client.get("/api/jobs").json() == []


@pytest.mark.parametrize(
    "frame,reason",
    [
        ("{not json", "malformed JSON"),
        (hello(), "hello sent twice"),
        ('{"kind": "metrics", "steps": [{"step": -1, "time": 0}]}', "steps.0.step"),
        (f'{{"kind": "metrics", "steps": [{{"step": {2**63}, "time": 0}}]}}', "steps.0.step"),  # past SQLite's INTEGER
        ('{"kind": "ack", "command_id": 1, "status": "done"}', "status"),
        (f'{{"kind": "ack", "command_id": {2**63}, "status": "applied"}}', "command_id"),
        ("y" * 5000, "larger than"),
    ],
)
def test_bad_later_frame_closes_and_keeps_state(client, frame, reason):
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as ws:
        ws.send_text(hello(world_size=1))
        ws.send_text(batch(1, 3))
        wait_for(
            lambda: (
                client.get("/api/jobs/job-1").status_code == 200 and client.get("/api/jobs/job-1").json()["step"] == 3
            )
        )
        ws.send_text(frame)
        code, got = closed_with(ws)
    assert code in (1008, 1009) and reason in got
    job = wait_for(lambda: (j := client.get("/api/jobs/job-1").json())["status"] != "running" and j)
    assert job["status"] == "disconnected" and job["step"] == 3  # closed by us, not by the worker


def test_ack_from_rank_1_is_refused(client):
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as ws:
        ws.send_text(hello(rank=1))
        ws.send_text('{"kind": "ack", "command_id": 1, "status": "applied"}')
        assert closed_with(ws) == (1008, "only rank 0 acknowledges commands")


def test_same_rank_from_another_link_is_refused_the_same_link_replaces(client):
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as first:
        first.send_text(hello(pid=100, link="L1"))
        wait_for(lambda: client.get("/api/jobs/job-1").status_code == 200)
        with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as other:
            other.send_text(hello(pid=100))
            code, reason = closed_with(other)
            assert code == 4409 and "100" not in reason
        with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as again:
            again.send_text(hello(pid=100, link="L1"))
            assert closed_with(first)[0] == 4000
            again.send_text(batch(1, 2))
            wait_for(lambda: client.get("/api/jobs/job-1").json().get("step") == 2)
            assert client.get("/api/jobs/job-1").json()["ranks"][0]["connected"]


def test_world_size_conflict_while_running(client):
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
        r0.send_text(hello(rank=0, world_size=2))
        wait_for(lambda: client.get("/api/jobs/job-1").status_code == 200)
        with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r1:
            r1.send_text(hello(rank=1, world_size=4, pid=7))
            code, reason = closed_with(r1)
        assert code == 1008 and reason == "world size 4 contradicts the running job"
    assert client.get("/api/jobs/job-1").json()["world_size"] == 2


def test_dashboard_snapshot_then_live(client):
    with client.websocket_connect("/ws/jobs/nope") as dash:
        assert closed_with(dash) == (4404, "no job 'nope'")
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
        r0.send_text(hello(rank=0, world_size=1))
        r0.send_text(batch(1, 8))
        wait_for(
            lambda: (
                client.get("/api/jobs/job-1").status_code == 200 and client.get("/api/jobs/job-1").json()["step"] == 8
            )
        )
        with client.websocket_connect("/ws/jobs/job-1") as dash:
            snap = dash.receive_json()
            assert snap["kind"] == "snapshot" and snap["job"]["id"] == "job-1"
            assert [s["step"] for s in snap["steps"]] == list(range(1, 9)) and snap["steps"][0]["rank"] == 0
            assert [r["step"] for r in snap["rounds"]] == [4, 8]
            assert snap["commands"] == [] and snap["control_events"] == []
            r0.send_text(batch(9, 4))
            msg = dash.receive_json()
            assert msg["kind"] == "metrics_batch" and [item["rank"] for item in msg["items"]] == [0]
            item = msg["items"][0]
            assert [s["step"] for s in item["steps"]] == [9, 10, 11, 12] and [r["step"] for r in item["rounds"]] == [12]
            client.post("/api/jobs/job-1/commands", json={"type": "average_now"})
            kinds = {}
            while "command" not in kinds:
                m = dash.receive_json()
                kinds[m["kind"]] = m
            assert kinds["command"]["command"]["type"] == "average_now"
            assert json.loads(r0.receive_text())["kind"] == "command"


def test_live_steps_thins_what_dashboards_get_and_the_store_keeps_all(tmp_path):
    # 40 steps/s per rank at 20 ticks/s: two step records per rank per tick.
    settings = make_settings(tmp_path, live_steps=40, dashboard_interval=0.05)
    with TestClient(create_app(settings), headers=auth(CONTROL)) as client:
        with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
            r0.send_text(hello(rank=0, world_size=1))
            wait_for(lambda: client.get("/api/jobs/job-1").status_code == 200)
            with client.websocket_connect("/ws/jobs/job-1") as dash:
                assert dash.receive_json()["kind"] == "snapshot"
                r0.send_text(batch(1, 8))
                msg = dash.receive_json()
                while msg["kind"] != "metrics_batch":
                    msg = dash.receive_json()
                # Two evenly spaced from the first (every 4th of 8), then the newest.
                assert [s["step"] for s in msg["items"][0]["steps"]] == [1, 5, 8]
                wait_for(lambda: len(client.get("/api/jobs/job-1/metrics").json()["steps"]) == 8)


def _live_steps(dash, until: int) -> list[int]:
    """Step numbers of the dashboard's live metrics frames, up to the one holding step ``until``."""
    steps: list[int] = []
    while until not in steps:
        msg = dash.receive_json()
        if msg["kind"] == "metrics_batch":
            steps += [s["step"] for item in msg["items"] for s in item["steps"]]
    return steps


def test_numbered_batches_are_confirmed_once_stored_and_a_repeat_counts_once(client):
    period_2 = ControlEvent(step=6, control=ControlView(period=2, warmup_steps=0, version=1))
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
        r0.send_text(hello(world_size=1, link="L1"))
        wait_for(lambda: client.get("/api/jobs/job-1").status_code == 200)
        with client.websocket_connect("/ws/jobs/job-1") as dash:
            assert dash.receive_json()["kind"] == "snapshot"
            r0.send_text(batch(1, 4, seq=0))
            r0.send_text(batch(5, 4, seq=1, control=[period_2]))
            stored = json.loads(r0.receive_text())
            while stored["seq"] < 1:  # seq 0 may be confirmed on its own first
                stored = json.loads(r0.receive_text())
            assert stored == {"kind": "stored", "seq": 1}
            # Confirmed means committed: readable at once.
            assert [s["step"] for s in client.get("/api/jobs/job-1/metrics").json()["steps"]] == list(range(1, 9))
            assert _live_steps(dash, until=8) == list(range(1, 9))
            # The same link again, its `stored` lost: it repeats seq 1 after a hello whose control
            # is newer than that batch's event (version 2), then goes on with seq 2.
            r0.close()
            with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as again:
                again.send_text(
                    hello(world_size=1, control=ControlView(period=3, warmup_steps=0, version=2), link="L1")
                )
                again.send_text(batch(5, 4, seq=1, control=[period_2]))
                again.send_text(batch(9, 4, seq=2))
                stored = json.loads(again.receive_text())
                while stored["seq"] < 2:
                    stored = json.loads(again.receive_text())
                assert _live_steps(dash, until=12) == [9, 10, 11, 12]  # the repeat is not shown twice
            # A new link of the same process (training run again in a notebook) counts from 0 again.
            with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as new:
                new.send_text(hello(world_size=1, control=ControlView(period=3, warmup_steps=0, version=2), link="L2"))
                new.send_text(batch(13, 4, seq=0))
                assert _live_steps(dash, until=16) == [13, 14, 15, 16]
    metrics = client.get("/api/jobs/job-1/metrics").json()
    assert [s["step"] for s in metrics["steps"]] == list(range(1, 17))
    assert [e["step"] for e in metrics["control_events"]] == [6]  # stored once
    assert client.get("/api/jobs/job-1").json()["control"]["version"] == 2  # the older event did not win
