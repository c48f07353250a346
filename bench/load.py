"""Load: 64 simulated ranks at 10 batches/s and 20 dashboards against ``avgctl serve`` for 60 s.

Run: ``.venv/bin/python bench/load.py`` (about 80 s). Prints the server's memory (RSS at start,
peak, end), records sent against stored plus counted drops, the dashboards' send-to-receive
latency (p50/p99), and the SQLite file's growth: bytes per stored record, growth per hour of such
a job without retention, and the bound the default retention keeps it under.
``tests/reliability/test_load.py`` runs a 5-s version.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from avgctl.server.settings import Settings  # noqa: E402
from tests.support.load import RECORDS_PER_BATCH, LoadRun, run_load  # noqa: E402


def report(run: LoadRun) -> None:
    mib = 2**20
    defaults = Settings(_env_file=None)
    bound = run.ranks * (defaults.retention_steps + defaults.history_records) * run.bytes_per_record
    print(
        f"{run.ranks} ranks x {run.rate:g} batches/s ({RECORDS_PER_BATCH} steps each), {run.dashboards} dashboards, {run.seconds:g} s"
    )
    print(
        f"server RSS: start {run.rss[0] / mib:.0f} MiB, peak {max(run.rss) / mib:.0f} MiB, end {run.rss[-1] / mib:.0f} MiB"
    )
    print(
        f"records: sent {run.sent_records}, stored {run.stored_records}, counted dropped "
        f"{run.server_dropped_batches * RECORDS_PER_BATCH}, lost {max(0, run.lost_records)}"
    )
    print(
        f"dashboards: {run.dashboard_messages} metrics messages; latency p50 {run.latency(0.5) * 1e3:.1f} ms, "
        f"p99 {run.latency(0.99) * 1e3:.1f} ms ({len(run.latencies)} samples)"
    )
    print(
        f"SQLite: {run.bytes_per_record:.0f} bytes per stored step record; {run.growth_per_hour / 2**30:.2f} GiB per hour "
        f"of this job without retention; the default retention ({defaults.retention_steps} steps full, "
        f"{defaults.history_records} thinned, per rank) bounds it near {bound / 2**30:.2f} GiB "
        f"(step records; round records add about 1/period of that)"
    )


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
