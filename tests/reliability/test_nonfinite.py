"""Non-finite figures are data: a diverging run's NaN and infinities are sent, stored, confirmed and
served as valid JSON (the strings "NaN", "Infinity", "-Infinity"), and never cost a rank its link."""

from __future__ import annotations

import json

import httpx
import pytest
from websockets.sync.client import connect

from tests.support.frames import hello
from tests.support.polling import wait_for
from tests.support.processes import CONTROL, ServerProcess, Workers
from tests.support.servers import WORKER, make_settings, running_server
from tests.support.strict import NON_FINITE, strict_json

ROUND_FIGURES = (
    "divergence",
    "relative_divergence",
    "divergence_mean",
    "divergence_max",
    "relative_mean",
    "relative_max",
    "seconds",
)


def _ws(base: str, path: str, token: str):
    url = base.replace("http", "ws", 1) + path
    return connect(url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None, open_timeout=10)


def _get(base: str, path: str) -> str:
    """The answer's text (parsed strictly by the caller), after checking it is a 200."""
    resp = httpx.get(base + path, headers={"Authorization": f"Bearer {CONTROL}"}, timeout=10)
    assert resp.status_code == 200, (path, resp.status_code, resp.text[:300])
    return resp.text


def _non_finite(value) -> bool:
    return value in NON_FINITE


@pytest.mark.dist
def test_a_diverging_demo_job_stays_connected_and_its_non_finite_divergence_is_served_as_json(tmp_path):
    server = ServerProcess(tmp_path / "avgctl.db").start()
    job, log = "nonfinite-demo", tmp_path / "workers.log"
    workers = Workers(server.base, job, "--steps", "60", "--period", "4", "--lr", "1e6", log=log)
    try:
        assert workers.wait(150) == 0, log.read_text()[-3000:]
        # Every rank closed normally once its batches were stored: finished, not disconnected.
        detail = wait_for(
            lambda: (j := strict_json(_get(server.base, f"/api/jobs/{job}")))["status"] != "running" and j
        )
        assert detail["status"] == "finished", (detail, log.read_text()[-3000:])
        assert "refused" not in log.read_text()  # no link was closed for good (1008: "server refused rank")
        assert detail["step"] == 59  # steps 0..59

        metrics = strict_json(_get(server.base, f"/api/jobs/{job}/metrics"))
        rounds = metrics["rounds"]
        assert {r["rank"] for r in rounds} == {0, 1} and max(r["step"] for r in rounds) >= 56
        diverged = [r for r in rounds if _non_finite(r["divergence_mean"])]
        assert diverged, [r["divergence_mean"] for r in rounds]
        assert {r["rank"] for r in diverged} == {0, 1}  # both ranks' rounds stored, not only one's
        # Every figure is a number or the protocol's string for a non-finite one; none went missing.
        for r in rounds:
            for name in ROUND_FIGURES:
                assert isinstance(r[name], float | int) or _non_finite(r[name]), (name, r)
        strict_json(_get(server.base, "/api/jobs"))

        with _ws(server.base, f"/ws/jobs/{job}", CONTROL) as dashboard:
            snapshot = strict_json(dashboard.recv(timeout=10))
        assert snapshot["kind"] == "snapshot" and snapshot["job"]["status"] == "finished"
        assert any(_non_finite(r["divergence_mean"]) for r in snapshot["rounds"])
    finally:
        workers.stop()
        server.stop()


# A value for every float field of a step record and a round record: each spelling, each field.
STEP = {
    "step": 3,
    "time": "NaN",
    "step_time": "Infinity",
    "drift": "-Infinity",
    "loss": "NaN",
    "scalars": {"lr": "Infinity", "grad_norm": "-Infinity", "accuracy": "NaN", "ok": 0.5},
}
ROUND = {
    "step": 4,
    "group_size": 2,
    "divergence": "NaN",
    "relative_divergence": "Infinity",
    "divergence_mean": "-Infinity",
    "divergence_max": "NaN",
    "relative_mean": "Infinity",
    "relative_max": "-Infinity",
    "seconds": "NaN",
    "bytes": 8,
    "exact": True,
    "top_layers": [["w", "Infinity"], ["b", "NaN"], ["c", "-Infinity"]],
    "layers_total": 3,
    "pseudo_gradient_norm": "NaN",  # a DiLoCo round's figures too
    "pseudo_gradient_relative": "Infinity",
    "outer_lr": 0.7,
}


def _metrics_batch_with(ws, kind: str) -> dict:
    """Read live dashboard messages (each parsed strictly) until a ``metrics_batch`` with ``kind`` records."""
    while True:
        message = strict_json(ws.recv(timeout=10))
        if message["kind"] == "metrics_batch" and any(item[kind] for item in message["items"]):
            return message


def test_nan_and_infinities_in_every_figure_are_stored_confirmed_and_served_back_equal(tmp_path):
    job = "nonfinite-hand"
    with running_server(make_settings(tmp_path)) as server, _ws(server.url, "/ws/worker", WORKER) as rank0:
        rank0.send(hello(job_id=job, rank=0, world_size=1, link="hand-link"))
        auth = {"Authorization": f"Bearer {CONTROL}"}
        wait_for(lambda: httpx.get(f"{server.url}/api/jobs/{job}", headers=auth).status_code == 200, what="job")
        with _ws(server.url, f"/ws/jobs/{job}", CONTROL) as dashboard:
            assert strict_json(dashboard.recv(timeout=10))["kind"] == "snapshot"
            frame = {"kind": "metrics", "steps": [STEP], "rounds": [ROUND], "control": [], "dropped": 0, "seq": 0}
            rank0.send(json.dumps(frame))
            # The server confirms the batch as stored: the link would otherwise send it again, and a
            # refusal would close the socket (recv raises).
            while (reply := json.loads(rank0.recv(timeout=10)))["kind"] != "stored":
                pass
            assert reply["seq"] == 0
            live = _metrics_batch_with(dashboard, "rounds")
            assert live["items"][0]["rounds"] == [ROUND] and live["items"][0]["steps"] == [STEP]

        metrics = strict_json(_get(server.url, f"/api/jobs/{job}/metrics"))
        assert metrics["steps"] == [{"rank": 0, **STEP}]
        assert metrics["rounds"] == [{"rank": 0, **ROUND}]
        named = strict_json(_get(server.url, f"/api/jobs/{job}/metrics?names=loss,lr,divergence_max"))
        assert named["steps"] == [{"rank": 0, "step": 3, "loss": "NaN", "lr": "Infinity"}]

        # The job's latest round: -Infinity is kept by SQLite as it is, NaN as NULL beside its step.
        for path in (f"/api/jobs/{job}", "/api/jobs"):
            body = strict_json(_get(server.url, path))
            job_out = body if isinstance(body, dict) else next(j for j in body if j["id"] == job)
            assert (job_out["divergence_mean"], job_out["divergence_max"]) == ("-Infinity", "NaN")
        with _ws(server.url, f"/ws/jobs/{job}", CONTROL) as dashboard:
            snapshot = strict_json(dashboard.recv(timeout=10))
        assert (snapshot["job"]["divergence_mean"], snapshot["job"]["divergence_max"]) == ("-Infinity", "NaN")
        assert snapshot["steps"] == [{"rank": 0, **STEP}] and snapshot["rounds"] == [{"rank": 0, **ROUND}]

        # Prometheus' text format has its own words for them.
        text = _get(server.url, "/metrics")
        assert f'avgctl_job_divergence_mean{{job="{job}"}} -Inf' in text
        assert f'avgctl_job_divergence_max{{job="{job}"}} NaN' in text
