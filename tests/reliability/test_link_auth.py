"""A link whose token the server refuses (HTTP 401/403 on the upgrade) keeps trying with backoff,
says why, never holds training up, stops at once when closed, and gets in once the server takes the
token: a server restarted with it, or a restarted server that kept its generated token."""

from __future__ import annotations

import functools
import itertools
import logging
import time

import httpx
from websockets.client import backoff

from avgctl.worker.link import connect
from tests.support.fakes import FakeAverager
from tests.support.polling import wait_for
from tests.support.processes import ServerProcess
from tests.support.servers import ServerThread, auth, make_settings

FAST = dict(
    unauthorized_delays=functools.partial(backoff, initial_delay=0.05, min_delay=0.05, max_delay=0.2, factor=2.0),
    reconnect_delays=functools.partial(backoff, initial_delay=0.05, min_delay=0.1, max_delay=0.5),
    send_interval=0.05,
)
A, B = "token-a-the-server-had", "token-b-the-link-holds"


def one_token(tmp_path, token: str, port: int = 0):
    # The one-token setup: the control token serves workers too (no worker token configured).
    return make_settings(tmp_path, control_token=token, read_token=None, worker_token=None, port=port)


def steps_of(base: str, token: str, job: str) -> list[int]:
    out = httpx.get(f"{base}/api/jobs/{job}/metrics?names=loss", headers=auth(token), timeout=5)
    return [s["step"] for s in out.json()["steps"]] if out.status_code == 200 else []


def refusals(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "refused the token" in r.getMessage()]


def test_a_refused_token_is_retried_with_backoff_until_a_server_on_the_port_takes_it(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="avgctl.worker.link")
    server = ServerThread(one_token(tmp_path, A)).start()
    averager = FakeAverager(world_size=1)
    link = connect(averager, server=server.url, job_id="auth-job", token=B, **FAST)
    try:
        wait_for(lambda: len(refusals(caplog)) >= 3, what="three refusals, each retried")
        assert link.unauthorized is not None and link.unauthorized[0] == 401
        assert link.error is None and link._thread.is_alive() and not link.connected.is_set()
        warning = refusals(caplog)[0]
        assert "refused the token of rank 0 of job auth-job (HTTP 401" in warning
        assert "trying again in" in warning and "restarted with a new token" in warning and "AVGCTL_TOKEN" in warning
        started = time.perf_counter()
        for _ in range(2000):  # training goes on meanwhile, its records buffered
            averager.train_step()
        assert time.perf_counter() - started < 3.0
        server.stop()
        server = ServerThread(one_token(tmp_path, B, port=server.port)).start()
        wait_for(lambda: link.connected.is_set(), timeout=15, what="the link got in")
        averager.train_step()
        wait_for(lambda: steps_of(server.url, B, "auth-job")[-1:] == [2001], what="the steps arrived")
        assert link.unauthorized is None and link.error is None
    finally:
        link.close()
        server.stop()


def test_closing_a_link_that_waits_out_a_refusal_returns_at_once(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="avgctl.worker.link")
    server = ServerThread(one_token(tmp_path, A)).start()
    try:
        waits = dict(FAST, unauthorized_delays=lambda: itertools.chain([0.0], itertools.repeat(60.0)))
        link = connect(FakeAverager(world_size=1), server=server.url, job_id="auth-job", token=B, **waits)
        wait_for(lambda: any("trying again in 60.0 s" in m for m in refusals(caplog)), what="a 60 s wait")
        started = time.perf_counter()
        link.close()
        assert not link._thread.is_alive() and time.perf_counter() - started < 1.0
    finally:
        server.stop()


def test_a_link_holding_the_generated_token_gets_back_in_after_the_server_restarts(tmp_path):
    server = ServerProcess(tmp_path / "kept.db", default_tokens=False).start()
    kept = tmp_path / "kept.db.token"
    token = kept.read_text().strip()  # written before the server answered its first request
    averager = FakeAverager(world_size=1)
    link = connect(averager, server=server.base, job_id="kept-job", token=token, **FAST)
    try:
        wait_for(lambda: link.connected.is_set(), timeout=15, what="the first session")
        averager.train_step()
        wait_for(lambda: steps_of(server.base, token, "kept-job") == [1], what="step 1")
        server.kill()
        wait_for(lambda: not link.connected.is_set(), what="the link noticed")
        server.start()
        wait_for(lambda: link.connected.is_set(), timeout=15, what="the link got back in")
        averager.train_step()
        wait_for(lambda: steps_of(server.base, token, "kept-job") == [1, 2], what="step 2 after the restart")
        assert link.unauthorized is None and link.error is None
    finally:
        link.close()
        server.stop()
