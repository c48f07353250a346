"""REST commands reach real torchrun ranks through a real server, and survive server restarts."""

from __future__ import annotations

import os
import urllib.error

import pytest

from tests.support.processes import ServerProcess, Workers, descendants, wait_for

pytestmark = pytest.mark.dist


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "avgctl.db").start()
    yield srv
    srv.stop()


def _running(api, job, world=2):
    job_data = api.try_get(f"/api/jobs/{job}")
    return job_data and sum(r["connected"] for r in job_data["ranks"]) == world and job_data


def _per_rank(events, key):
    out: dict[int, list] = {}
    for e in events:
        out.setdefault(e["rank"], []).append(key(e))
    return out


def test_rest_commands_apply_on_every_rank_at_one_step(server, tmp_path):
    api, job = server.api, "e2e-control"
    workers = Workers(
        server.base, job, "--steps", "500", "--period", "4", "--step-delay", "0.02", log=tmp_path / "w.log"
    )
    try:
        wait_for(lambda: _running(api, job), 60, what="both ranks connected")
        applied = api.wait_done(job, api.command(job, {"type": "set_period", "period": 5}))
        assert applied["status"] == "applied", applied
        pause = api.wait_done(job, api.command(job, {"type": "pause_averaging"}))
        assert pause["status"] == "applied" and pause["applied_step"] > applied["applied_step"]
        # The server knows the job is periodic: refused at once (422), nothing logged.
        with pytest.raises(urllib.error.HTTPError) as refused:
            api.command(job, {"type": "set_hierarchy", "periods": {"2": 3}})
        assert refused.value.code == 422 and "hierarchical averager" in refused.value.read().decode()
        resume = api.wait_done(job, api.command(job, {"type": "resume_averaging"}))
        assert workers.wait(120) == 0
    finally:
        workers.stop()
    metrics = api.get(f"/api/jobs/{job}/metrics")
    # Every rank reported each control change at the command's applied step.
    events = _per_rank(
        metrics["control_events"], lambda e: (e["step"], e["control"]["period"], e["control"]["averaging_paused"])
    )
    assert set(events) == {0, 1} and events[0] == events[1]
    s1, s2, s3 = applied["applied_step"], pause["applied_step"], resume["applied_step"]
    assert (s1, 5, False) in events[0] and (s2, 5, True) in events[0] and (s3, 5, False) in events[0]
    # Rounds: every 4 steps, then every 5 from s1, none while paused, every 5 again from s3.
    rounds = _per_rank(metrics["rounds"], lambda r: r["step"])
    assert rounds[0] == rounds[1]
    steps = rounds[0]
    assert all(s % 4 == 0 for s in steps if s < s1)
    # Agreed by the exchange after the round at s1 - 1, the new grid starts at that round.
    anchor = s1 - 1 if s1 - 1 in steps else s1
    assert [s for s in steps if s1 <= s < s2] == [s for s in range(anchor, s2, 5) if s >= s1]
    assert [s for s in steps if s2 <= s < s3] == []
    assert [s for s in steps if s >= s3][:3] == [s3, s3 + 5, s3 + 10]
    assert api.get(f"/api/jobs/{job}")["status"] == "finished"


def test_stopping_workers_leaves_no_rank_behind(server, tmp_path):
    # torchrun puts each rank in a session of its own: killing torchrun's group alone orphans them.
    workers = Workers(server.base, "e2e-stop", "--steps", "100000", "--step-delay", "0.01", log=tmp_path / "w.log")
    try:
        wait_for(lambda: _running(server.api, "e2e-stop"), 60, what="both ranks connected")
        ranks = [pid for pid in descendants(workers.proc.pid) if b"avgctl.worker.demo" in _cmdline(pid)]
        assert len(ranks) == 2
    finally:
        workers.stop()
    assert [pid for pid in ranks if os.path.exists(f"/proc/{pid}")] == []


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_server_killed_and_restarted_mid_run(server, tmp_path):
    api, job = server.api, "e2e-restart"
    workers = Workers(
        server.base, job, "--steps", "700", "--period", "8", "--step-delay", "0.02", log=tmp_path / "w.log"
    )
    try:
        wait_for(lambda: _running(api, job), 60, what="both ranks connected")
        wait_for(lambda: api.get(f"/api/jobs/{job}")["step"] > 50, 30, what="50 steps")
        before = api.get(f"/api/jobs/{job}/metrics")
        server.kill()
        server.start()  # same port, same database
        history = api.get(f"/api/jobs/{job}/metrics")
        assert len(history["steps"]) >= len(before["steps"]) > 0
        # Posted before the ranks are back (pending), then the server dies again before delivering it.
        cmd = api.command(job, {"type": "set_period", "period": 7})
        server.kill()
        server.start()
        done = api.wait_done(job, cmd, timeout=90)
        assert done["status"] == "applied"
        assert workers.wait(120) == 0
    finally:
        workers.stop()
    metrics = api.get(f"/api/jobs/{job}/metrics")
    for rank in (0, 1):
        became_7 = [e for e in metrics["control_events"] if e["rank"] == rank and e["control"]["period"] == 7]
        assert [e["step"] for e in became_7] == [done["applied_step"]], "applied once, at one step, on every rank"
    # Training never stalled: no step took long while the server was down or restarting.
    step_times = [s["step_time"] for s in metrics["steps"] if s.get("step_time") is not None]
    assert step_times and max(step_times) < 2.0, max(step_times)
    steps_by_rank = _per_rank(metrics["steps"], lambda s: s["step"])
    assert max(steps_by_rank[0]) == 699
