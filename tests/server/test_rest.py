"""REST through TestClient (lifespan runs): jobs, commands, metrics, Prometheus, validation."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from avgctl.protocol import CommandAck, ControlView
from avgctl.server.app import create_app
from tests.support.frames import batch, hello
from tests.support.polling import wait_for
from tests.support.servers import WORKER, auth, make_settings


def test_health_needs_no_token(settings):
    with TestClient(create_app(settings)) as c:
        assert c.get("/api/health").json() == {"status": "ok"}


def test_empty_server(client):
    assert client.get("/api/jobs").json() == []
    assert client.get("/api/jobs/nope").status_code == 404
    assert client.post("/api/jobs/nope/commands", json={"type": "average_now"}).status_code == 404
    assert client.get("/api/jobs/nope/commands").status_code == 404
    assert client.get("/api/jobs/nope/metrics").status_code == 404


def test_job_lifecycle_metrics_and_commands(client):
    with (
        client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0,
        client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r1,
    ):
        r0.send_text(hello(rank=0, pid=100))
        r1.send_text(hello(rank=1, pid=101))
        r0.send_text(batch(1, 8))
        r1.send_text(batch(1, 9, rank_loss=2.0))

        def both_ranks_in():
            j = client.get("/api/jobs/job-1").json()  # 404 until the first hello is stored
            return [r["step"] for r in j.get("ranks", [])] == [8, 9] and j

        job = wait_for(both_ranks_in)
        assert job["step"] == 9 and job["status"] == "running" and job["world_size"] == 2
        assert [(r["rank"], r["connected"], r["dropped"]) for r in job["ranks"]] == [(0, True, 3), (1, True, 3)]
        assert job["control"]["period"] == 4 and job["control"]["autotune"] == {
            "enabled": False,
            "target_divergence": None,
        }
        listed = client.get("/api/jobs").json()[0]
        assert (listed["divergence_mean"], listed["divergence_max"]) == (0.1, 0.3)  # the latest round's
        assert listed["last_seen"] == max(r["last_seen"] for r in job["ranks"])

        # Rank 0 is connected: the command goes out at once.
        out = client.post("/api/jobs/job-1/commands", json={"type": "set_period", "period": 8})
        assert out.status_code == 202
        cmd = out.json()
        assert cmd["status"] == "pending" and cmd["type"] == "set_period" and cmd["author"] == "api"
        assert {"id", "created_at"} <= cmd.keys()
        delivered = r0.receive_json()
        assert delivered == {"kind": "command", "id": cmd["id"], "command": {"type": "set_period", "period": 8}}
        view = ControlView(period=8, warmup_steps=0, version=1)
        r0.send_text(CommandAck(command_id=cmd["id"], status="applied", applied_step=9, control=view).model_dump_json())
        done = wait_for(
            lambda: (c := client.get(f"/api/jobs/job-1/commands/{cmd['id']}").json())["status"] != "pending" and c
        )
        assert done["status"] == "applied" and done["applied_step"] == 9
        # A repeated ack (after a reconnect) changes nothing.
        r0.send_text(CommandAck(command_id=cmd["id"], status="rejected", reason="late").model_dump_json())
        r0.send_text(batch(9, 1, rounds=False))
        wait_for(lambda: client.get("/api/jobs/job-1/metrics?ranks=0&since_step=9").json()["steps"])
        assert client.get(f"/api/jobs/job-1/commands/{cmd['id']}").json()["status"] == "applied"
        assert client.get("/api/jobs/job-1").json()["control"]["period"] == 8

        m = client.get("/api/jobs/job-1/metrics", params={"since_step": 5, "ranks": "1", "names": "loss,lr"}).json()
        assert [s["step"] for s in m["steps"]] == [5, 6, 7, 8, 9]
        assert m["steps"][0] == {"rank": 1, "step": 5, "loss": 2.0, "lr": 0.1}
        assert [r["step"] for r in m["rounds"]] == [8]
        full = client.get("/api/jobs/job-1/metrics?ranks=0&ranks=1").json()
        assert len(full["steps"]) == 18 and full["steps"][0]["drift"] == 0.5

        text = client.get("/metrics").text
        assert 'avgctl_job_step{job="job-1"} 9.0' in text
        assert 'avgctl_job_period{job="job-1"} 8.0' in text
        assert 'avgctl_job_connected_ranks{job="job-1"} 2.0' in text
        assert 'avgctl_job_commands{job="job-1",status="applied"} 1.0' in text
        assert 'avgctl_job_divergence_max{job="job-1"} 0.3' in text
        assert "avgctl_dropped_metric_batches_total 0.0" in text
    # Both closed normally: the job is finished.
    job = wait_for(lambda: (j := client.get("/api/jobs/job-1").json())["status"] == "finished" and j)
    assert not any(r["connected"] for r in job["ranks"])


def test_command_pending_until_rank0_says_hello(client):
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r1:
        r1.send_text(hello(rank=1, pid=101))
        wait_for(lambda: client.get("/api/jobs/job-1").status_code == 200)
        ids = [
            client.post("/api/jobs/job-1/commands", json=body).json()["id"]
            for body in ({"type": "pause_averaging"}, {"type": "average_now"})
        ]
        assert [c["status"] for c in client.get("/api/jobs/job-1/commands").json()] == ["pending", "pending"]
        with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
            r0.send_text(hello(rank=0, pid=100))
            assert [r0.receive_json()["id"] for _ in ids] == ids  # in id order


def test_set_autotune_is_applied_by_the_server(client):
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
        r0.send_text(hello(rank=0, world_size=1))
        r0.send_text(batch(1, 5))
        wait_for(lambda: client.get("/api/jobs/job-1").json().get("step") == 5)  # 404 until the hello is stored
        out = client.post(
            "/api/jobs/job-1/commands",
            json={"type": "set_autotune", "enabled": True, "target_divergence": 0.5},
            headers={"X-Avgctl-Author": "alice"},
        )
        assert out.status_code == 202
        cmd = out.json()
        assert cmd["status"] == "applied" and cmd["applied_step"] == 5 and cmd["author"] == "alice"
        assert client.get("/api/jobs").json()[0]["control"]["autotune"] == {"enabled": True, "target_divergence": 0.5}


BAD_BODIES = [
    {"type": "set_period", "period": 0},
    {"type": "set_period", "period": "eight"},
    {"type": "set_period"},
    {"type": "set_period", "period": 4, "extra": 1},
    {"type": "launch_missiles"},
    {"period": 4},
    {"type": "set_hierarchy", "periods": {"two": 2}},
    {"type": "set_hierarchy", "periods": {}},
    {"type": "set_autotune", "enabled": "maybe"},
    {"type": "set_autotune", "enabled": True, "target_divergence": -1},
    [],
    "set_period",
    None,
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=[str(i) for i in range(len(BAD_BODIES))])
def test_bad_command_bodies_change_nothing(client, body):
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
        r0.send_text(hello(rank=0, world_size=1))
        wait_for(lambda: client.get("/api/jobs/job-1").status_code == 200)
        out = client.post("/api/jobs/job-1/commands", json=body)
        assert out.status_code == 422, out.text
        assert out.json()["detail"]
        assert client.get("/api/jobs/job-1/commands").json() == []


@pytest.mark.parametrize(
    "request_args",
    [
        (
            "POST",
            "/api/jobs/job-1/commands",
            {"content": b"{not json", "headers": {"Content-Type": "application/json"}},
        ),
        ("POST", "/api/jobs/job-1/commands", {"content": b"\xff\xfe", "headers": {"Content-Type": "application/json"}}),
        (
            "POST",
            "/api/jobs/job-1/commands",
            {"json": {"type": "average_now"}, "headers": {"X-Avgctl-Author": "autopilot"}},
        ),
        ("POST", "/api/jobs/bad%20id/commands", {"json": {"type": "average_now"}}),
        ("GET", "/api/jobs/job-1/commands/0", {}),
        ("GET", "/api/jobs/job-1/commands/abc", {}),
        ("GET", "/api/jobs/job-1/commands/99999999999999999999999", {}),
        ("GET", "/api/jobs/job-1/metrics?since_step=-1", {}),
        ("GET", "/api/jobs/job-1/metrics?since_step=x", {}),
        ("GET", "/api/jobs/job-1/metrics?ranks=a", {}),
        ("GET", "/api/jobs/job-1/metrics?ranks=-1", {}),
        ("GET", "/api/jobs/job-1/metrics?limit=0", {}),
        ("GET", "/api/jobs/" + "x" * 200, {}),
    ],
)
def test_bad_input_is_4xx(client, request_args):
    method, path, kwargs = request_args
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
        r0.send_text(hello(rank=0, world_size=1))
        wait_for(lambda: client.get("/api/jobs/job-1").status_code == 200)
        out = client.request(method, path, **kwargs)
        assert 400 <= out.status_code < 500, out.text
        assert out.json()["detail"]
        assert client.get("/api/jobs/job-1/commands").json() == []


def test_oversized_body_is_413(client):
    with client.websocket_connect("/ws/worker", headers=auth(WORKER)) as r0:
        r0.send_text(hello(rank=0, world_size=1))
        wait_for(lambda: client.get("/api/jobs/job-1").status_code == 200)
        huge = b'{"type": "set_period", "period": 4, "pad": "' + b"x" * 200_000 + b'"}'
        out = client.post("/api/jobs/job-1/commands", content=huge, headers={"Content-Type": "application/json"})
        assert out.status_code == 413

        def chunks():
            for _ in range(100):
                yield b"x" * 10_000

        out = client.post("/api/jobs/job-1/commands", content=chunks(), headers={"Content-Type": "application/json"})
        assert out.status_code == 413
        assert client.get("/api/jobs/job-1/commands").json() == []


def test_generated_token_when_none_configured(tmp_path, capsys):
    settings = make_settings(tmp_path, control_token=None, read_token=None, worker_token=None)
    app = create_app(settings)
    with TestClient(app) as c:
        token = app.state.settings.control_token
        assert token and f"?token={token}" in capsys.readouterr().err
        assert c.get("/api/jobs").status_code == 401
        assert c.get("/api/jobs", headers=auth(token)).status_code == 200
