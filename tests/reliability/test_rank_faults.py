"""A rank killed mid-run: the server sees it within 5 s, and torchrun's restart resumes the job
from its checkpoint. A rank killed while training is paused: the survivor fails with an error, no hang."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from websockets.sync.client import connect

from tests.support.processes import CONTROL, WORKER, ServerProcess, free_port, torchrun_demo, wait_for

pytestmark = pytest.mark.dist


@pytest.fixture
def server(tmp_path):
    srv = ServerProcess(tmp_path / "avgctl.db").start()
    yield srv
    srv.stop()


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


class DashboardWatch:
    """A dashboard client in a thread: every ``job`` message with the time it arrived."""

    def __init__(self, server, job: str):
        self.url = server.base.replace("http", "ws", 1) + f"/ws/jobs/{job}"
        self.jobs: list[tuple[float, dict]] = []
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        with connect(self.url, additional_headers={"Authorization": f"Bearer {CONTROL}"}, max_size=None) as ws:
            while not self.stopped.is_set():
                try:
                    msg = json.loads(ws.recv(timeout=0.2))
                except TimeoutError:
                    continue
                if msg["kind"] in ("snapshot", "job"):
                    self.jobs.append((time.monotonic(), msg["job"]))

    def first(self, predicate, after: float) -> float | None:
        return next((t for t, job in list(self.jobs) if t >= after and predicate(job)), None)

    def close(self) -> None:
        self.stopped.set()
        self.thread.join(5)


def rank(job: dict, r: int) -> dict:
    return next(x for x in job["ranks"] if x["rank"] == r)


def both_connected(api, job: str) -> dict | None:
    data = api.try_get(f"/api/jobs/{job}")
    return data if data and len(data["ranks"]) == 2 and all(r["connected"] for r in data["ranks"]) else None


def checkpoint_step(path: Path) -> int | None:
    try:
        return torch.load(path, weights_only=False)["averager"]["step"]
    except (OSError, EOFError, RuntimeError):
        return None


def test_killed_rank_is_seen_and_the_job_resumes_from_its_checkpoint(server, tmp_path):
    api, job = server.api, "rank-kill"
    ckpt = tmp_path / "ckpt"
    proc = torchrun_demo(
        server,
        job,
        tmp_path / "w.log",
        "--steps",
        "300",
        "--step-delay",
        "0.02",
        "--checkpoint",
        str(ckpt),
        "--checkpoint-every",
        "20",
        restarts=1,
    )
    watch = None
    try:
        first = wait_for(lambda: both_connected(api, job), 60, what="both ranks connected")
        watch = DashboardWatch(server, job)
        # Kill right after both ranks wrote the same checkpoint: per-rank files are written without
        # a barrier, so a kill just before a save could leave the ranks at different steps.
        files = [Path(f"{ckpt}.rank{r}.pt") for r in (0, 1)]

        def fresh_common_checkpoint():
            steps = [checkpoint_step(f) for f in files]
            return steps[0] is not None and steps[0] >= 40 and steps[0] == steps[1] and steps[0]

        saved = wait_for(fresh_common_checkpoint, 60, interval=0.01, what="a checkpoint at step >= 40")
        pid1 = rank(first, 1)["pid"]
        killed_at = time.monotonic()
        os.kill(pid1, signal.SIGKILL)
        # The server marks rank 1 disconnected within 5 s, and tells the dashboards.
        seen = wait_for(
            lambda: (
                not rank(api.get(f"/api/jobs/{job}"), 1)["connected"]
                or rank(api.get(f"/api/jobs/{job}"), 1)["pid"] != pid1
            ),
            5,
            interval=0.02,
            what="rank 1 seen disconnected",
        )
        assert seen
        pushed = wait_for(
            lambda: watch.first(lambda j: not rank(j, 1)["connected"], killed_at), 5, what="dashboard told"
        )
        assert pushed - killed_at < 5
        # torchrun restarts both ranks; they resume from the checkpoint and say hello again.
        again = wait_for(
            lambda: (
                (j := both_connected(api, job))
                and all(r["pid"] != rank(first, r["rank"])["pid"] for r in j["ranks"])
                and j
            ),
            90,
            what="both ranks back with new pids",
        )
        assert all(r["step"] >= saved for r in again["ranks"])
        assert proc.wait(120) == 0
        log = (tmp_path / "w.log").read_text()
        assert f"resumed from {ckpt}.rank0.pt at step {saved}" in log, log[-3000:]
        final = api.get(f"/api/jobs/{job}")
        assert final["status"] == "finished" and final["step"] == 299
        # The resumed run re-sent the steps after the checkpoint: stored once each (keyed by step).
        steps = [s["step"] for s in api.get(f"/api/jobs/{job}/metrics")["steps"] if s["rank"] == 1]
        assert len(steps) == len(set(steps)) and max(steps) == 299
    finally:
        if watch is not None:
            watch.close()
        stop(proc)


def rank_process(server, job: str, log: Path, rank: int, port: int, *args: str) -> subprocess.Popen:
    """One demo rank started the way torchrun would, without torchrun's agent: nothing can SIGTERM
    the survivor before it meets its dead peer on its own, which is what the test is about."""
    env = {
        **os.environ,
        "AVGCTL_TOKEN": WORKER,
        "OMP_NUM_THREADS": "1",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": "2",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
    }
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "avgctl.worker.demo",
                "--server",
                server.base,
                "--job-id",
                job,
                "--period",
                "4",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )


def test_rank_killed_while_training_is_paused_fails_the_job_without_a_hang(server, tmp_path):
    api, job, port = server.api, "pause-kill", free_port()
    ranks = [
        rank_process(server, job, tmp_path / f"w{r}.log", r, port, "--steps", "100000", "--step-delay", "0.01")
        for r in (0, 1)
    ]
    try:
        wait_for(lambda: both_connected(api, job), 60, what="both ranks connected")
        paused = api.wait_done(job, api.command(job, {"type": "pause_training"}))
        assert paused["status"] == "applied"
        wait_for(
            lambda: all(r["step"] == paused["applied_step"] for r in api.get(f"/api/jobs/{job}")["ranks"]),
            10,
            what="both ranks held",
        )
        killed_at = time.monotonic()
        os.kill(ranks[1].pid, signal.SIGKILL)
        code = ranks[0].wait(30)  # bounded: no hang in the held ranks' exchange
        elapsed = time.monotonic() - killed_at
    finally:
        for proc in ranks:
            stop(proc)
    assert code != 0 and elapsed < 30
    log = (tmp_path / "w0.log").read_text()
    # The surviving rank fails in the hold's control exchange with our error, which carries gloo's
    # ("Connection closed by peer" or "Connection reset by peer" ... "remote worker").
    assert "RuntimeError: avgctl: the process group failed while training was held" in log, log[-4000:]
    assert "remote worker" in log
    job_state = wait_for(lambda: (j := api.get(f"/api/jobs/{job}"))["status"] == "disconnected" and j, 10)
    assert not any(r["connected"] for r in job_state["ranks"])
