"""The server killed, restarted and frozen under a training job (short version of bench/faults.py):
training never waits for it, worker memory stays flat, no metric record is lost, and every command
is applied exactly once."""

from __future__ import annotations

import functools
import os
import signal

import pytest
from websockets.client import backoff

from avgctl.worker.link import connect
from tests.support.fakes import FakeAverager
from tests.support.faults import run_faults
from tests.support.polling import wait_for
from tests.support.processes import WORKER, ServerProcess

pytestmark = pytest.mark.dist


def test_server_kill_restart_and_freeze(tmp_path):
    run = run_faults(tmp_path, steps=900, step_delay=0.02, freeze=5.0)
    assert run.rc == 0
    assert run.freeze_seconds >= 5.0
    for rank, figures in enumerate(run.ranks):
        # Generous on a shared 2-core machine: the step is ~20 ms; a stall on the server would be >= 1 s.
        assert figures.p99 < 0.2 and max(figures.step_times) < 1.0, (rank, figures.p99, max(figures.step_times))
        assert figures.rss_growth < 64 * 2**20, (rank, figures.rss_growth)
        # Batches the killed server had not stored are sent again: nothing is lost, nothing dropped.
        assert run.missing[rank] == 0 == run.dropped[rank], (rank, run.missing, run.dropped)
    assert run.server_dropped == 0
    for command in run.commands:
        assert command["status"] == "applied", command
        # Its state shows up at its applied step only (or not at all when a later command applied at
        # the same exchange superseded it), and that exchange emitted one event.
        assert set(run.applied[command["id"]]) <= {command["applied_step"]}, run.applied
        assert run.events_at[command["applied_step"]] == 1, run.events_at
    assert run.control_version == len(run.commands), "every command applied exactly once"


def test_batches_a_killed_server_never_stored_are_sent_again(tmp_path):
    server = ServerProcess(tmp_path / "avgctl.db").start()
    averager = FakeAverager(world_size=1)
    fast = functools.partial(backoff, initial_delay=0.05, min_delay=0.1, max_delay=0.5)
    link = connect(
        averager, server=server.base, job_id="job-k", token=WORKER, reconnect_delays=fast, send_interval=0.05
    )

    def stored() -> list[int]:
        data = server.api.try_get("/api/jobs/job-k/metrics?names=loss")
        return [s["step"] for s in data["steps"]] if data else []

    try:
        assert link.connected.wait(10)
        for _ in range(5):
            averager.train_step()
        wait_for(lambda: stored() == [1, 2, 3, 4, 5] and link.unconfirmed == 0)
        # Frozen, the server reads nothing: steps 6-10 (and the round at 8) sit in its socket
        # when it is killed. Sent once and forgotten, they would be lost without a count.
        os.killpg(server.proc.pid, signal.SIGSTOP)
        for _ in range(5):
            averager.train_step()
        wait_for(lambda: link.unconfirmed == 6)
        server.kill()
        server.start()
        wait_for(lambda: stored() == list(range(1, 11)) and link.unconfirmed == 0, timeout=30)
        assert link.dropped == 0
    finally:
        link.close()
        server.stop()
