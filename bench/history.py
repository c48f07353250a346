"""History at any zoom: query time and rollup storage for long runs with many ranks.

Run: ``.venv/bin/python bench/history.py`` (a few minutes; ``--ranks 32 --steps 20000`` for a
quick one). Prints:

1. storage: a job written through the store's own writer process (every step record, one round
   every 8 steps), the rollups' bytes against the records' (SQLite's ``dbstat``), goal <= 20%;
2. the writer process's time per batch with and without the rollups, side by side;
3. a whole-run query of ``--ranks`` ranks x ``--steps`` steps (600 points, every rank) and zoomed
   queries of 5,000 steps at full resolution (one bucket per step) for 8, 32 and every rank, median
   of 5 each, through ``Store.series_json`` (what the route returns, as JSON text); goals < 250 ms
   and < 100 ms.

The big job's rollups are folded by the writer's own code (``rollup.finest``/``write_every_level``) in
one process instead of passing 25 million records through the writer; its records are the last
``--keep`` steps, as retention would keep them. The file is kept under ``--cache`` between runs.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avgctl.protocol import Hello  # noqa: E402
from avgctl.server import store as st  # noqa: E402
from avgctl.server.records import EncodedBatch  # noqa: E402
from avgctl.server.store import history, process, rollup, schema, writes  # noqa: E402
from tests.support.frames import hello  # noqa: E402

JOB = "history-bench"
PERIOD = 8
BATCH_STEPS = 10


def _hello(rank: int, ranks: int) -> Hello:
    return Hello.model_validate_json(hello(job_id=JOB, rank=rank, world_size=ranks))


def _figures(rank: int, step: int, rng: random.Random) -> tuple[float, float, float]:
    """A plausible loss (falling, noisy, each rank its own), drift and step time."""
    loss = 2.0 * math.exp(-step / 30_000) + 0.3 + 0.05 * rank / 256 + 0.02 * rng.random()
    return loss, 0.01 * (step % PERIOD) * (1 + rng.random()), 0.05 + 0.01 * rng.random()


def _batch(rank: int, first: int, rng: random.Random, size: int = BATCH_STEPS) -> EncodedBatch:
    """A batch as ``records.encode`` makes it (the texts as msgspec writes them)."""
    steps, values, rounds, round_values = [], [], [], []
    for step in range(first, first + size):
        loss, drift, seconds = _figures(rank, step, rng)
        text = f'{{"step":{step},"time":{1e9 + step},"step_time":{seconds!r},"drift":{drift!r},"loss":{loss!r},"scalars":{{}}}}'
        steps.append((step, text))
        values.append((loss, drift, seconds, None))
        if step % PERIOD == 0:
            d = 0.1 * rng.random()
            rounds.append((step, 1, _round_text(step, d)))
            round_values.append((d, d / 10))
    return EncodedBatch(steps, rounds, [], 0, first + size - 1, None, values, round_values)


def _round_text(step: int, d: float) -> str:
    return (
        f'{{"step":{step},"group_size":256,"divergence":{d!r},"relative_divergence":{d / 10!r},"divergence_mean":{d!r},'
        f'"divergence_max":{d!r},"relative_mean":{d / 10!r},"relative_max":{d / 10!r},"seconds":0.01,"bytes":1000000,'
        '"exact":false,"top_layers":[["layer.0.weight",0.5],["layer.1.weight",0.3]],"layers_total":12}'
    )


def storage(path: str, ranks: int, steps: int) -> tuple[int, int, float]:
    """Write a job through the store's writer; returns (record bytes, rollup bytes, seconds)."""
    store = st.Store(path)
    store.start()
    started = time.perf_counter()
    try:
        for rank in range(ranks):
            store.submit(lambda c, r=rank: st.hello(c, _hello(r, ranks), time.time())).result()
        rng = random.Random(0)
        for first in range(0, steps, BATCH_STEPS):
            for rank in range(ranks):
                while not store.add_metrics(JOB, rank, _batch(rank, first, rng)):
                    store.submit(lambda c: None).result()  # the queue is full: let it drain
        store.submit(lambda c: None).result()
    finally:
        store.close()
    seconds = time.perf_counter() - started
    with sqlite3.connect(path) as conn:
        sizes = dict(conn.execute("SELECT name, SUM(pgsize) FROM dbstat GROUP BY name"))
    records = sizes.get("steps", 0) + sizes.get("rounds", 0)
    rollups = sizes.get("rollups", 0) + sizes.get("series", 0) + sizes.get("sqlite_autoindex_series_1", 0)
    return records, rollups, seconds


