"""The worker link against a real uvicorn: metrics, commands, reconnects, restarts, bad tokens."""

from __future__ import annotations

import functools
import time

import httpx
import pytest
from websockets.client import backoff

from avgctl.worker.link import connect  # the full signature (with link options)
from tests.support.fakes import FakeAverager
from tests.support.polling import wait_for
from tests.support.servers import CONTROL, READ, WORKER, ServerThread, auth, make_settings, running_server

FAST = functools.partial(backoff, initial_delay=0.05, min_delay=0.1, max_delay=0.5)


def get(server, path):
    return httpx.get(server.url + path, headers=auth(CONTROL), timeout=5)


def post(server, path, body):
    return httpx.post(server.url + path, headers=auth(CONTROL), json=body, timeout=5)


def steps_stored(server, job_id="job-l", rank=0):
    out = get(server, f"/api/jobs/{job_id}/metrics?ranks={rank}&names=loss")
    return [s["step"] for s in out.json()["steps"]] if out.status_code == 200 else []


def test_metrics_and_commands_through_the_link(tmp_path):
    with running_server(make_settings(tmp_path)) as server:
        averagers = [FakeAverager(rank=r, world_size=2) for r in range(2)]
        links = [connect(a, server=server.url, job_id="job-l", token=WORKER, send_interval=0.05) for a in averagers]
        try:
            assert averagers[0].source is links[0] and averagers[1].source is None
            wait_for(lambda: all(link.connected.is_set() for link in links))
            for _ in range(10):
                for a in averagers:
                    a.train_step()
            wait_for(lambda: steps_stored(server, rank=1) == list(range(1, 11)))
            cmd = post(server, "/api/jobs/job-l/commands", {"type": "set_period", "period": 2}).json()
            wait_for(lambda: links[0]._arrived.is_set())
            averagers[0].train_step()
            out = wait_for(
                lambda: (c := get(server, f"/api/jobs/job-l/commands/{cmd['id']}").json())["status"] != "pending" and c
            )
            assert out["status"] == "applied" and out["applied_step"] == 11
            # A hierarchy for a periodic averager: refused before rank 0 sees it, with rank 0's reason.
            bad = post(server, "/api/jobs/job-l/commands", {"type": "set_hierarchy", "periods": {"2": 2}})
            assert bad.status_code == 422 and "needs a hierarchical averager" in bad.json()["detail"]
            assert [c["id"] for c in get(server, "/api/jobs/job-l/commands").json()] == [cmd["id"]]
            job = get(server, "/api/jobs/job-l").json()
            assert job["control"]["period"] == 2 and job["status"] == "running"
        finally:
            for link in links:
                link.close()
        job = wait_for(lambda: (j := get(server, "/api/jobs/job-l").json())["status"] == "finished" and j)
        assert job["step"] >= 11


def test_close_returns_once_the_server_stored_everything(tmp_path):
    with running_server(make_settings(tmp_path)) as server:
        averager = FakeAverager(world_size=1)
        link = connect(averager, server=server.url, job_id="job-l", token=WORKER, send_interval=60.0)
        try:
            assert link.connected.wait(10)
            for _ in range(20):
                averager.train_step()
        finally:
            link.close()  # the first send since the hello: all 20 steps, then wait for `stored`
        assert link.unconfirmed == 0
        assert steps_stored(server) == list(range(1, 21))  # no polling: close waited for the commit


def test_server_down_at_start_then_up(tmp_path):
    # Find a free port by starting and stopping a server, then leave it down.
    probe = ServerThread(make_settings(tmp_path).model_copy(update={"port": 0})).start()
    port = probe.port
    probe.stop()
    averager = FakeAverager(world_size=1)
    link = connect(
        averager,
        server=f"http://127.0.0.1:{port}",
        job_id="job-l",
        token=WORKER,
        reconnect_delays=FAST,
        send_interval=0.05,
        max_records=1000,
    )
    try:
        started = time.perf_counter()
        for _ in range(3000):
            averager.train_step()
        elapsed = time.perf_counter() - started
        assert elapsed < 3.0, f"training slowed by the link: {elapsed:.2f}s for 3000 steps"
        assert link.dropped >= 2000 and not link.connected.is_set()
        server = ServerThread(make_settings(tmp_path).model_copy(update={"port": port})).start()
        try:
            wait_for(lambda: link.connected.is_set(), timeout=15)
            stored = wait_for(lambda: steps_stored(server)[-1:] == [3000] and steps_stored(server))
            assert len(stored) == 1000  # the newest ones survived the bounded buffer
            assert get(server, "/api/jobs/job-l").json()["ranks"][0]["dropped"] == link.dropped
        finally:
            link.close()
            server.stop()
    finally:
        link.close()


def test_server_restart_keeps_history_and_redelivers_pending(tmp_path):
    settings = make_settings(tmp_path)
    server = ServerThread(settings.model_copy(update={"port": 0})).start()
    averager = FakeAverager(world_size=1)
    link = connect(averager, server=server.url, job_id="job-l", token=WORKER, reconnect_delays=FAST, send_interval=0.05)
    try:
        wait_for(lambda: link.connected.is_set())
        for _ in range(5):
            averager.train_step()
        wait_for(lambda: steps_stored(server) == [1, 2, 3, 4, 5])
        # Rank 0 receives the command but does not step before the server dies: still pending.
        cmd = post(server, "/api/jobs/job-l/commands", {"type": "pause_averaging"}).json()
        wait_for(lambda: link._arrived.is_set())
        server.stop()
        wait_for(lambda: not link.connected.is_set())
        server = ServerThread(settings.model_copy(update={"port": server.port})).start()
        assert steps_stored(server) == [1, 2, 3, 4, 5]  # history survived the restart
        assert get(server, f"/api/jobs/job-l/commands/{cmd['id']}").json()["status"] == "pending"
        wait_for(lambda: link.connected.is_set(), timeout=15)
        averager.train_step()  # applies the command once, though it was delivered twice
        out = wait_for(
            lambda: (c := get(server, f"/api/jobs/job-l/commands/{cmd['id']}").json())["status"] == "applied" and c
        )
        assert out["applied_step"] == 6 and averager.state.version == 1
        assert wait_for(lambda: get(server, "/api/jobs/job-l").json()["control"]["averaging_paused"])
        wait_for(lambda: steps_stored(server) == [1, 2, 3, 4, 5, 6])
    finally:
        link.close()
        server.stop()


@pytest.mark.parametrize(("token", "status"), [(None, 401), ("wrong", 401), (READ, 403)])
def test_a_bad_token_is_retried_and_never_stops_training(tmp_path, token, status):
    with running_server(make_settings(tmp_path)) as server:
        averager = FakeAverager(world_size=1)
        link = connect(averager, server=server.url, job_id="job-l", token=token, unauthorized_delays=FAST)
        try:
            wait_for(lambda: link.unauthorized is not None)
            assert link.unauthorized[0] == status and link.error is None and link._thread.is_alive()
            for _ in range(100):
                averager.train_step()
        finally:
            link.close()
        assert not link._thread.is_alive()
        assert get(server, "/api/jobs").json() == []


def test_connect_needs_a_server(monkeypatch):
    monkeypatch.delenv("AVGCTL_SERVER", raising=False)
    with pytest.raises(ValueError, match="AVGCTL_SERVER"):
        connect(FakeAverager())
    with pytest.raises(ValueError, match="http"):
        connect(FakeAverager(), server="ftp://x")
