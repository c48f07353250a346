"""64 simulated ranks at 10 batches/s and 20 dashboards for 5 s (short version of bench/load.py):
the server's memory stays bounded, nothing is lost beyond counted drops, latency is measured."""

from __future__ import annotations

import pytest

from tests.support.load import run_load

pytestmark = pytest.mark.dist


def test_load_64_ranks_20_dashboards(tmp_path):
    run = run_load(tmp_path, ranks=64, rate=10.0, seconds=5.0, dashboards=20)
    assert run.sent_batches >= 64 * 10 * 4  # the senders kept (roughly) their pace
    assert run.lost_records <= 0, (run.sent_records, run.stored_records, run.server_dropped_batches)
    assert max(run.rss) - run.rss[0] < 200 * 2**20, [r >> 20 for r in run.rss]
    assert run.latencies and run.latency(0.99) < 5.0  # reported by the bench; here only: they arrive
