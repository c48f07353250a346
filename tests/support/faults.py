"""Server faults under a training job: the 2-rank demo, measured, against ``avgctl serve`` killed
(SIGKILL) and restarted on the same port and database, then frozen (SIGSTOP) and thawed.

``run_faults`` is what ``tests/reliability/test_server_faults.py`` (a short run) and
``bench/faults.py`` (the full one, against ``run_baseline``'s run without a server) share. The
ranks run under ``torchrun`` this very module (``--worker OUT -- DEMO_ARGS``): the demo with a
recorder of step times and RSS on its averager, each rank writing ``OUT/rank<r>.json``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.processes import WORKER, ServerProcess, rss_bytes, stop_tree, wait_for

ROOT = Path(__file__).resolve().parents[2]


# ------------------------------------------------------------------------------ the worker side


class _Recorder:
    """An averager listener keeping every step time and, every 50 steps, this process's RSS."""

    def __init__(self) -> None:
        self.step_times: list[float] = []
        self.rss: list[int] = []

    def on_step(self, record) -> None:
        if record.step_time is not None:
            self.step_times.append(record.step_time)
        if record.step % 50 == 0:
            self.rss.append(rss_bytes(os.getpid()))

    def on_round(self, record) -> None:
        pass

    def on_control(self, event) -> None:
        pass


def worker_main(out_dir: str, demo_argv: list[str]) -> int:
    """Under torchrun: the demo with a recorder on its averager; writes ``rank<r>.json`` at the end."""
    from avgctl.worker import demo

    recorder = _Recorder()
    make = demo.make_averager

    def make_recorded(cfg, world, model=None):
        averager = make(cfg, world, model)
        averager.add_listener(recorder)
        return averager

    demo.make_averager = make_recorded
    code = demo.main(demo_argv)
    rank = int(os.environ.get("RANK", "0"))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"step_times": recorder.step_times, "rss": recorder.rss}))
    return code


# ------------------------------------------------------------------------------ the driver side


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1)))] if ordered else float("nan")


@dataclass
class RankFigures:
    step_times: list[float]
    rss: list[int]

    @property
    def p50(self) -> float:
        return percentile(self.step_times, 0.50)

    @property
    def p99(self) -> float:
        return percentile(self.step_times, 0.99)

    @property
    def rss_growth(self) -> int:
        # From the first sample after warm-up (imports, first steps) to the peak.
        return max(self.rss) - self.rss[min(2, len(self.rss) - 1)] if self.rss else 0


@dataclass
class FaultRun:
    ranks: list[RankFigures]
    rc: int
    missing: dict[int, int] = field(default_factory=dict)  # metric step records not in the store
    dropped: dict[int, int] = field(default_factory=dict)  # what each rank's link counted as dropped
    server_dropped: int = 0  # batches the server refused (writer behind)
    applied: dict[int, list[int]] = field(
        default_factory=dict
    )  # command id -> steps of rank 0's events with its period
    events_at: dict[int, int] = field(default_factory=dict)  # applied step -> rank 0's control events there
    control_version: int = 0  # one per applied command: a command applied twice would add two
    commands: list[dict] = field(default_factory=list)
    freeze_seconds: float = 0.0


