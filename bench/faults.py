"""Server faults during training: the demo's step time, worker memory, drops and commands.

Run: ``.venv/bin/python bench/faults.py`` (about 3 minutes). Two runs of the same 2-rank demo job:

1. baseline: no server at all;
2. faults: against ``avgctl serve``, which is killed (SIGKILL) and restarted on the same port and
   database, then frozen (SIGSTOP) for ``--freeze`` seconds (default 30) and thawed (SIGCONT).
   A command is posted before each fault and one after the thaw.

It prints each rank's step-time p50/p99 in both runs, the worker's peak RSS growth, the metric
records missing from the store against those the ranks counted as dropped, and how often each
command was applied. ``tests/reliability/test_server_faults.py`` runs a short version.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.support.faults import FaultRun, run_baseline, run_faults, worker_main  # noqa: E402


def report(base: FaultRun | None, faults: FaultRun) -> None:
    for rank, f in enumerate(faults.ranks):
        line = f"rank {rank}: step time p50 {f.p50 * 1e3:.1f} ms, p99 {f.p99 * 1e3:.1f} ms"
        if base is not None and base.ranks:
            b = base.ranks[rank]
            line += f" (no server: p50 {b.p50 * 1e3:.1f} ms, p99 {b.p99 * 1e3:.1f} ms; p99 ratio {f.p99 / b.p99:.3f})"
        line += f"; worker RSS growth {f.rss_growth / 2**20:.1f} MiB (peak {max(f.rss) / 2**20:.0f} MiB)"
        print(line)
    print(f"server frozen {faults.freeze_seconds:.1f} s; killed and restarted once")
    for rank in sorted(faults.missing):
        print(
            f"rank {rank}: {faults.missing[rank]} step records missing from the store, "
            f"{faults.dropped[rank]} counted as dropped by the link"
        )
    print(f"server-side dropped batches: {faults.server_dropped}")
    for c in faults.commands:
        print(
            f"command {c['id']} ({c['type']} {c['command'].get('period')}): {c['status']} at step {c['applied_step']}; "
            f"rank 0's control events with that period at steps {faults.applied[c['id']]}"
        )
    # Commands applied at one exchange share one event (it shows the last one's state).
    print(
        f"control version {faults.control_version} after {len(faults.commands)} commands "
        f"(each applied command adds one: none was applied twice)"
    )


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        return worker_main(sys.argv[2], sys.argv[4:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--freeze", type=float, default=30.0, help="seconds the server stays frozen (default 30)")
    parser.add_argument("--steps", type=int, default=4000, help="steps per rank (default 4000)")
    parser.add_argument("--step-delay", type=float, default=0.02, help="seconds of simulated work per step")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = run_baseline(Path(tmp), args.steps, args.step_delay)
        if base.rc != 0:
            print(f"baseline run failed with {base.rc}", file=sys.stderr)
            return 1
        faults = run_faults(Path(tmp), args.steps, args.step_delay, args.freeze)
        if faults.rc != 0:
            print(f"fault run failed with {faults.rc}", file=sys.stderr)
            return 1
        report(base, faults)
    return 0


if __name__ == "__main__":
    sys.exit(main())
