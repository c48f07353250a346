"""The server killed, restarted and frozen under a training job (short version of bench/faults.py):
training never waits for it, worker memory stays flat, every missing record is a counted drop, and
every command is applied exactly once."""

from __future__ import annotations

import pytest

from bench.faults import run_faults

pytestmark = pytest.mark.dist


def test_server_kill_restart_and_freeze(tmp_path):
    run = run_faults(tmp_path, steps=900, step_delay=0.02, freeze=5.0)
    assert run.rc == 0
    assert run.freeze_seconds >= 5.0
    for rank, figures in enumerate(run.ranks):
        # Generous on a shared 2-core machine: the step is ~20 ms; a stall on the server would be >= 1 s.
        assert figures.p99 < 0.2 and max(figures.step_times) < 1.0, (rank, figures.p99, max(figures.step_times))
        assert figures.rss_growth < 64 * 2**20, (rank, figures.rss_growth)
        assert run.missing[rank] <= run.dropped[rank], (rank, run.missing, run.dropped)
    assert run.server_dropped == 0
    for command in run.commands:
        assert command["status"] == "applied", command
        # Its state shows up at its applied step only (or not at all when a later command applied at
        # the same exchange superseded it), and that exchange emitted one event.
        assert set(run.applied[command["id"]]) <= {command["applied_step"]}, run.applied
        assert run.events_at[command["applied_step"]] == 1, run.events_at
    assert run.control_version == len(run.commands), "every command applied exactly once"
