"""``set_outer_lr`` against a real uvicorn and SQLite: only a DiLoCo job takes it (else 422 at once,
nothing logged), a bad lr is the model's 422, and what a DiLoCo job reports (its kind, its control's
outer lr, its rounds' pseudo-gradient figures) comes back from the REST API."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from avgctl.protocol import AveragerConfig, CommandAck, ControlEvent, ControlView, MetricsBatch, SetOuterLr
from avgctl.protocol.commands import NOT_DILOCO
from avgctl.worker import control_state as cs
from tests.support.frames import hello, uniform_round
from tests.support.polling import wait_for
from tests.support.servers import CONTROL, WORKER, auth, make_settings, running_server

DILOCO = AveragerConfig(kind="diloco", period=4, warmup_steps=0)
PERIODIC = AveragerConfig(kind="periodic", period=4, warmup_steps=0)
HIERARCHICAL = AveragerConfig(kind="hierarchical", period=4, warmup_steps=0, group_sizes=[2])


def worker(server):
    return ws_connect(server.url.replace("http", "ws", 1) + "/ws/worker", additional_headers=auth(WORKER))


def post(server, job, body: dict | str):
    content = body if isinstance(body, str) else json.dumps(body)
    headers = {**auth(CONTROL), "Content-Type": "application/json"}
    return httpx.post(f"{server.url}/api/jobs/{job}/commands", content=content, headers=headers, timeout=5)


def get(server, path):
    return httpx.get(server.url + path, headers=auth(CONTROL), timeout=5)


def running(server, job):
    out = get(server, f"/api/jobs/{job}")
    return out.status_code == 200 and out.json()["status"] == "running" and out.json()


def test_a_job_that_is_not_diloco_refuses_set_outer_lr_at_once_with_rank_0s_reason(tmp_path):
    with running_server(make_settings(tmp_path)) as server, worker(server) as flat, worker(server) as tree:
        flat.send(hello(job_id="flat", world_size=1, config=PERIODIC))
        control = ControlView(period=4, warmup_steps=0, hierarchy={"2": 4})
        tree.send(hello(job_id="tree", world_size=2, config=HIERARCHICAL, control=control))
        for job in ("flat", "tree"):
            wait_for(lambda job=job: running(server, job), what=f"{job} stored")
            out = post(server, job, {"type": "set_outer_lr", "lr": 0.35})
            assert out.status_code == 422, out.text
            assert out.json()["detail"] == NOT_DILOCO
            assert get(server, f"/api/jobs/{job}/commands").json() == []
        # The words rank 0 uses when it refuses one itself (a job the server knew no kind of).
        with pytest.raises(cs.CommandRejected) as rejected:
            cs.apply_command(cs.periodic_state(4, 0), SetOuterLr(lr=0.35), 0)
        assert str(rejected.value) == NOT_DILOCO
        assert post(server, "nobody", {"type": "set_outer_lr", "lr": 0.35}).status_code == 404


BAD_LRS = ('"NaN"', "NaN", '"Infinity"', '"-Infinity"', "1e999", "0", "0.0", "-0.5", "1000001", "1e7", '"fast"', "null")


def test_a_bad_outer_lr_is_the_models_422_and_nothing_is_logged(tmp_path):
    with running_server(make_settings(tmp_path)) as server, worker(server) as r0:
        r0.send(hello(job_id="dl", world_size=1, config=DILOCO))
        wait_for(lambda: running(server, "dl"), what="dl stored")
        for lr in BAD_LRS:
            out = post(server, "dl", f'{{"type": "set_outer_lr", "lr": {lr}}}')
            assert out.status_code == 422, (lr, out.text)
        assert get(server, "/api/jobs/dl/commands").json() == []
        assert post(server, "dl", {"type": "set_outer_lr", "lr": 1e6}).status_code == 202  # the bound itself


def test_a_diloco_job_takes_set_outer_lr_and_shows_its_kind_outer_lr_and_pseudo_gradients(tmp_path):
    with running_server(make_settings(tmp_path)) as server, worker(server) as r0:
        r0.send(hello(job_id="dl", world_size=1, config=DILOCO))
        job = wait_for(lambda: running(server, "dl"), what="dl stored")
        assert job["config"]["kind"] == "diloco" and job["control"]["outer_lr"] is None
        assert get(server, "/api/jobs").json()[0]["config"]["kind"] == "diloco"

        out = post(server, "dl", {"type": "set_outer_lr", "lr": 0.35})
        assert out.status_code == 202, out.text
        delivered = json.loads(r0.recv(timeout=10))
        assert delivered["command"] == {"type": "set_outer_lr", "lr": 0.35}

        figures = {"pseudo_gradient_norm": 0.5, "pseudo_gradient_relative": 0.05, "outer_lr": 0.7}
        first = uniform_round(8, 0.01).model_copy(update=figures)
        view = ControlView(period=4, warmup_steps=0, outer_lr=0.35, version=1)
        later = first.model_copy(update={"step": 12, "pseudo_gradient_norm": float("inf"), "outer_lr": 0.35})
        r0.send(MetricsBatch(rounds=[first], control=[ControlEvent(step=9, control=view)]).model_dump_json())
        r0.send(
            CommandAck(command_id=delivered["id"], status="applied", applied_step=9, control=view).model_dump_json()
        )
        r0.send(MetricsBatch(rounds=[later]).model_dump_json())

        applied = wait_for(
            lambda: (c := get(server, f"/api/jobs/dl/commands/{out.json()['id']}").json())["status"] == "applied" and c
        )
        assert applied["applied_step"] == 9
        assert get(server, "/api/jobs/dl").json()["control"]["outer_lr"] == 0.35
        metrics = wait_for(lambda: len((m := get(server, "/api/jobs/dl/metrics").json())["rounds"]) == 2 and m)
        figures = [(r["pseudo_gradient_norm"], r["pseudo_gradient_relative"], r["outer_lr"]) for r in metrics["rounds"]]
        assert figures == [(0.5, 0.05, 0.7), ("Infinity", 0.05, 0.35)]  # a non-finite figure is data
        assert [e["control"]["outer_lr"] for e in metrics["control_events"]] == [0.35]
        picked = get(server, "/api/jobs/dl/metrics?names=outer_lr,pseudo_gradient_norm&since_step=10").json()
        assert picked["rounds"] == [{"rank": 0, "step": 12, "outer_lr": 0.35, "pseudo_gradient_norm": "Infinity"}]


def test_the_served_outer_lr_bound_is_the_one_commands_are_checked_against(tmp_path):
    with running_server(make_settings(tmp_path)) as server:
        top = get(server, "/api/limits").json()["max_outer_lr"]
    SetOuterLr(lr=top)
    with pytest.raises(ValueError):
        SetOuterLr(lr=top * 1.01)
