"""``avgctl demo``: the one-command demo starts everything and stops everything."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.processes import DASHBOARD_LINE, Api, launch_demo, output_line, wait_for

pytestmark = pytest.mark.dist


def _processes_mentioning(text: str) -> list[int]:
    """Pids whose command line contains ``text`` (our children: server, torchrun, ranks)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_demo_prints_the_dashboard_url_and_stops_cleanly_on_ctrl_c(tmp_path):
    proc, port = launch_demo(tmp_path, "--steps", "100000", "--step-delay", "0.01")
    try:
        url = output_line(proc, DASHBOARD_LINE)
        assert url.group(1) == f"http://127.0.0.1:{port}"
        api = Api(url.group(1), url.group(2))
        job = wait_for(
            lambda: (jobs := api.try_get("/api/jobs")) and jobs[0]["step"] > 20 and jobs[0], 90, what="training"
        )
        assert job["world_size"] == 2 and job["status"] == "running"
        assert _processes_mentioning(str(port))  # the server is ours and alive
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "stopping" in out
    assert _processes_mentioning(str(port)) == [] and _processes_mentioning(str(tmp_path)) == [], "orphans left"


def test_demo_runs_to_the_end_of_its_steps(tmp_path):
    # The language model (`avgctl demo`'s default task; launch_demo picks gauss unless told).
    proc, port = launch_demo(tmp_path, "--task", "lm", "--steps", "30", "--step-delay", "0")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "step 30/30" in out and "training finished" in out and "of task lm" in out
    assert "bits per byte" in (tmp_path / "workers.log").read_text()
    assert _processes_mentioning(str(tmp_path)) == []


def test_demo_reports_bad_arguments_with_exit_code_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "avgctl.server.cli", "demo", "--nproc", "0"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "--nproc must be at least 1" in proc.stderr