def writer_cost(tmp: str, commits: int = 60) -> tuple[float, float]:
    """The writer process's time per batch (``metric_rows`` + ``write_rows`` in one transaction)
    for commits of 256 batches (64 ranks x 4, 5 steps each, as an ingest flood groups them), with
    the rollups as the writer process writes them in a flood (the coarser levels held back,
    ``rollup.Held``, and brought up to date once a second and at the end: counted) and without them
    (``rollup.finest``/``rollup.write`` stubbed out), interleaved; the whole run's time over its batches."""
    fold, write = rollup.finest, rollup.write
    times: dict[bool, list[float]] = {True: [], False: []}
    conns = {}
    for with_rollups in (True, False):
        conns[with_rollups] = process.connect_writer(os.path.join(tmp, f"w{with_rollups}.db"))
        schema.migrate(conns[with_rollups])
    rng = random.Random(0)
    held = rollup.Held()
    try:
        for commit in range(commits):
            for with_rollups in (True, False):
                entries = [
                    writes.metric_entry(JOB, rank, _batch(rank, (commit * 4 + k) * BATCH_STEPS, rng, 5), 0.0)
                    for k in range(4)
                    for rank in range(64)
                ]
                if not with_rollups:
                    rollup.finest, rollup.write = (lambda *a: {}), (lambda *a: None)
                conn = conns[with_rollups]
                started = time.perf_counter()
                conn.execute("BEGIN")
                process.write_rows(conn, process.metric_rows(entries), held if with_rollups else None, flush=False)
                conn.execute("COMMIT")
                times[with_rollups].append(time.perf_counter() - started)
                if with_rollups:
                    held.committed()
                rollup.finest, rollup.write = fold, write
        started = time.perf_counter()
        conns[True].execute("BEGIN")
        process.write_rows(conns[True], process.metric_rows([]), held, flush=True)
        conns[True].execute("COMMIT")
        times[True].append(time.perf_counter() - started)
    finally:
        rollup.finest, rollup.write = fold, write
        for conn in conns.values():
            conn.close()
    batches = commits * 256
    return sum(times[True]) / batches, sum(times[False]) / batches


def build(final_path: str, ranks: int, steps: int, keep: int) -> None:
    """A job of ``ranks`` x ``steps`` at ``final_path``: rollups for every step, records for the
    last ``keep``. Built under a name of this process's own and renamed when complete, so two
    builders at once cost time, never a file."""
    path = f"{final_path}.{os.getpid()}.part"
    store = st.Store(path)
    store.start()  # the schema, the job and its ranks
    try:
        for rank in range(ranks):
            store.submit(lambda c, r=rank: st.hello(c, _hello(r, ranks), time.time())).result()
    finally:
        store.close()
    conn = process.connect_writer(path)
    rng = random.Random(0)
    chunk = 1 << 12  # steps per transaction, a multiple of the coarsest bucket's divisors
    started = time.perf_counter()
    for first in range(0, steps, chunk):
        last = min(first + chunk, steps)
        added, rounds, records = [], [], []
        for rank in range(ranks):
            for step in range(first, last):
                loss, drift, seconds = _figures(rank, step, rng)
                added.append((JOB, rank, step, (loss, drift, seconds, None)))
                if step >= steps - keep:
                    records += (JOB, rank, step, f'{{"step":{step},"time":0.0,"loss":{loss!r},"drift":{drift!r}}}')
            for step in range(first + (-first % PERIOD), last, PERIOD):
                d = 0.1 * rng.random()
                rounds.append((JOB, rank, step, (d, d / 10)))
        conn.execute("BEGIN")
        rollup.write_every_level(conn, rollup.finest(added, rounds), process._in_chunks)
        process._insert_rows(conn, "steps", ("job_id", "rank", "step", "body"), records)
        conn.execute("UPDATE jobs SET step = ? WHERE id = ?", (last - 1, JOB))
        conn.execute("UPDATE ranks SET step = ? WHERE job_id = ?", (last - 1, JOB))
        conn.execute("COMMIT")
        done = last / steps
        elapsed = time.perf_counter() - started
        print(f"\r  building: {done:6.1%}, {elapsed:.0f} s", end="", flush=True)
    print()
    # Everything into the main file before it is renamed (a WAL left beside the old name is lost).
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.close()
    os.replace(path, final_path)


