"""Real processes on loopback: ``avgctl serve`` as a child, ``torchrun`` demo workers, and what
stops, finds and measures processes (free ports, process trees, RSS)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from avgctl.server.cli.client import Client
from tests.support import polling
from tests.support.tokens import CONTROL, WORKER

__all__ = [
    "CONTROL",
    "DASHBOARD_LINE",
    "WORKER",
    "Api",
    "ServerProcess",
    "Workers",
    "alive",
    "descendants",
    "free_port",
    "launch_demo",
    "listening",
    "output_line",
    "rss_bytes",
    "stop_tree",
    "wait_for",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether something accepts connections on loopback ``port``."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, dead and waiting for its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts each rank in a session of its own, so
    killing torchrun's process group does not reach them)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def rss_bytes(pid: int) -> int:
    """The resident set size of process ``pid`` (Linux ``/proc``)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def stop_tree(proc: subprocess.Popen, grace: float = 20.0) -> None:
    """SIGTERM a launcher (torchrun stops its ranks), then SIGKILL whatever is left below it."""
    if proc.poll() is not None:
        return
    tree = descendants(proc.pid)
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(10)


def wait_for(
    condition: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> Any:
    """``tests.support.polling.wait_for`` with slower defaults: these are whole processes starting up."""
    return polling.wait_for(condition, timeout, interval, what)


class Api(Client):
    """The CLI's REST client with the control token, and the two steps these tests take with commands.

    Its ``call``/``get`` raise urllib's errors (``HTTPError.code`` is the status), and commands go
    without an author header, as any API client's (author ``api``).
    """

    def __init__(self, base: str, token: str = CONTROL):
        super().__init__(base, token, author=None)

    def command(self, job: str, body: dict) -> dict:
        return self.call("POST", f"/api/jobs/{job}/commands", body)

    def wait_done(self, job: str, command: dict, timeout: float = 60.0) -> dict:
        path = f"/api/jobs/{job}/commands/{command['id']}"
        return wait_for(
            lambda: (c := self.try_get(path)) and c["status"] != "pending" and c,
            timeout,
            what=f"command {command['id']}",
        )


class ServerProcess:
    """``avgctl serve`` as a child process; kill and restart it on the same port and database.

    ``args`` are more ``serve`` flags, ``env`` more environment variables, ``log`` a file for the
    server's output; ``default_tokens=False`` leaves out the ``CONTROL``/``WORKER`` token flags;
    ``python`` the interpreter that runs it (another venv's, to serve an installed wheel).
    """

    def __init__(
        self,
        db: Path,
        port: int | None = None,
        args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
        log: Path | None = None,
        token: str = CONTROL,
        default_tokens: bool = True,
        python: str = sys.executable,
    ):
        self.db, self.port = db, port or free_port()
        self.python = python
        self.args, self.env, self.log = args, env, log
        self.default_tokens = default_tokens
        self.proc: subprocess.Popen | None = None
        self.api = Api(self.base, token)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> ServerProcess:
        tokens = ["--control-token", CONTROL, "--worker-token", WORKER] if self.default_tokens else []
        level = [] if "--log-level" in self.args else ["--log-level", "warning"]
        out = open(self.log, "a") if self.log else None  # the child keeps its own copy
        try:
            self.proc = subprocess.Popen(
                [
                    self.python,
                    "-m",
                    "avgctl.server.cli",
                    "serve",
                    "--port",
                    str(self.port),
                    "--db",
                    str(self.db),
                    *tokens,
                    *level,
                    *self.args,
                ],
                start_new_session=True,
                env=None if self.env is None else {**os.environ, **self.env},
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
        finally:
            if out is not None:
                out.close()
        wait_for(lambda: self.proc.poll() is not None or self.api.try_get("/api/health"), 30, what="server health")
        assert self.proc.poll() is None, f"server exited with {self.proc.returncode}"
        return self

    def kill(self) -> None:
        """SIGKILL the server's whole process group, its SQLite writer process too (as a container's
        kill would): a writer stopped with the group would otherwise stay stopped."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()


class Workers:
    """``torchrun --standalone`` running the demo task against a server."""

    def __init__(
        self,
        server: str,
        job_id: str,
        *args: str,
        nproc: int = 2,
        log: Path | None = None,
        module: str = "avgctl.worker.demo",
    ):
        self.log = open(log, "w") if log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                str(nproc),
                "-m",
                module,
                "--server",
                server,
                "--job-id",
                job_id,
                "--quiet",
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "AVGCTL_TOKEN": WORKER, "OMP_NUM_THREADS": "1"},
        )

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        stop_tree(self.proc)
        if self.log is not subprocess.DEVNULL:
            self.log.close()


def torchrun_demo(server: ServerProcess, job: str, log: Path, *args: str, restarts: int = 0) -> subprocess.Popen:
    """A 2-rank ``torchrun --standalone`` demo job at period 4 reporting to ``server`` (its own session,
    output to ``log``); ``restarts`` is torchrun's ``--max-restarts``."""
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc-per-node",
                "2",
                "--max-restarts",
                str(restarts),
                "--monitor-interval",
                "0.1",
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
            env={**os.environ, "AVGCTL_TOKEN": WORKER, "OMP_NUM_THREADS": "1"},
        )


DASHBOARD_LINE = r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)"
"""What ``avgctl demo`` prints first: the dashboard's URL (base, token)."""


def launch_demo(tmp_path: Path, *args: str) -> tuple[subprocess.Popen, int]:
    """``avgctl demo`` on a free port with its database and worker log under ``tmp_path``, its output
    (text) on a pipe; returns the process and the port. The task is the fast ``gauss`` unless
    ``args`` name another (``--task lm``: the last flag given wins)."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "avgctl.server.cli", "demo", "--port", str(port), "--task", "gauss"]
        + ["--db", str(tmp_path / "demo.db"), "--log", str(tmp_path / "workers.log"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return proc, port


def output_line(proc: subprocess.Popen, pattern: str) -> re.Match:
    """The first line of ``proc``'s output matching ``pattern`` (AssertionError if it exits first)."""
    while True:
        line = proc.stdout.readline()
        assert line, f"the process exited before printing {pattern!r}"
        if found := re.search(pattern, line):
            return found
