"""Limits: the autopilot is total, inputs are bounded, reads stay small, and nothing confirmed is lost.

Each test runs a real server (uvicorn on a free port, or ``avgctl serve``) and speaks to it as its
clients do: websockets for the ranks and dashboards, HTTP for the REST API, SQLite read directly.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import math
import sqlite3
import threading
import urllib.request
import uuid

import httpx
import pytest
import websockets
from websockets.sync.client import connect as ws_connect

from avgctl.protocol import AveragerConfig, ControlView, Hello, MetricsBatch, RoundRecord, StepRecord
from avgctl.protocol.bounds import SCALAR_NAME_MAX_LENGTH
from avgctl.server import store as st
from avgctl.server.autotune import COST_FLOOR_MAX
from avgctl.server.store import reads
from tests.support.frames import JOB_SECRET, close_of, hello, uniform_round
from tests.support.polling import wait_for
from tests.support.processes import ServerProcess
from tests.support.servers import CONTROL, READ, WORKER, auth, make_settings, running_server


def _round(step: int, relative: float, seconds: float = 0.001) -> RoundRecord:
    return uniform_round(step, relative, seconds=seconds)


def _steps(first: int, last: int, step_time: float = 0.01) -> list[StepRecord]:
    return [StepRecord(step=s, time=1000.0 + s, step_time=step_time, loss=1.0) for s in range(first, last + 1)]


def _stored_seq(ws, seq: int, timeout: float = 10.0) -> None:
    """Read until the server confirms batch ``seq`` (commands and older confirmations pass)."""
    while True:
        msg = json.loads(ws.recv(timeout=timeout))
        if msg["kind"] == "stored" and msg["seq"] >= seq:
            return


def _autotune(server, job: str) -> dict:
    return httpx.get(f"{server.url}/api/jobs/{job}", headers=auth(READ)).json()["control"]["autotune"]


def _steps_stored(server, job: str) -> list[int]:
    out = httpx.get(f"{server.url}/api/jobs/{job}/metrics?names=loss&limit=1000000", headers=auth(READ))
    assert out.status_code == 200
    return [r["step"] for r in out.json()["steps"]]


def _switch_on(server, job: str) -> None:
    on = httpx.post(
        f"{server.url}/api/jobs/{job}/commands",
        json={"type": "set_autotune", "enabled": True, "target_divergence": 0.01},
        headers=auth(CONTROL),
    )
    assert on.status_code == 202 and on.json()["status"] == "applied"


# ------------------------------------------------------------------------------ the autopilot


def test_a_round_of_1e308_seconds_against_steps_of_1e_300_costs_the_job_nothing(tmp_path):
    with running_server(make_settings(tmp_path)) as server:
        with ws_connect(f"ws://127.0.0.1:{server.port}/ws/worker", additional_headers=auth(WORKER)) as ws:
            ws.send(hello(job_id="extreme", world_size=1))
            wait_for(lambda: httpx.get(f"{server.url}/api/jobs/extreme", headers=auth(READ)).status_code == 200)
            _switch_on(server, "extreme")
            # Two rounds: the first starts the clock, the second makes a proposal and its cost floor
            # (averaging 1e308 s against steps of 1e-300 s: once OverflowError in math.ceil).
            # Divergence grows 0.005 a step: the budget 0.01 lasts 2 steps, so it proposes period 2.
            rel = math.sqrt(0.02)
            extreme = MetricsBatch(
                steps=_steps(1, 8, step_time=1e-300), rounds=[_round(4, rel, 1e308), _round(8, rel, 1e308)], seq=0
            )
            ws.send(extreme.model_dump_json())
            ws.send(
                MetricsBatch(steps=_steps(9, 16), rounds=[_round(12, rel), _round(16, rel)], seq=1).model_dump_json()
            )
            _stored_seq(ws, 1)
            assert _steps_stored(server, "extreme") == list(range(1, 17))
            report = wait_for(lambda: (a := _autotune(server, "extreme")).get("last_proposal") and a)
            assert report["state"] == "active"
            proposal = report["last_proposal"]
            assert (proposal["current"], proposal["period"]) == (4, 2)
            assert 1 <= proposal["tau_cost"] <= COST_FLOOR_MAX and proposal["communication_bound"]
            assert all(math.isfinite(proposal[k]) for k in ("delta", "growth", "target", "raw_period"))


def test_an_error_in_the_autopilot_suspends_it_for_that_job_and_costs_ingest_no_batch(tmp_path, monkeypatch, caplog):
    from avgctl.server import autotune

    def fails(*args, **kwargs):
        raise RuntimeError("injected fault in the rule")

    monkeypatch.setattr(autotune, "observe_round", fails)  # failure injection: the rule's one entry
    caplog.set_level(logging.ERROR, logger="avgctl.server.autopilot")
    with running_server(make_settings(tmp_path)) as server:
        with ws_connect(f"ws://127.0.0.1:{server.port}/ws/worker", additional_headers=auth(WORKER)) as ws:
            ws.send(hello(job_id="faulty", world_size=1))
            wait_for(lambda: httpx.get(f"{server.url}/api/jobs/faulty", headers=auth(READ)).status_code == 200)
            _switch_on(server, "faulty")
            for seq in range(4):
                first = 8 * seq + 1
                batch = MetricsBatch(steps=_steps(first, first + 7), rounds=[_round(first + 3, 0.1)], seq=seq)
                ws.send(batch.model_dump_json())
            _stored_seq(ws, 3)
            assert _steps_stored(server, "faulty") == list(range(1, 33))
            report = wait_for(lambda: (a := _autotune(server, "faulty")).get("state") == "suspended" and a)
            assert report["enabled"] is False
            assert report["note"] == "autopilot error: RuntimeError: injected fault in the rule"
            scrape = httpx.get(f"{server.url}/metrics", headers=auth(READ)).text
            assert 'avgctl_autopilot_errors_total{job="faulty"} 1.0' in scrape
            logged = [r for r in caplog.records if "suspended for job faulty" in r.getMessage()]
            assert len(logged) == 1 and logged[0].exc_info is not None


# ------------------------------------------------------------------------------ bounded input


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_a_non_finite_target_divergence_is_a_422_with_a_reason(tmp_path, value):
    with running_server(make_settings(tmp_path)) as server:
        with ws_connect(f"ws://127.0.0.1:{server.port}/ws/worker", additional_headers=auth(WORKER)) as ws:
            ws.send(hello(job_id="target", world_size=1))
            wait_for(lambda: httpx.get(f"{server.url}/api/jobs/target", headers=auth(READ)).status_code == 200)
            body = '{"type": "set_autotune", "enabled": true, "target_divergence": ' + value + "}"
            out = httpx.post(
                f"{server.url}/api/jobs/target/commands",
                content=body,
                headers={**auth(CONTROL), "Content-Type": "application/json"},
            )
            assert out.status_code == 422, out.text
            (error,) = [e for e in out.json()["detail"] if "target_divergence" in e["loc"]]
            assert "finite" in error["msg"] or "greater than" in error["msg"]
            # Nothing was half-applied: no command logged, the autopilot untouched.
            commands = httpx.get(f"{server.url}/api/jobs/target/commands", headers=auth(READ)).json()
            assert commands == [] and _autotune(server, "target")["enabled"] is False


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("ranks=99999999999999999999999", "ranks must be integers from 0 to 999999"),
        ("ranks=1000000", "ranks must be integers from 0 to 999999"),
        ("names=" + ",".join(f"n{i}" for i in range(65)), "at most 64 names"),
    ],
)
def test_metric_filters_out_of_bounds_are_a_422_with_a_reason(tmp_path, query, reason):
    with running_server(make_settings(tmp_path)) as server:
        with ws_connect(f"ws://127.0.0.1:{server.port}/ws/worker", additional_headers=auth(WORKER)) as ws:
            ws.send(hello(job_id="filters", world_size=1))
            wait_for(lambda: httpx.get(f"{server.url}/api/jobs/filters", headers=auth(READ)).status_code == 200)
            out = httpx.get(f"{server.url}/api/jobs/filters/metrics?{query}", headers=auth(READ))
            assert out.status_code == 422 and reason in out.json()["detail"]
            assert (
                httpx.get(f"{server.url}/api/jobs/filters/metrics?ranks=999999", headers=auth(READ)).status_code == 200
            )


@pytest.mark.parametrize(
    "name",
    ["n" * 900_000, "n" * (SCALAR_NAME_MAX_LENGTH + 1), "", "loss\n", "a\x00b", "tab\there", "\x85"],
    ids=["900KB", "65 chars", "empty", "trailing newline", "NUL", "tab", "C1 control"],
)
def test_a_scalar_name_out_of_bounds_is_refused_with_the_field_in_the_reason(tmp_path, name):
    with running_server(make_settings(tmp_path, max_frame_bytes=2**20)) as server:
        with ws_connect(
            f"ws://127.0.0.1:{server.port}/ws/worker", additional_headers=auth(WORKER), max_size=2**21
        ) as ws:
            ws.send(hello(job_id="names", world_size=1))
            ws.send(
                MetricsBatch(steps=[StepRecord(step=1, time=1.0, scalars={"n" * 64: 1.0})], seq=0).model_dump_json()
            )
            _stored_seq(ws, 0)  # 64 characters are fine
            frame = json.dumps({"kind": "metrics", "steps": [{"step": 2, "time": 1.0, "scalars": {name: 1.0}}]})
            ws.send(frame)
            code, reason = close_of(ws)
        assert code == 1008 and reason.startswith("invalid message: ") and "steps.0.scalars" in reason, reason
        assert _steps_stored(server, "names") == [1]


@pytest.mark.parametrize("author", ["autopilot ", " autopilot", "AutoPilot", "AUTOPILOT", "autopilot"])
def test_the_autopilots_name_is_reserved_in_any_case_and_spacing(tmp_path, author):
    with running_server(make_settings(tmp_path)) as server:
        with ws_connect(f"ws://127.0.0.1:{server.port}/ws/worker", additional_headers=auth(WORKER)) as ws:
            ws.send(hello(job_id="authors", world_size=1))
            wait_for(lambda: httpx.get(f"{server.url}/api/jobs/authors", headers=auth(READ)).status_code == 200)
            # http.client sends a header value's spaces as given (httpx refuses them).
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
            conn.request(
                "POST",
                "/api/jobs/authors/commands",
                body=json.dumps({"type": "average_now"}),
                headers={**auth(CONTROL), "X-Avgctl-Author": author, "Content-Type": "application/json"},
            )
            out = conn.getresponse()
            body = json.loads(out.read())
            conn.close()
            assert out.status == 422 and "reserved" in body["detail"], body
            ok = httpx.post(
                f"{server.url}/api/jobs/authors/commands",
                json={"type": "average_now"},
                headers={**auth(CONTROL), "X-Avgctl-Author": "autopilot-fan"},
            )
            assert ok.status_code == 202
            authors = [
                c["author"] for c in httpx.get(f"{server.url}/api/jobs/authors/commands", headers=auth(READ)).json()
            ]
            assert authors == ["autopilot-fan"]


# ------------------------------------------------------------------------------ nothing confirmed is lost

RANKS, BATCHES, PER_BATCH = 8, 200, 5
FLOOD_JOB = "flood"


def _flood_batch(seq: int) -> str:
    first = seq * PER_BATCH
    return MetricsBatch(steps=_steps(first, first + PER_BATCH - 1), seq=seq).model_dump_json()


def _flood_hello(rank: int, link: str) -> str:
    return Hello(
        job_id=FLOOD_JOB,
        rank=rank,
        world_size=RANKS,
        host="flood",
        pid=1000 + rank,
        link=link,
        job_secret=JOB_SECRET,
        config=AveragerConfig(kind="periodic", period=4, warmup_steps=0),
        control=ControlView(period=4, warmup_steps=0),
    ).model_dump_json()


async def _send_rank(url: str, rank: int, link: str, confirmed: list[int], window: int | None) -> list[int]:
    """Connect and send every batch after the confirmed ones (``window``: at most that many ahead of
    the confirmation, as flow control; None: all at once); returns the close codes seen."""
    closes: list[int] = []
    while confirmed[rank] < BATCHES - 1:
        async with websockets.connect(url, additional_headers=auth(WORKER), compression=None) as ws:
            await ws.send(_flood_hello(rank, link))
            nxt = confirmed[rank] + 1

            async def reader() -> None:
                try:
                    async for text in ws:
                        msg = json.loads(text)
                        if msg["kind"] == "stored":
                            confirmed[rank] = max(confirmed[rank], msg["seq"])
                except websockets.ConnectionClosed:
                    pass

            task = asyncio.create_task(reader())
            try:
                while nxt < BATCHES and not task.done():
                    if window is not None and nxt > confirmed[rank] + window:
                        await asyncio.sleep(0.01)  # flow control: wait for the next confirmation
                        continue
                    await ws.send(_flood_batch(nxt))
                    nxt += 1
                await _settled(lambda: confirmed[rank] >= nxt - 1 or task.done(), lambda: confirmed[rank])
            except websockets.ConnectionClosed:
                pass
            finally:
                task.cancel()
            if ws.close_code is not None:
                closes.append(ws.close_code)
        if window is None:
            return closes  # the flood: one connection each
    return closes


async def _settled(done, progress, quiet: float = 3.0) -> None:
    """Until ``done()``, or ``progress()`` has not moved for ``quiet`` seconds (a server that will
    confirm nothing more: no event says so)."""
    last, since = progress(), asyncio.get_running_loop().time()
    while not done():
        await asyncio.sleep(0.01)
        now = asyncio.get_running_loop().time()
        if progress() != last:
            last, since = progress(), now
        elif now - since > quiet:
            return


def _stored_batches(db: str) -> dict[int, set[int]]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT rank, step FROM steps WHERE job_id = ?", (FLOOD_JOB,)).fetchall()
    finally:
        conn.close()
    per_rank: dict[int, set[int]] = {r: set() for r in range(RANKS)}
    for rank, step in rows:
        per_rank[rank].add(step)
    return per_rank


def _dropped_total(server) -> float:
    scrape = httpx.get(f"{server.url}/metrics", headers=auth(READ)).text
    (line,) = [ln for ln in scrape.splitlines() if ln.startswith("avgctl_dropped_metric_batches_total")]
    return float(line.split()[-1])


def test_a_batch_the_writer_could_not_queue_is_never_confirmed_and_comes_again(tmp_path):
    settings = make_settings(tmp_path, metrics_queue=10)
    links = [uuid.uuid4().hex for _ in range(RANKS)]
    confirmed = [-1] * RANKS
    with running_server(settings) as server:
        url = f"ws://127.0.0.1:{server.port}/ws/worker"

        async def flood() -> list[list[int]]:
            return await asyncio.gather(*(_send_rank(url, r, links[r], confirmed, None) for r in range(RANKS)))

        closes = asyncio.run(flood())
        dropped = _dropped_total(server)
        assert dropped > 0, "the flood did not overflow a queue of 10: it tests nothing"
        # Every batch the server confirmed is in SQLite, whatever it dropped.
        stored = _stored_batches(settings.db)
        for rank in range(RANKS):
            want = set(range((confirmed[rank] + 1) * PER_BATCH))
            assert want <= stored[rank], f"rank {rank}: confirmed {confirmed[rank]}, missing {len(want - stored[rank])}"
        assert any(1011 in c for c in closes), closes  # "not stored; send them again"

        # The links send what was not confirmed again (with flow control), until nothing is missing.
        async def resend() -> None:
            await asyncio.gather(*(_send_rank(url, r, links[r], confirmed, 8) for r in range(RANKS)))

        asyncio.run(resend())
        assert _stored_batches(settings.db) == {r: set(range(BATCHES * PER_BATCH)) for r in range(RANKS)}
        dropped = _dropped_total(server)  # the resent ones may have overflowed it again
    with running_server(settings) as server:  # the count of dropped batches outlives a restart
        assert _dropped_total(server) == dropped


# ------------------------------------------------------------------------------ reads stay small

JOB_BIG = "big"
RECORDS = 18_000


def _big_body(step: int) -> str:
    # The largest step record the protocol takes: 32 scalars with names of 64 characters (~2.9 KB).
    scalars = {f"{i:02d}" + "s" * (SCALAR_NAME_MAX_LENGTH - 2): 0.123456789 + i for i in range(32)}
    return StepRecord(step=step, time=1000.0 + step, step_time=0.01, loss=1.0, scalars=scalars).model_dump_json()


def _big_db(path) -> None:
    store = st.Store(str(path))
    store.start()
    store.submit(lambda c: st.hello(c, Hello.model_validate_json(hello(job_id=JOB_BIG, world_size=1)), 0.0)).result()
    store.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO steps (job_id, rank, step, body) VALUES (?, 0, ?, ?)",
            ((JOB_BIG, s, _big_body(s)) for s in range(1, RECORDS + 1)),
        )
        conn.execute("UPDATE jobs SET step = ?, status = 'disconnected' WHERE id = ?", (RECORDS, JOB_BIG))
        conn.execute("UPDATE ranks SET step = ? WHERE job_id = ?", (RECORDS, JOB_BIG))
    conn.close()


def _peak_since_reset(pid: int) -> tuple[int, int]:
    """(VmHWM, VmRSS) in bytes of process ``pid``."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmHWM"], fields["VmRSS"]