def start_workers(
    out: Path, steps: int, step_delay: float, server: str | None, job: str, log: Path
) -> subprocess.Popen:
    demo_args = ["--steps", str(steps), "--period", "4", "--step-delay", str(step_delay), "--quiet"]
    if server:
        demo_args += ["--server", server, "--job-id", job]
    env = {**os.environ, "AVGCTL_TOKEN": WORKER, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("AVGCTL_SERVER", None)
    with open(log, "w") as log_file:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "-m",
                "tests.support.faults",
                "--worker",
                str(out),
                "--",
                *demo_args,
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def _stop(proc: subprocess.Popen) -> None:
    stop_tree(proc)


def _figures(out: Path) -> list[RankFigures]:
    return [RankFigures(**json.loads((out / f"rank{r}.json").read_text())) for r in (0, 1)]


def run_baseline(tmp: Path, steps: int, step_delay: float, timeout: float = 300) -> FaultRun:
    out = tmp / "baseline"
    out.mkdir()
    proc = start_workers(out, steps, step_delay, None, "baseline", tmp / "baseline.log")
    try:
        rc = proc.wait(timeout)
    finally:
        _stop(proc)
    return FaultRun(_figures(out) if rc == 0 else [], rc)


def _connected(api, job: str) -> bool:
    data = api.try_get(f"/api/jobs/{job}")
    return bool(data) and sum(r["connected"] for r in data["ranks"]) == 2


def run_faults(tmp: Path, steps: int, step_delay: float, freeze: float, timeout: float = 300) -> FaultRun:
    """The job against a server that is killed and restarted, then frozen for ``freeze`` seconds."""
    out = tmp / "faults"
    out.mkdir()
    server = ServerProcess(tmp / "faults.db").start()
    api, job = server.api, "faults"
    proc = start_workers(out, steps, step_delay, server.base, job, tmp / "faults.log")
    commands = []
    try:
        wait_for(lambda: _connected(api, job), 60, what="both ranks connected")
        wait_for(lambda: api.get(f"/api/jobs/{job}")["step"] > 100, 60, what="100 steps")
        # 1. kill and restart, with a command pending across it
        commands.append(api.command(job, {"type": "set_period", "period": 5}))
        server.kill()
        server.start()
        wait_for(lambda: _connected(api, job), 60, what="ranks back after the restart")
        # 2. freeze, with a command posted just before
        commands.append(api.command(job, {"type": "set_period", "period": 6}))
        os.killpg(server.proc.pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            # The ranks keep training meanwhile; the freeze ends on time whatever they do.
            proc.wait(freeze)
        except subprocess.TimeoutExpired:
            pass
        finally:
            os.killpg(server.proc.pid, signal.SIGCONT)
        freeze_seconds = time.monotonic() - frozen_at
        assert proc.poll() is None, "the job ended during the freeze: give it more --steps"
        commands.append(api.command(job, {"type": "set_period", "period": 7}))
        rc = proc.wait(timeout)
        # The links flush on close; give the server's writer a moment to store the last batches.
        wait_for(lambda: api.get(f"/api/jobs/{job}")["status"] != "running", 30, what="job no longer running")
        done = [api.wait_done(job, c, timeout=30) for c in commands]
        run = FaultRun(_figures(out) if rc == 0 else [], rc, commands=done, freeze_seconds=freeze_seconds)
        detail = api.get(f"/api/jobs/{job}")
        metrics = api.get(f"/api/jobs/{job}/metrics?limit=1000000")
        for rank in (0, 1):
            stored = {s["step"] for s in metrics["steps"] if s["rank"] == rank}
            run.missing[rank] = len(set(range(steps)) - stored)
            run.dropped[rank] = next(r["dropped"] for r in detail["ranks"] if r["rank"] == rank)
        run.server_dropped = _server_dropped(server)
        events = [e for e in metrics["control_events"] if e["rank"] == 0]
        for c in done:
            period = c["command"]["period"]
            run.applied[c["id"]] = [e["step"] for e in events if e["control"]["period"] == period]
            run.events_at[c["applied_step"]] = sum(e["step"] == c["applied_step"] for e in events)
        run.control_version = detail["control"]["version"]
        return run
    finally:
        _stop(proc)
        server.stop()


def _server_dropped(server: ServerProcess) -> int:
    import urllib.request

    req = urllib.request.Request(server.base + "/metrics", headers={"Authorization": f"Bearer {server.api.token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("avgctl_dropped_metric_batches_total") or line.startswith(
                "avgctl_dropped_metric_batches "
            ):
                return int(float(line.split()[-1]))
    return 0


if __name__ == "__main__":  # a rank, under torchrun
    sys.exit(worker_main(sys.argv[2], sys.argv[4:]))
