"""The one-token setup: ``AVGCTL_TOKEN=secret avgctl serve``, and the same variable serves workers and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import httpx

from avgctl.worker import connect
from tests.support.fakes import FakeAverager
from tests.support.processes import ServerProcess, wait_for

ONE = "one-token-secret"


def _cli(server: ServerProcess, *argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "AVGCTL_TOKEN": ONE, "AVGCTL_SERVER": server.base}
    return subprocess.run(
        [sys.executable, "-m", "avgctl.server.cli", *argv], env=env, capture_output=True, text=True, timeout=60
    )


def test_one_variable_serves_the_server_its_workers_and_the_cli(tmp_path, monkeypatch):
    server = ServerProcess(tmp_path / "one.db", env={"AVGCTL_TOKEN": ONE}, token=ONE, default_tokens=False).start()
    monkeypatch.setenv("AVGCTL_TOKEN", ONE)  # what connect() reads when no token is given
    averager = FakeAverager(world_size=1)
    link = connect(averager, server=server.base, job_id="one-token-job", send_interval=0.05)
    try:
        wait_for(lambda: link.connected.is_set() or link.error, 30, what="the link's session")
        assert link.error is None and link.refused is None
        for _ in range(5):
            averager.train_step()
        wait_for(lambda: (server.api.try_get("/api/jobs/one-token-job") or {}).get("step") == 5, 30, what="steps")
        listed = _cli(server, "jobs")
        assert listed.returncode == 0 and "one-token-job" in listed.stdout, listed.stderr
        page = httpx.get(f"{server.base}/?token={ONE}", follow_redirects=False)
        assert page.status_code == 303 and "avgctl_token=" in page.headers["set-cookie"]  # a dashboard login
        assert httpx.get(f"{server.base}/api/jobs", headers={"Authorization": "Bearer not-it"}).status_code == 401
    finally:
        link.close()
        server.stop()


def test_the_token_flag_is_the_control_token_unless_one_is_given(tmp_path):
    server = ServerProcess(tmp_path / "flag.db", args=("--token", ONE), token=ONE, default_tokens=False).start()
    try:
        assert httpx.get(f"{server.base}/api/jobs", headers={"Authorization": f"Bearer {ONE}"}).status_code == 200
    finally:
        server.stop()
    args = ("--token", ONE, "--control-token", "other")
    both = ServerProcess(tmp_path / "both.db", args=args, token="other", default_tokens=False).start()
    try:
        assert httpx.get(f"{both.base}/api/jobs", headers={"Authorization": f"Bearer {ONE}"}).status_code == 401
        assert httpx.get(f"{both.base}/api/jobs", headers={"Authorization": "Bearer other"}).status_code == 200
    finally:
        both.stop()
