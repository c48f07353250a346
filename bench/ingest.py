"""Ingest benchmark: 64 simulated ranks -> a real avgctl server -> 10 dashboard clients.

Run: ``.venv/bin/python bench/ingest.py`` (about a minute). Same machine, same run:

1. throughput: the same senders flood, in turn, a bare ``websockets`` receive loop that parses each
   frame's JSON (the least any server does with a frame; the ceiling), the same loop as a FastAPI
   route under uvicorn (what the ASGI stack alone costs), and ``avgctl serve`` with 10 dashboards
   listening, where a batch counts once it is stored in SQLite. ``--repeats`` rounds of one flood
   each; every ratio is taken within a round, since this machine's speed drifts by 2x between
   minutes. Each rank's connection stays open across the floods (a job's does: this is the
   sustained rate); a flood is timed from its first frame until the server has the last one.
   Per-process CPU per batch shows where the time went, and the ranks' arrival stamps say when
   avgctl's event loop took a flood's last frame, which tells the loop's rate from the writer's;
2. latency: 64 ranks x 10 batches/s; each record carries its send time, the dashboards measure
   send-to-receive latency (p50/p99).

The servers and the dashboards run in their own processes, so the numbers include real sockets
and the event-loop hops a deployment would have.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import multiprocessing as mp
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
import websockets
from fastapi import FastAPI, WebSocket

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.load import (  # noqa: E402
    JOB,
    RECORDS_PER_BATCH,
    TOKEN,
    batch,
    free_port,
    open_ranks,
    send_paced,
    start_dashboards,
    start_server,
    wait_http,
)

# ------------------------------------------------------------------------------ bare ceiling


async def _bare_server(port: int, ready) -> None:
    async def handler(ws):
        async for text in ws:
            json.loads(text)

    async with websockets.serve(handler, "127.0.0.1", port, max_size=2**20, compression=None):
        ready.set()
        await asyncio.Future()


def bare_server_main(port: int, ready) -> None:
    asyncio.run(_bare_server(port, ready))


# ------------------------------------------------------------------------------ uvicorn floor


def floor_server_main(port: int) -> None:
    """uvicorn serving a FastAPI websocket route that only parses each frame's JSON: what any
    FastAPI server pays per frame here before doing anything with it."""
    app = FastAPI()
    received = 0

    @app.get("/received")
    def count() -> int:
        return received

    @app.websocket("/ws")
    async def ingest(ws: WebSocket) -> None:
        nonlocal received
        await ws.accept()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            json.loads(message["text"])
            received += 1

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", ws_per_message_deflate=False)


# ------------------------------------------------------------------------------ floods
# (the ranks, the paced sender and the dashboards are tests/support/load.py's, shared with bench/load.py)


@dataclass
class Target:
    """A server the senders flood: its ranks' connections stay open across the floods, as a
    training job's do, so what is measured is the sustained rate, not connection set-up (a hello
    costs the server a registration and a job update once per rank, not per batch)."""

    name: str
    url: str
    meter: CpuMeter
    arrived: Callable[[int], Awaitable[int]] | None
    """Returns once flood ``repeat`` is all in, with how many batches arrived; None (the bare
    loop): every rank's ping is answered, which its server does after reading every frame before it."""
    headers: dict = field(default_factory=dict)
    registered: Callable[[], Awaitable[None]] | None = None
    """Returns once the server has taken every rank's hello."""
    conns: list = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    started: list[float] = field(default_factory=list)
    """Each flood's first frame, in ``time.time()`` (what the server stamps a batch with on arrival)."""

    async def open(self, ranks: int) -> None:
        self.conns = await open_ranks(self.url, ranks, self.headers)
        if self.registered is not None:
            await self.registered()

    async def flood(self, args, repeat: int) -> None:
        """Every rank sends ``args.batches`` frames as fast as it can; timed from the first frame
        until the server has them all."""
        first_step = 1 + repeat * args.batches * RECORDS_PER_BATCH  # new rows, not replaced ones
        frames = [
            batch(first_step + i * RECORDS_PER_BATCH, time.time(), repeat * args.batches + i)
            for i in range(args.batches)
        ]

        async def run(ws) -> None:
            for text in frames:
                await ws.send(text)
            if self.arrived is None:
                await (await ws.ping())

        with self.meter:
            self.started.append(time.time())
            start = time.perf_counter()
            await asyncio.gather(*(run(ws) for ws in self.conns))
            count = len(self.conns) * args.batches if self.arrived is None else await self.arrived(repeat)
            self.rates.append(count / (time.perf_counter() - start))

    async def close(self) -> None:
        for ws in self.conns:
            await ws.close()


