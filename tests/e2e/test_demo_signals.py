"""``avgctl demo`` stopped by SIGTERM or by its terminal closing (SIGHUP) stops everything it
started, as Ctrl-C does: the server, its SQLite writer process, torchrun and the ranks."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.support.processes import (
    DASHBOARD_LINE,
    Api,
    alive,
    descendants,
    launch_demo,
    listening,
    output_line,
    wait_for,
)

pytestmark = pytest.mark.dist


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_stop_signal_stops_the_server_its_writer_and_the_workers(tmp_path, sig):
    proc, port = launch_demo(tmp_path, "--nproc", "2", "--steps", "100000", "--step-delay", "0.01")
    tree: list[int] = []
    try:
        url = output_line(proc, DASHBOARD_LINE)
        api = Api(url.group(1), url.group(2))
        wait_for(lambda: (jobs := api.try_get("/api/jobs")) and jobs[0]["step"] > 5, 90, what="training")
        tree = descendants(proc.pid)
        commands = [_cmdline(pid) for pid in tree]
        assert any("process.py" in c and str(tmp_path) in c for c in commands), "no SQLite writer process"
        assert sum("avgctl.worker.demo" in c for c in commands) >= 3, "no torchrun with two ranks"

        proc.send_signal(sig)
        # The launcher's own exit, not its output's end: an orphaned server keeps the pipe open.
        code = proc.wait(60)
        left = [(pid, _cmdline(pid)) for pid in tree if alive(pid)]
        assert left == [], "orphans left"
        assert not listening(port)
        assert code == 0  # as after Ctrl-C
        assert "stopping" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        for pid in tree:  # what the old launcher left behind, so the machine is clean either way
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
