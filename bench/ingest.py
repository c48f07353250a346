"""Ingest benchmark: 64 simulated ranks -> a real avgctl server -> 10 dashboard clients.

Run: ``.venv/bin/python bench/ingest.py`` (about a minute). Four measurements, same machine, same run:

1. ceiling: the same senders against a bare ``websockets`` receive loop that parses each frame's
   JSON (the least any server does with a frame); then the same loop as a FastAPI route under
   uvicorn (what the ASGI stack alone costs, before avgctl does anything);
2. throughput: the senders as fast as they can against ``avgctl serve``; a batch counts once the
   server has stored it in SQLite, while 10 dashboards listen. Both phases time from the first
   frame sent (connections are open and have said hello) until the server has the last one;
3. latency: 64 ranks x 10 batches/s; each record carries its send time, the dashboards measure
   send-to-receive latency (p50/p99).

The server and the dashboards run in their own processes, so the numbers include real sockets
and the event-loop hops a deployment would have.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import uvicorn
import websockets
from fastapi import FastAPI, WebSocket

from avgctl.server.schemas import AveragerConfig, ControlView, Hello, MetricsBatch, StepRecord

TOKEN = "bench-token"
JOB = "bench"
RECORDS_PER_BATCH = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hello(rank: int, world: int) -> str:
    return Hello(
        job_id=JOB, rank=rank, world_size=world, host="bench", pid=10_000 + rank,
        config=AveragerConfig(kind="periodic", period=8, warmup_steps=0), control=ControlView(period=8, warmup_steps=0),
    ).model_dump_json()


def batch(first_step: int, sent_at: float) -> str:
    steps = [StepRecord(step=first_step + i, time=sent_at, step_time=0.02, drift=0.1, loss=2.0) for i in range(RECORDS_PER_BATCH)]
    return MetricsBatch(steps=steps).model_dump_json()


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


# ------------------------------------------------------------------------------ dashboards


async def _dashboards(url: str, n: int, duration: float, ready, out) -> None:
    latencies: list[float] = []
    messages = 0
    waiting = n

    async def one() -> None:
        nonlocal messages, waiting
        async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {TOKEN}"}, max_size=2**26) as ws:
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


# ------------------------------------------------------------------------------ senders


async def open_ranks(url: str, ranks: int, headers: dict) -> list:
    t0 = time.perf_counter()
    conns = []
    for rank in range(ranks):
        ws = await websockets.connect(url, additional_headers=headers, max_size=2**20, compression=None)
        await ws.send(hello(rank, ranks))
        conns.append(ws)
    print(f"  opened {ranks} connections in {time.perf_counter() - t0:.2f}s", file=sys.stderr)
    return conns


async def send_flat_out(
    url: str, ranks: int, batches: int, headers: dict, bare: bool, first_step: int = 1
) -> tuple[float, float]:
    """Every rank sends ``batches`` frames as fast as it can; returns (``perf_counter`` at the first
    frame, seconds until all were sent, and for ``bare`` read by the server)."""
    conns = await open_ranks(url, ranks, headers)
    frames = [batch(first_step + i * RECORDS_PER_BATCH, time.time()) for i in range(batches)]
    start = time.perf_counter()

    async def run(ws) -> None:
        for text in frames:
            await ws.send(text)
        if bare:
            await (await ws.ping())  # the pong follows every frame we sent

    await asyncio.gather(*(run(ws) for ws in conns))
    elapsed = time.perf_counter() - start
    for ws in conns:
        await ws.close()
    return start, elapsed


async def send_paced(url: str, ranks: int, rate: float, duration: float) -> int:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    conns = await open_ranks(url, ranks, headers)
    sent = 0

    async def run(rank: int, ws) -> None:
        nonlocal sent
        step = 10_000_000
        # Spread the ranks over the interval, as real ranks would be.
        await asyncio.sleep(rank / ranks / rate)
        next_at = time.perf_counter()
        end = next_at + duration
        while next_at < end:
            await ws.send(batch(step, time.time()))
            step += RECORDS_PER_BATCH
            sent += 1
            next_at += 1 / rate
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    await asyncio.gather(*(run(r, ws) for r, ws in enumerate(conns)))
    for ws in conns:
        await ws.close()
    return sent


def stored_steps(db: str) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT COUNT(*) FROM steps WHERE job_id = ?", (JOB,)).fetchone()[0]
    finally:
        conn.close()


def wait_http(url: str, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not answer at {url}")


def median_rate(args, flood) -> float:
    rates = [flood(repeat) for repeat in range(args.repeats)]
    print(f"  rates: {', '.join(f'{r:.0f}' for r in rates)}", file=sys.stderr)
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--dashboards", type=int, default=10)
    parser.add_argument("--batches", type=int, default=150, help="frames per rank in the throughput phases")
    parser.add_argument("--repeats", type=int, default=3, help="floods per throughput figure (the median is shown)")
    parser.add_argument("--rate", type=float, default=10.0, help="batches/s per rank in the latency phase")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the latency phase")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    total = args.ranks * args.batches

    # 1. the ceilings, each the median of --repeats floods
    port = free_port()
    ready = ctx.Event()
    bare = ctx.Process(target=bare_server_main, args=(port, ready), daemon=True)
    bare.start()
    ready.wait(30)
    bare_rate = median_rate(args, lambda _: total / asyncio.run(
        send_flat_out(f"ws://127.0.0.1:{port}", args.ranks, args.batches, {}, bare=True))[1])
    bare.terminate()
    bare.join()

    port = free_port()
    floor = ctx.Process(target=floor_server_main, args=(port,), daemon=True)
    floor.start()
    wait_http(f"http://127.0.0.1:{port}/received")

    def floor_flood(repeat: int) -> float:
        start, _ = asyncio.run(send_flat_out(f"ws://127.0.0.1:{port}/ws", args.ranks, args.batches, {}, bare=False))
        while int(urllib.request.urlopen(f"http://127.0.0.1:{port}/received").read()) < total * (repeat + 1):
            time.sleep(0.01)
        return total / (time.perf_counter() - start)

    floor_rate = median_rate(args, floor_flood)
    floor.terminate()
    floor.join()

    with tempfile.TemporaryDirectory() as tmp:
        db = os.path.join(tmp, "bench.db")
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, "-m", "avgctl.server.cli", "serve", "--port", str(port), "--db", db,
             "--control-token", TOKEN, "--log-level", "warning"],
        )
        try:
            base = f"http://127.0.0.1:{port}"
            wait_http(base + "/api/health")
            ws_url = f"ws://127.0.0.1:{port}/ws/worker"
            headers = {"Authorization": f"Bearer {TOKEN}"}
            # A first hello makes the job exist, so dashboards can subscribe before the flood.
            asyncio.run(send_paced(ws_url, args.ranks, 1.0, 0.1))
            out = ctx.Queue()
            dash_url = f"ws://127.0.0.1:{port}/ws/jobs/{JOB}"

            # 2. throughput with dashboards listening
            dash = start_dashboards(ctx, dash_url, args.dashboards, 600.0, out)

            def ours_flood(repeat: int) -> float:
                before = stored_steps(db)
                first_step = 1 + repeat * args.batches * RECORDS_PER_BATCH  # new rows, not replaced ones
                start, _ = asyncio.run(send_flat_out(ws_url, args.ranks, args.batches, headers, False, first_step))
                target = before + total * RECORDS_PER_BATCH
                while stored_steps(db) < target and time.perf_counter() - start < 60:
                    time.sleep(0.05)
                return (stored_steps(db) - before) / RECORDS_PER_BATCH / (time.perf_counter() - start)

            ours_rate = median_rate(args, ours_flood)
            dash.terminate()
            dash.join()

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
    print(f"bare websockets loop:    {bare_rate:8.0f} batches/s ({total} batches, {args.ranks} connections)")
    print(f"uvicorn + FastAPI floor: {floor_rate:8.0f} batches/s ({floor_rate / bare_rate:.0%} of bare; a route that "
          "only parses each frame)")
    print(f"avgctl ingest + SQLite:  {ours_rate:8.0f} batches/s ({ours_rate / bare_rate:.0%} of bare; "
          f"{args.dashboards} dashboards listening; {RECORDS_PER_BATCH} step records per batch)")
    print(f"paced {args.ranks} ranks x {args.rate:g}/s: {sent / paced_s:6.0f} batches/s sent; dashboards got "
          f"{messages} metrics messages; latency p50 {p50:.1f} ms, p99 {p99:.1f} ms ({len(latencies)} samples)")


if __name__ == "__main__":
    main()