async def compare(targets: list[Target], args) -> None:
    """``args.repeats`` rounds of one flood per target, in turn: each ratio is taken between
    floods seconds apart, so a machine whose speed drifts (shared cores, clock changes) skews
    every target alike."""
    try:
        for target in targets:
            await target.open(args.ranks)
        for repeat in range(args.repeats):
            for target in targets:
                await target.flood(args, repeat)
    finally:
        for target in targets:
            await target.close()
    for target in targets:
        print(f"  {target.name} rates: {', '.join(f'{r:.0f}' for r in target.rates)}", file=sys.stderr)


def ratios(target: Target, ceiling: Target) -> list[float]:
    return sorted(a / b for a, b in zip(target.rates, ceiling.rates))


async def poll(read: Callable[[], int], target: int, timeout: float = 60.0) -> int:
    """Poll ``read()`` (blocking, so run in a thread) until it reaches ``target`` or ``timeout``
    seconds pass; returns its last value."""
    deadline = time.perf_counter() + timeout
    value = await asyncio.to_thread(read)
    while value < target and time.perf_counter() < deadline:
        await asyncio.sleep(0.01)
        value = await asyncio.to_thread(read)
    return value


def read_one(db: str, sql: str):
    """The one value ``sql`` (with the job id for its ``?``) reads, from a read-only connection."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(sql, (JOB,)).fetchone()[0]
    finally:
        conn.close()


def stored_steps(db: str) -> int:
    return read_one(db, "SELECT COUNT(*) FROM steps WHERE job_id = ?")


def steps_between(db: str, first: int, last: int) -> int:
    return read_one(db, f"SELECT COUNT(*) FROM steps WHERE job_id = ? AND step BETWEEN {int(first)} AND {int(last)}")


def connected_ranks(db: str) -> int:
    return read_one(db, "SELECT COUNT(*) FROM ranks WHERE job_id = ? AND connected = 1")


def last_taken(db: str) -> float:
    """When the event loop took the newest batch (a rank's ``last_seen`` is its batch's arrival)."""
    return read_one(db, "SELECT MAX(last_seen) FROM ranks WHERE job_id = ?")


def ranks_at(db: str, step: int) -> int:
    """Ranks whose stored step has reached ``step``: a rank's batches are written in order, so by
    then all of its batches are in (a read of 64 rows; counting the steps table would scan it)."""
    return read_one(db, f"SELECT COUNT(*) FROM ranks WHERE job_id = ? AND step >= {int(step)}")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # the fields after the command name


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):  # gone since listdir
                if int(_stat(int(entry))[1]) == pid:
                    found.append(int(entry))
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux ``/proc``)."""
    fields = _stat(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds(pid: int) -> float:
    """The same for a process's live children (avgctl's SQLite writer process)."""
    return sum(cpu_seconds(child) for child in _children(pid))


class CpuMeter:
    """CPU seconds per process over the floods, to say where a flood's time went."""

    def __init__(self, pids: dict[str, int], children: dict[str, int] | None = None):
        self.clocks = {name: functools.partial(cpu_seconds, pid) for name, pid in pids.items()}
        for name, pid in (children or {}).items():
            self.clocks[name] = functools.partial(children_cpu_seconds, pid)
        self.used = dict.fromkeys(self.clocks, 0.0)
        self._start: dict[str, float] = {}

    def __enter__(self) -> CpuMeter:
        self._start = {name: clock() for name, clock in self.clocks.items()}
        return self

    def __exit__(self, *exc) -> None:
        for name, clock in self.clocks.items():
            self.used[name] += clock() - self._start[name]

    def per_batch(self, batches: int) -> str:
        return ", ".join(f"{name} {self.used[name] / batches * 1e6:.0f} us" for name in self.clocks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--dashboards", type=int, default=10)
    parser.add_argument("--batches", type=int, default=150, help="frames per rank in the throughput phases")
    parser.add_argument("--repeats", type=int, default=5, help="rounds of floods (medians are shown)")
    parser.add_argument("--rate", type=float, default=10.0, help="batches/s per rank in the latency phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency phase")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    total = args.ranks * args.batches

    # 1. throughput: the bare loop, the uvicorn floor and avgctl (dashboards listening), flooded in turn
    bare_port = free_port()
    ready = ctx.Event()
    bare = ctx.Process(target=bare_server_main, args=(bare_port, ready), daemon=True)
    bare.start()
    floor_port = free_port()
    floor = ctx.Process(target=floor_server_main, args=(floor_port,), daemon=True)
    floor.start()
    ready.wait(30)
    wait_http(f"http://127.0.0.1:{floor_port}/received")

    def floor_received() -> int:
        return int(urllib.request.urlopen(f"http://127.0.0.1:{floor_port}/received").read())

    async def floor_arrived(repeat: int) -> int:
        return await poll(floor_received, total * (repeat + 1)) - total * repeat

    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "bench.db")
        port = free_port()
        server = start_server(db, port)
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/api/health")
            ws_url = f"ws://127.0.0.1:{port}/ws/worker"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            # A first hello makes the job exist, so dashboards can subscribe before the flood.
            asyncio.run(send_paced(ws_url, args.ranks, 1.0, 0.1))
            out = ctx.Queue()
            dash_url = f"ws://127.0.0.1:{port}/ws/jobs/{JOB}"
            dash = start_dashboards(ctx, dash_url, args.dashboards, 600.0, out)
            initial = stored_steps(db)

            async def registered() -> None:
                if await poll(lambda: connected_ranks(db), args.ranks) < args.ranks:
                    raise RuntimeError("the server did not register every rank's hello within 60 s")

            async def stored(repeat: int) -> int:  # a batch counts once it is in SQLite
                last = (repeat + 1) * args.batches * RECORDS_PER_BATCH
                if await poll(lambda: ranks_at(db, last), args.ranks) < args.ranks:
                    raise RuntimeError("the server did not store every batch within 60 s")
                taken.append(last_taken(db))
                return total

            taken: list[float] = []  # when each flood's last batch reached avgctl's event loop

            senders = os.getpid()
            bare_t = Target(
                "bare", f"ws://127.0.0.1:{bare_port}", CpuMeter({"server": bare.pid, "senders": senders}), None
            )
            floor_t = Target(
                "floor",
                f"ws://127.0.0.1:{floor_port}/ws",
                CpuMeter({"server": floor.pid, "senders": senders}),
                floor_arrived,
            )
            ours_t = Target(
                "avgctl",
                ws_url,
                CpuMeter(
                    {"server": server.pid, "dashboards": dash.pid, "senders": senders},
                    {"its SQLite writer process": server.pid},
                ),
                stored,
                headers,
                registered,
            )
            asyncio.run(compare([bare_t, floor_t, ours_t], args))
            missing = initial + total * args.repeats * RECORDS_PER_BATCH - stored_steps(db)
            if missing:  # the server's bounded queue shed them under the flood: count only what is stored
                per_round = args.batches * RECORDS_PER_BATCH
                for repeat in range(args.repeats):
                    kept = steps_between(db, 1 + repeat * per_round, (repeat + 1) * per_round) / (
                        total * RECORDS_PER_BATCH
                    )
                    ours_t.rates[repeat] *= kept
                print(
                    f"  note: {missing} step records were dropped; avgctl's rates count only what was stored",
                    file=sys.stderr,
                )
            dash.terminate()
            dash.join()
            for proc in (bare, floor):
                proc.terminate()
                proc.join()

            # 3. latency at a realistic rate
            dash = start_dashboards(ctx, dash_url, args.dashboards, args.seconds + 4, out)
            start = time.perf_counter()
            sent = asyncio.run(send_paced(ws_url, args.ranks, args.rate, args.seconds))
            paced_s = time.perf_counter() - start
            dash.join(args.seconds + 30)
            latencies, messages = out.get(timeout=10)
        finally:
            server.terminate()
            server.wait(30)

    latencies.sort()
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1000 if latencies else float("nan")
    flooded = total * args.repeats
    ours, floor_r = ratios(ours_t, bare_t), ratios(floor_t, bare_t)
    print(
        f"{args.repeats} rounds of floods, {total} batches each ({args.ranks} connections x {args.batches}); medians:"
    )
    print(f"bare websockets loop:    {statistics.median(bare_t.rates):8.0f} batches/s")
    print(
        f"uvicorn + FastAPI floor: {statistics.median(floor_t.rates):8.0f} batches/s "
        f"({statistics.median(floor_r):.0%} of bare, {floor_r[0]:.0%}-{floor_r[-1]:.0%} by round; a route that only parses each frame)"
    )
    print(
        f"avgctl ingest + SQLite:  {statistics.median(ours_t.rates):8.0f} batches/s "
        f"({statistics.median(ours):.0%} of bare, {ours[0]:.0%}-{ours[-1]:.0%} by round; "
        f"{args.dashboards} dashboards listening; {RECORDS_PER_BATCH} step records per batch)"
    )
    took = sorted(total / (end - start) / bare for end, start, bare in zip(taken, ours_t.started, bare_t.rates))
    print(
        f"  of which its event loop took the frames at {statistics.median(took):.0%} of bare "
        f"({took[0]:.0%}-{took[-1]:.0%} by round); the rest of the time the SQLite writer caught up"
    )
    print(
        f"CPU per batch in the floods (processes share the cores): bare: {bare_t.meter.per_batch(flooded)}; "
        f"floor: {floor_t.meter.per_batch(flooded)}; avgctl: {ours_t.meter.per_batch(flooded)}"
    )
    print(
        f"paced {args.ranks} ranks x {args.rate:g}/s: {sent / paced_s:6.0f} batches/s sent; dashboards got "
        f"{messages} metrics messages; latency p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(latencies)} samples)"
    )


if __name__ == "__main__":
    main()
