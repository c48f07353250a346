"""Many simulated ranks and dashboards against a real ``avgctl serve``: the load generator that
``tests/reliability/test_load.py`` and the benchmarks (``bench/load.py``, ``bench/ingest.py``) share.

Its ranks speak the worker protocol with their own token (``TOKEN``) and job (``JOB``); each batch
carries ``RECORDS_PER_BATCH`` step records stamped with their send time, from which the dashboards
(in a process of their own) measure send-to-receive latency. ``run_load`` runs a whole load test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import websockets

from avgctl.protocol import AveragerConfig, ControlView, Hello, MetricsBatch, StepRecord
from tests.support.processes import free_port, rss_bytes

TOKEN = "bench-token"
JOB = "bench"
RECORDS_PER_BATCH = 5
SECRET = "bench-job-secret-0123456789"  # the job secret every simulated rank of ``JOB`` shares


def hello(rank: int, world: int, link: str) -> str:
    return Hello(
        job_id=JOB,
        rank=rank,
        world_size=world,
        host="bench",
        pid=10_000 + rank,
        link=link,
        job_secret=SECRET,
        config=AveragerConfig(kind="periodic", period=8, warmup_steps=0),
        control=ControlView(period=8, warmup_steps=0),
    ).model_dump_json()


def batch(first_step: int, sent_at: float, seq: int) -> str:
    """A numbered batch, as a worker link sends it (avgctl answers ``stored`` for it)."""
    steps = [
        StepRecord(step=first_step + i, time=sent_at, step_time=0.02, drift=0.1, loss=2.0)
        for i in range(RECORDS_PER_BATCH)
    ]
    return MetricsBatch(steps=steps, seq=seq).model_dump_json()


async def _dashboards(url: str, n: int, duration: float, ready, out) -> None:
    latencies: list[float] = []
    messages = 0
    waiting = n

    async def one() -> None:
        nonlocal messages, waiting
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, max_size=2**26
        ) as ws:
            json.loads(await ws.recv())  # the snapshot: parsed before the clock starts
            waiting -= 1
            if not waiting:
                ready.set()
            end = time.time() + duration
            while time.time() < end:
                try:
                    text = await asyncio.wait_for(ws.recv(), max(0.01, end - time.time()))
                except asyncio.TimeoutError:
                    break
                now = time.time()
                msg = json.loads(text)
                # One sample per rank per message: the oldest record of that rank in it.
                if msg.get("kind") == "metrics_batch":
                    messages += 1
                    latencies.extend(now - item["steps"][0]["time"] for item in msg["items"] if item["steps"])
                elif msg.get("kind") == "metrics":  # servers from before metrics_batch: one per rank
                    messages += 1
                    latencies.extend(now - s["time"] for s in msg["steps"][:1])

    await asyncio.gather(*(one() for _ in range(n)))
    out.put((latencies, messages))


def dashboards_main(url: str, n: int, duration: float, ready, out) -> None:
    asyncio.run(_dashboards(url, n, duration, ready, out))


def start_dashboards(ctx, url: str, n: int, duration: float, out):
    """The dashboards' process, once every one of them has its snapshot."""
    ready = ctx.Event()
    dash = ctx.Process(target=dashboards_main, args=(url, n, duration, ready, out), daemon=True)
    dash.start()
    if not ready.wait(60):
        raise RuntimeError("the dashboards did not get their snapshots within 60 s")
    return dash


async def _read_all(ws) -> None:
    # A link reads what the server says (avgctl's ``stored``); unread, it would pile up here.
    with contextlib.suppress(websockets.ConnectionClosed):
        async for _ in ws:
            pass