def _reset_peak(pid: int) -> None:
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")  # Linux: the peak RSS starts again from the current RSS


def test_a_large_metrics_read_and_four_snapshots_keep_the_servers_memory_bounded(tmp_path):
    db = tmp_path / "big.db"
    _big_db(db)
    server = ServerProcess(db).start()
    try:
        pid = server.proc.pid
        token = {"Authorization": f"Bearer {CONTROL}"}
        urllib.request.urlopen(
            urllib.request.Request(f"{server.base}/api/jobs/{JOB_BIG}/metrics?limit=10", headers=token)
        ).read()
        _reset_peak(pid)
        _, before = _peak_since_reset(pid)
        payload = 0
        with urllib.request.urlopen(
            urllib.request.Request(f"{server.base}/api/jobs/{JOB_BIG}/metrics?limit=1000000", headers=token)
        ) as answer:
            while chunk := answer.read(2**16):
                payload += len(chunk)
        peak, _ = _peak_since_reset(pid)
        growth = peak - before
        print(f"metrics: payload {payload / 2**20:.1f} MiB, server peak growth {growth / 2**20:.1f} MiB")
        assert payload > 40 * 2**20
        assert growth < 0.25 * payload, (growth, payload)  # was 4-5x the payload

        _reset_peak(pid)
        _, before = _peak_since_reset(pid)
        sizes: list[int] = []

        def snapshot() -> None:
            with ws_connect(
                f"ws://127.0.0.1:{server.port}/ws/jobs/{JOB_BIG}", additional_headers=token, max_size=2**28
            ) as ws:
                text = ws.recv(timeout=60)
                sizes.append(len(text))
                assert json.loads(text)["kind"] == "snapshot"

        threads = [threading.Thread(target=snapshot) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        peak, _ = _peak_since_reset(pid)
        growth = peak - before
        print(f"snapshots: 4 x {max(sizes) / 2**20:.1f} MiB, server peak growth {growth / 2**20:.1f} MiB")
        assert len(sizes) == 4 and max(sizes) <= reads.SNAPSHOT_BYTES + 2**20
        assert growth < 4 * 3 * reads.SNAPSHOT_BYTES, growth  # 3 copies a snapshot at most (measured ~2)
    finally:
        server.stop()
