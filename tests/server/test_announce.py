"""Job-state messages: a burst of changes costs a few reads, and the last message shows the last change."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

from avgctl.protocol import Hello
from avgctl.server import store as st
from avgctl.server.announce import JobAnnouncer
from avgctl.server.hub import Hub
from tests.support.frames import hello


def _job_messages(client) -> list[dict]:
    return [json.loads(text)["job"] for _, text in client._queue]


def _say_hello(store: st.Store, rank: int) -> None:
    msg = Hello.model_validate_json(hello(rank=rank, pid=100 + rank))
    store.submit(lambda c: st.hello(c, msg, time.time())).result()


async def _settled(announcer: JobAnnouncer) -> None:
    while announcer._tasks:
        await asyncio.gather(*announcer._tasks.values())


class HeldReads(st.Store):
    """A real store whose job reads, once done, wait until the test lets them return."""

    def __init__(self, path: str):
        super().__init__(path)
        self.read_done = threading.Event()
        self.release = threading.Event()

    def get_job(self, job_id: str):
        job = super().get_job(job_id)
        self.read_done.set()
        self.release.wait(30)
        return job


@pytest.fixture
def watched(tmp_path):
    """A store holding job-1 with rank 0, and a hub where one dashboard watches job-1."""
    store = HeldReads(str(tmp_path / "s.db"))
    store.start()
    try:
        _say_hello(store, 0)
        hub = Hub()
        yield store, hub, hub.subscribe("job-1", None)
    finally:
        store.release.set()
        store.close()


def test_a_burst_of_changes_is_coalesced_and_ends_on_the_latest_state(watched):
    store, hub, client = watched

    async def scenario() -> None:
        announcer = JobAnnouncer(store, hub)
        announcer.announce("job-1")
        await asyncio.to_thread(store.read_done.wait, 30)  # the first read saw rank 0 alone
        for rank in range(1, 4):  # changes while that read is in flight
            await asyncio.to_thread(_say_hello, store, rank)
            for _ in range(20):
                announcer.announce("job-1")
        store.release.set()
        await _settled(announcer)
        announcer.announce("nobody-watches")  # no clients: no read, no task
        assert not announcer._tasks

    asyncio.run(scenario())
    jobs = _job_messages(client)
    # 61 changes, two reads: the one in flight, then one for everything that came during it.
    assert [[r["rank"] for r in job["ranks"]] for job in jobs] == [[0], [0, 1, 2, 3]]


def test_after_close_nothing_more_is_announced(watched):
    store, hub, client = watched

    async def scenario() -> None:
        announcer = JobAnnouncer(store, hub)
        await announcer.close()
        announcer.announce("job-1")
        assert not announcer._tasks

    asyncio.run(scenario())
    assert _job_messages(client) == []
