"""Commands that can never apply, against a real uvicorn and SQLite: a finished job's (409, and its
pending ones rejected when it finishes), and a ``set_hierarchy`` that does not fit the job (422)."""

from __future__ import annotations

import json
import time

import httpx
from websockets.sync.client import connect as ws_connect

from avgctl.protocol import AveragerConfig, ControlView, Hello
from avgctl.protocol.hierarchy import ORIENTATION, InvalidHierarchy, hierarchy_periods
from avgctl.server import store as st
from avgctl.server.store.writes import FINISHED_REASON
from tests.support.frames import hello
from tests.support.polling import wait_for
from tests.support.servers import CONTROL, READ, WORKER, auth, make_settings, running_server


def worker(server):
    return ws_connect(server.url.replace("http", "ws", 1) + "/ws/worker", additional_headers=auth(WORKER))


def post(server, job, body):
    return httpx.post(f"{server.url}/api/jobs/{job}/commands", json=body, headers=auth(CONTROL), timeout=5)


def get(server, path):
    return httpx.get(server.url + path, headers=auth(CONTROL), timeout=5)


def status_of(server, job):
    out = get(server, f"/api/jobs/{job}")
    return out.json()["status"] if out.status_code == 200 else None


def commands_of(server, job):
    return get(server, f"/api/jobs/{job}/commands").json()


def test_a_finished_job_takes_no_command_and_logs_none(tmp_path):
    with running_server(make_settings(tmp_path)) as server:
        with worker(server) as r0:
            r0.send(hello(job_id="done", world_size=1))
            wait_for(lambda: status_of(server, "done") == "running")
        wait_for(lambda: status_of(server, "done") == "finished")
        for body in ({"type": "set_period", "period": 8}, {"type": "set_autotune", "enabled": True}):
            out = post(server, "done", body)
            assert out.status_code == 409, out.text
            assert out.json()["detail"] == "job 'done' finished: no rank is left to apply a command"
        assert commands_of(server, "done") == []
        assert post(server, "nope", {"type": "average_now"}).status_code == 404


def test_pending_commands_are_rejected_when_the_job_finishes_and_dashboards_hear_it(tmp_path):
    with running_server(make_settings(tmp_path)) as server:
        dashboard_url = f"{server.url.replace('http', 'ws', 1)}/ws/jobs/run"
        with worker(server) as r0, worker(server) as r1:
            r1.send(hello(job_id="run", rank=1, pid=101))
            wait_for(lambda: status_of(server, "run") == "running")
            queued = post(server, "run", {"type": "average_now"}).json()  # rank 0 has not said hello: kept
            r0.send(hello(job_id="run", rank=0, pid=100))
            assert json.loads(r0.recv(timeout=10))["id"] == queued["id"]  # delivered, never acknowledged
            with ws_connect(dashboard_url, additional_headers=auth(READ)) as dashboard:
                assert json.loads(dashboard.recv(timeout=10))["kind"] == "snapshot"
                r0.close()
                r1.close()
                while (message := json.loads(dashboard.recv(timeout=10)))["kind"] != "command":
                    pass
        assert message["command"]["id"] == queued["id"]
        assert (message["command"]["status"], message["command"]["reason"]) == ("rejected", FINISHED_REASON)
        assert status_of(server, "run") == "finished"
        stored = get(server, f"/api/jobs/run/commands/{queued['id']}").json()
        assert (stored["status"], stored["reason"], stored["applied_step"]) == ("rejected", FINISHED_REASON, None)
        # The job started again under its id gets none of the old commands: the first it is sent is new.
        with worker(server) as again:
            again.send(hello(job_id="run", rank=0, pid=200))
            wait_for(lambda: status_of(server, "run") == "running")
            fresh = post(server, "run", {"type": "average_now"})
            assert fresh.status_code == 202
            assert json.loads(again.recv(timeout=10))["id"] == fresh.json()["id"]


HIERARCHICAL = AveragerConfig(kind="hierarchical", period=4, warmup_steps=0, group_sizes=[2, 8])


def test_a_hierarchy_that_cannot_fit_the_jobs_levels_is_refused_at_once_with_the_workers_reason(tmp_path):
    with running_server(make_settings(tmp_path)) as server:
        with worker(server) as r0:
            control = ControlView(period=4, warmup_steps=0, hierarchy={"2": 2, "8": 4})
            r0.send(hello(job_id="tree", world_size=8, control=control, config=HIERARCHICAL))
            wait_for(lambda: status_of(server, "tree") == "running")
            for periods in ({"2": 16, "4": 4}, {"2": 2}, {"2": 2, "8": 4, "16": 8}, {"2": 8, "8": 4}):
                out = post(server, "tree", {"type": "set_hierarchy", "periods": periods})
                assert out.status_code == 422, (periods, out.text)
                try:
                    hierarchy_periods([2, 8], periods)
                except InvalidHierarchy as err:
                    assert out.json()["detail"] == str(err)  # rank 0's own reason (protocol.hierarchy)
                assert ORIENTATION in out.json()["detail"]
            assert commands_of(server, "tree") == []
            good = post(server, "tree", {"type": "set_hierarchy", "periods": {"2": 4, "8": 16}})
            assert good.status_code == 202
            assert json.loads(r0.recv(timeout=10))["command"] == {"type": "set_hierarchy", "periods": {"2": 4, "8": 16}}

        with worker(server) as flat:
            flat.send(hello(job_id="flat", world_size=1))
            wait_for(lambda: status_of(server, "flat") == "running")
            out = post(server, "flat", {"type": "set_hierarchy", "periods": {"2": 4}})
            assert out.status_code == 422
            assert out.json()["detail"] == "set_hierarchy needs a hierarchical averager; use set_period"
            assert commands_of(server, "flat") == []
        assert post(server, "nobody", {"type": "set_hierarchy", "periods": {"2": 4}}).status_code == 404


def test_a_file_with_pending_commands_of_a_finished_job_has_them_rejected_at_start(tmp_path):
    # As a store before this release left them: the job finished with a command still pending.
    path = str(tmp_path / "old.db")
    store = st.Store(path)
    store.start()
    frame = Hello.model_validate_json(hello(job_id="old", world_size=1))
    store.submit(lambda c: st.hello(c, frame, 1.0)).result()
    out = store.submit(lambda c: st.insert_command(c, "old", {"type": "average_now"}, "ann", 2.0)).result()
    store.submit(lambda c: c.execute("UPDATE jobs SET status = 'finished' WHERE id = 'old'")).result()
    store.close()
    store = st.Store(path)
    store.start()
    try:
        stored = store.get_command("old", out.id)
        assert (stored.status, stored.reason) == ("rejected", FINISHED_REASON) and stored.updated_at >= time.time() - 60
        assert store.pending_commands("old") == []
    finally:
        store.close()
