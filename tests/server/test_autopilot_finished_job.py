"""The autopilot's set_period racing the job's end: a finished job refuses it (``JobFinished``), and
that is no error of the autopilot's."""

from __future__ import annotations

import asyncio
import logging
import time

from avgctl.protocol import Hello
from avgctl.server import autotune as at
from avgctl.server import store as st
from avgctl.server.autopilot import Autopilot
from avgctl.server.commands import CommandService
from avgctl.server.hub import Hub
from avgctl.server.workers import WorkerRegistry
from tests.support.frames import hello

PROPOSAL = at.Proposal(
    step=8,
    current=4,
    period=2,
    reason="test proposal",
    delta=0.02,
    growth=0.005,
    target=0.01,
    raw_period=2.0,
    tau_cost=None,
    communication_bound=False,
)


def test_a_set_period_for_a_job_that_just_finished_is_dropped_quietly(tmp_path, caplog):
    store = st.Store(str(tmp_path / "s.db"))
    store.start()

    async def scenario() -> Autopilot:
        commands = CommandService(store, WorkerRegistry(), Hub())
        autopilot = Autopilot(store, commands)
        msg = Hello.model_validate_json(hello(world_size=1))
        await store.write(lambda c: st.hello(c, msg, time.time()))
        await autopilot.on_hello(msg)
        await commands.on_disconnect("job-1", 0, normal=True)  # the job's only rank left: finished
        autopilot._act("job-1", autopilot.jobs["job-1"], PROPOSAL)  # a round read just before
        await autopilot.close()
        return autopilot

    try:
        with caplog.at_level(logging.DEBUG, logger="avgctl.server.autopilot"):
            autopilot = asyncio.run(scenario())
        assert store.get_job("job-1").status == "finished"
        assert store.list_commands("job-1") == []  # nothing was logged
    finally:
        store.close()
    assert autopilot.jobs["job-1"].pending is None  # free to act again, were the job to run again
    records = [r for r in caplog.records if r.name == "avgctl.server.autopilot"]
    assert [r.levelno for r in records] == [logging.INFO], [r.getMessage() for r in records]
    assert "finished" in records[0].getMessage() and records[0].exc_info is None