async def open_ranks(url: str, ranks: int, headers: dict) -> list:
    t0 = time.perf_counter()
    conns = []
    link = uuid.uuid4().hex  # one sender's id: its batch numbers start again at 0
    for rank in range(ranks):
        ws = await websockets.connect(url, additional_headers=headers, max_size=2**20, compression=None)
        await ws.send(hello(rank, ranks, link))
        ws.reader = asyncio.create_task(_read_all(ws))  # held by its connection, so it is not collected
        conns.append(ws)
    print(f"  opened {ranks} connections in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return conns


async def send_paced(url: str, ranks: int, rate: float, duration: float) -> int:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    conns = await open_ranks(url, ranks, headers)
    sent = 0

    async def run(rank: int, ws) -> None:
        nonlocal sent
        step = 10_000_000
        sent_by_rank = 0
        # Spread the ranks over the interval, as real ranks would be.
        await asyncio.sleep(rank / ranks / rate)
        next_at = time.perf_counter()
        end = next_at + duration
        while next_at < end:
            await ws.send(batch(step, time.time(), sent_by_rank))
            step += RECORDS_PER_BATCH
            sent += 1
            sent_by_rank += 1
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    await asyncio.gather(*(run(r, ws) for r, ws in enumerate(conns)))
    for ws in conns:
        await ws.close()
    return sent


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer at {url}")


@dataclass
class LoadRun:
    ranks: int
    rate: float
    seconds: float
    dashboards: int
    sent_batches: int = 0
    stored_records: int = 0
    server_dropped_batches: int = 0
    latencies: list[float] = field(default_factory=list)
    dashboard_messages: int = 0
    rss: list[int] = field(default_factory=list)
    db_bytes_start: int = 0
    db_bytes_end: int = 0
    elapsed: float = 0.0

    @property
    def sent_records(self) -> int:
        return self.sent_batches * RECORDS_PER_BATCH

    @property
    def lost_records(self) -> int:
        """Records neither stored nor counted as dropped by the server."""
        return self.sent_records - self.stored_records - self.server_dropped_batches * RECORDS_PER_BATCH

    def latency(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[int(q * (len(ordered) - 1))] if ordered else float("nan")

    @property
    def bytes_per_record(self) -> float:
        return (self.db_bytes_end - self.db_bytes_start) / max(1, self.stored_records)

    @property
    def growth_per_hour(self) -> float:
        """At the nominal record rate of this job, with every record kept."""
        return self.bytes_per_record * self.ranks * self.rate * RECORDS_PER_BATCH * 3600


def db_bytes(db: str) -> int:
    return sum(os.path.getsize(p) for p in (db, db + "-wal") if os.path.exists(p))


def stored(db: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM steps WHERE job_id = ?", (JOB,)).fetchone()[0]
    finally:
        conn.close()


def server_dropped(base: str) -> int:
    import urllib.request

    req = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("avgctl_dropped_metric_batches") and not line.startswith("#"):
                return int(float(line.split()[-1]))
    return 0


def start_server(db: str, port: int, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``avgctl serve`` on ``port`` with ``db``, its one token ``TOKEN`` (so the simulated ranks use it
    too), logging warnings only; ``env`` is added to this process's environment."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "avgctl.server.cli",
            "serve",
            "--port",
            str(port),
            "--db",
            db,
            "--control-token",
            TOKEN,
            "--log-level",
            "warning",
        ],
        env={**os.environ, **(env or {})},
    )


def run_load(
    tmp: Path,
    ranks: int = 64,
    rate: float = 10.0,
    seconds: float = 60.0,
    dashboards: int = 20,
    env: dict[str, str] | None = None,
) -> LoadRun:
    run = LoadRun(ranks, rate, seconds, dashboards)
    db = str(tmp / "load.db")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = start_server(db, port, env)
    ctx = mp.get_context("spawn")
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.5):
            run.rss.append(rss_bytes(server.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    try:
        wait_http(base + "/api/health")
        ws_url = f"ws://127.0.0.1:{port}/ws/worker"
        # One batch per rank, so the job exists and dashboards can subscribe; the paced phase below
        # starts at the same steps and overwrites these records (stored once per step).
        asyncio.run(send_paced(ws_url, ranks, 1.0, 0.1))
        out = ctx.Queue()
        dash = start_dashboards(ctx, f"ws://127.0.0.1:{port}/ws/jobs/{JOB}", dashboards, seconds + 4, out)
        run.rss.append(rss_bytes(server.pid))
        sampler.start()
        run.db_bytes_start = db_bytes(db)
        start = time.perf_counter()
        run.sent_batches += asyncio.run(send_paced(ws_url, ranks, rate, seconds))
        # Everything sent is stored, or counted as dropped, once the writer catches up.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run.stored_records = stored(db)
            run.server_dropped_batches = server_dropped(base)
            if run.lost_records <= 0:
                break
            time.sleep(0.1)
        run.elapsed = time.perf_counter() - start
        run.db_bytes_end = db_bytes(db)
        run.latencies, run.dashboard_messages = out.get(timeout=seconds + 60)
        dash.join(10)
    finally:
        sampling.set()
        server.terminate()
        server.wait(30)
    return run
