"""Load: 64 simulated ranks at 10 batches/s and 20 dashboards against ``avgctl serve`` for 60 s.

Run: ``.venv/bin/python bench/load.py`` (about 80 s). Prints the server's memory (RSS at start,
peak, end), records sent against stored plus counted drops, the dashboards' send-to-receive
latency (p50/p99), and the SQLite file's growth: bytes per stored record, growth per hour of such
a job without retention, and the bound the default retention keeps it under.
``tests/reliability/test_load.py`` runs a 5-s version.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.ingest import JOB, RECORDS_PER_BATCH, TOKEN, free_port, send_paced, start_dashboards, wait_http  # noqa: E402
from bench.faults import rss_bytes  # noqa: E402
from avgctl.server.settings import Settings  # noqa: E402


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


def run_load(tmp: Path, ranks: int = 64, rate: float = 10.0, seconds: float = 60.0, dashboards: int = 20,
             env: dict[str, str] | None = None) -> LoadRun:
    run = LoadRun(ranks, rate, seconds, dashboards)
    db = str(tmp / "load.db")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "avgctl.server.cli", "serve", "--port", str(port), "--db", db,
         "--control-token", TOKEN, "--log-level", "warning"],
        env={**os.environ, **(env or {})},
    )
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


def report(run: LoadRun) -> None:
    mib = 2**20
    defaults = Settings(_env_file=None)
    bound = run.ranks * (defaults.retention_steps + defaults.history_records) * run.bytes_per_record
    print(f"{run.ranks} ranks x {run.rate:g} batches/s ({RECORDS_PER_BATCH} steps each), {run.dashboards} dashboards, {run.seconds:g} s")
    print(f"server RSS: start {run.rss[0] / mib:.0f} MiB, peak {max(run.rss) / mib:.0f} MiB, end {run.rss[-1] / mib:.0f} MiB")
    print(f"records: sent {run.sent_records}, stored {run.stored_records}, counted dropped "
          f"{run.server_dropped_batches * RECORDS_PER_BATCH}, lost {max(0, run.lost_records)}")
    print(f"dashboards: {run.dashboard_messages} metrics messages; latency p50 {run.latency(0.5) * 1e3:.1f} ms, "
          f"p99 {run.latency(0.99) * 1e3:.1f} ms ({len(run.latencies)} samples)")
    print(f"SQLite: {run.bytes_per_record:.0f} bytes per stored step record; {run.growth_per_hour / 2**30:.2f} GiB per hour "
          f"of this job without retention; the default retention ({defaults.retention_steps} steps full, "
          f"{defaults.history_records} thinned, per rank) bounds it near {bound / 2**30:.2f} GiB "
          f"(step records; round records add about 1/period of that)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=64)
    parser.add_argument("--rate", type=float, default=10.0, help="batches/s per rank")
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--dashboards", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = run_load(Path(tmp), args.ranks, args.rate, args.seconds, args.dashboards)
    report(run)
    return 0 if run.lost_records <= 0 else 1


if __name__ == "__main__":
    sys.exit(main())