def timed(store: st.Store, query: history.SeriesQuery, repeats: int = 5) -> tuple[float, int, int]:
    """Median seconds of ``repeats`` answers, and the last one's bucket size and JSON bytes."""
    times, text = [], ""
    for _ in range(repeats):
        started = time.perf_counter()
        text = store.series_json(JOB, query)
        times.append(time.perf_counter() - started)
    bucket = int(text.split('"bucket_steps":', 1)[1].split(",", 1)[0])
    return statistics.median(times), bucket, len(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--keep", type=int, default=20_000, help="steps of records kept (retention's default)")
    parser.add_argument("--storage-ranks", type=int, default=8)
    parser.add_argument("--storage-steps", type=int, default=20_000)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "avgctl-history-bench"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        records, rollups, seconds = storage(os.path.join(tmp, "s.db"), args.storage_ranks, args.storage_steps)
        with_rollups, without = writer_cost(tmp)
    n = args.storage_ranks * args.storage_steps
    print(
        f"storage, {args.storage_ranks} ranks x {args.storage_steps} steps through the writer ({n / seconds:,.0f} "
        f"records/s): records {records / 2**20:.1f} MiB, rollups {rollups / 2**20:.2f} MiB = "
        f"{rollups / records:.1%} of the records (goal <= 20%)"
    )
    print(
        f"writer process, per 5-step batch in commits of 256: {with_rollups * 1e6:.1f} us with rollups, "
        f"{without * 1e6:.1f} us without ({with_rollups / without:.2f}x), interleaved commits, the held rollups written"
    )

    os.makedirs(args.cache, exist_ok=True)
    path = os.path.join(args.cache, f"r{args.ranks}-s{args.steps}-k{args.keep}-v{len(rollup.LEVELS)}.db")
    if not os.path.exists(path):
        print(f"building {path} ({args.ranks} ranks x {args.steps} steps)")
        build(path, args.ranks, args.steps, args.keep)
    store = st.Store(path)
    store.start()
    try:
        whole, bucket, size = timed(store, history.SeriesQuery("loss"))
        print(
            f"whole run, {args.ranks} ranks x {args.steps} steps, 600 points: {whole * 1e3:.0f} ms "
            f"(buckets of {bucket} steps, {size / 2**20:.1f} MiB of JSON; goal < 250 ms)"
        )
        last = args.steps - 1
        for count in (8, 32, args.ranks):  # points=5000: one bucket per step, where records allow
            ranks = list(range(min(count, args.ranks)))
            zoom = history.SeriesQuery("loss", from_step=last - 4999, to_step=last, points=5000, ranks=ranks)
            zoomed, bucket, size = timed(store, zoom)
            served = (
                "full resolution" if bucket == 1 else f"buckets of {bucket} steps: past {history.RAW_RECORDS:,} records"
            )
            print(
                f"zoomed, 5,000 steps, points=5000, {len(ranks)} ranks: {zoomed * 1e3:.0f} ms ({served}; "
                f"{size / 2**20:.1f} MiB of JSON; goal < 100 ms)"
            )
        band = history.SeriesQuery("loss", from_step=last - 4999, to_step=last, points=600)
        banded, bucket, size = timed(store, band)
        print(f"zoomed, 5,000 steps, 600 points, {args.ranks} ranks: {banded * 1e3:.0f} ms (buckets of {bucket} steps)")
        rounds, bucket, size = timed(store, history.SeriesQuery("divergence"))
        print(f"whole run of rounds (divergence), 600 points: {rounds * 1e3:.0f} ms (buckets of {bucket} steps)")
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
