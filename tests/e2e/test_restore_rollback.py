"""A real demo job under torchrun, resumed from a checkpoint taken before a command was applied: the
server marks that command rolled back at the resume step and stores the restore's control event
(real ranks, real ``avgctl serve``, SQLite)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from tests.support.processes import ServerProcess, stop_tree, torchrun_demo, wait_for

pytestmark = pytest.mark.dist

JOB = "restore-e2e"
CHECKPOINT_EVERY = 200


def _checkpoint_step(path: Path) -> int | None:
    try:
        return torch.load(path, weights_only=False)["averager"]["step"]
    except (OSError, EOFError, RuntimeError):
        return None


def _ranks_up(api, pids: set[int] = frozenset()) -> dict | None:
    """The job once both its ranks are connected, none of them one of ``pids``."""
    job = api.try_get(f"/api/jobs/{JOB}")
    ranks = job["ranks"] if job else []
    ok = len(ranks) == 2 and all(r["connected"] and r["pid"] not in pids for r in ranks)
    return job if ok else None


def test_a_command_applied_after_the_checkpoint_is_rolled_back_when_the_job_resumes(tmp_path):
    server = ServerProcess(tmp_path / "avgctl.db").start()
    ckpt = tmp_path / "ckpt"
    args = ("--steps", "2000", "--step-delay", "0.02", "--checkpoint", str(ckpt))
    proc = torchrun_demo(
        server, JOB, tmp_path / "w.log", *args, "--checkpoint-every", str(CHECKPOINT_EVERY), restarts=1
    )
    try:
        api = server.api
        first = wait_for(lambda: _ranks_up(api), 60, what="both ranks connected")
        files = [Path(f"{ckpt}.rank{r}.pt") for r in (0, 1)]
        wait_for(lambda: all(_checkpoint_step(f) == CHECKPOINT_EVERY for f in files), 60, what="the first checkpoint")
        cmd = api.wait_done(JOB, api.command(JOB, {"type": "set_period", "period": 6}))
        assert cmd["status"] == "applied" and cmd["control_version"] == 1
        # Killed before the next checkpoint (at step 400) could save the command's state.
        assert CHECKPOINT_EVERY < cmd["applied_step"] < 2 * CHECKPOINT_EVERY - 20, cmd
        os.kill(next(r["pid"] for r in first["ranks"] if r["rank"] == 1), signal.SIGKILL)

        # torchrun restarts both ranks; they resume from the checkpoint (step 200, control version 0).
        wait_for(lambda: _ranks_up(api, {r["pid"] for r in first["ranks"]}), 90, what="both ranks back")
        log = (tmp_path / "w.log").read_text()
        assert f"resumed from {ckpt}.rank0.pt at step {CHECKPOINT_EVERY}" in log, log[-3000:]
        undone = wait_for(
            lambda: (c := api.get(f"/api/jobs/{JOB}/commands/{cmd['id']}"))["rolled_back_at_step"] is not None and c,
            what="the command rolled back",
        )
        assert undone["status"] == "applied" and undone["rolled_back_at_step"] == CHECKPOINT_EVERY
        job = api.get(f"/api/jobs/{JOB}")
        assert (job["control"]["period"], job["control"]["version"]) == (4, 0)
        restores = [e for e in api.get(f"/api/jobs/{JOB}/metrics")["control_events"] if "note" in e]
        assert [(e["step"], e["note"], e["control"]["period"]) for e in restores] == [
            (CHECKPOINT_EVERY, "restored from checkpoint (version 1 -> 0)", 4)
        ]
    finally:
        stop_tree(proc)
        server.stop()
