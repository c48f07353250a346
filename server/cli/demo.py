"""``avgctl demo``: the server on SQLite, CPU torchrun workers on the demo task, and a progress bar.

Both children run in their own process groups so Ctrl-C, the end of ``--steps`` or a failure stops
all of them: no orphans. SIGTERM and SIGHUP (the terminal closed) stop them as Ctrl-C does: the
launcher stops its children before it exits, so neither the server (with its SQLite writer
process) nor the workers outlive it. Exit code 0 on success (Ctrl-C, SIGTERM and SIGHUP count as
a clean stop), otherwise the workers' (or the server's) failure code.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from avgctl.protocol import AveragerConfig
from avgctl.protocol.flags import add_flags, from_flags
from avgctl.server.cli.client import Client, job_path
from avgctl.server.cli.exits import EXIT_USAGE, CliError
from avgctl.server.settings import Settings, browsable_host

AveragerKind = AveragerConfig.model_fields["kind"].annotation
"""The averagers a demo worker builds (``--averager``): the kinds a hello names, written once."""
TaskKind = Literal["gauss", "lm"]
"""The demo worker's tasks (``avgctl.worker.demo.TaskKind``; this command must not import torch to
read them, and a test holds the two equal)."""


@dataclass(kw_only=True, slots=True)
class DemoLaunch:
    """What ``avgctl demo`` starts."""

    nproc: int = field(default=2, metadata={"help": "worker processes"})
    """Worker processes (CPU ranks)."""
    task: TaskKind = field(
        default="lm",
        metadata={
            "help": "lm: a small byte-level GPT on the Python stdlib's source, each rank on its own packages; "
            "gauss: a Gaussian mixture whose loss flattens within seconds"
        },
    )
    """What the workers train. ``lm`` here (a newcomer sees a real model's held-out loss fall for the
    whole run, and divergence follow the lr), while the worker's own default is the fast ``gauss``
    that tests launch; always forwarded as ``--task``."""
    steps: int = field(default=3000, metadata={"help": "training steps per rank"})
    period: int = field(default=8, metadata={"help": "initial averaging period"})
    averager: AveragerKind | None = field(  # type: ignore[valid-type]
        default=None,
        metadata={
            "help": "the workers' averager; diloco adds an outer optimizer step per round (default: the demo worker's own)"
        },
    )
    """Forwarded to the workers as ``--averager`` when given; else the demo worker's own default
    stands (``avgctl.worker.demo.DemoConfig``), written there once."""
    step_delay: float = field(default=0.02, metadata={"help": "seconds added per step"})
    """Seconds per step added so the dashboard moves at a watchable pace."""
    host: str = field(default=Settings.model_fields["host"].default, metadata={"help": "server interface"})
    port: int = field(default=Settings.model_fields["port"].default, metadata={"help": "server port"})
    db: Path = field(default=Path("avgctl-demo.db"), metadata={"help": "SQLite file"})
    log: Path | None = field(
        default=None, metadata={"help": "file for the workers' output (default: in the temp folder)"}
    )
    keep_serving: bool = field(default=False, metadata={"help": "keep the dashboard up after training ends"})
    """Keep the server (and dashboard) up after training ends, until Ctrl-C."""

    def __post_init__(self) -> None:
        if self.nproc < 1:
            raise ValueError("--nproc must be at least 1")
        if self.steps < 1:
            raise ValueError("--steps must be at least 1")
        if self.period < 1:
            raise ValueError("--period must be a positive integer")


def add_demo_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the server plus CPU torchrun workers on the demo task",
        description="Start the server (SQLite), CPU torchrun workers on the demo task, and print the dashboard URL.",
    )
    add_flags(p, DemoLaunch)
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    try:
        launch = from_flags(DemoLaunch, args)
    except ValueError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    return run_demo(launch)


def serve_args(launch: DemoLaunch) -> list[str]:
    """``avgctl serve`` arguments for the demo's server. No tokens: any user may read a process's
    arguments (``ps``), so they go in the environment (``serve_env``)."""
    return [
        "serve",
        "--host",
        launch.host,
        "--port",
        str(launch.port),
        "--db",
        str(launch.db),
        "--log-level",
        "warning",
    ]


def worker_args(launch: DemoLaunch, server: str, job_id: str) -> list[str]:
    """The demo worker's arguments (``-m avgctl.worker.demo ...``) for ``launch``'s run; no token
    (the environment carries it, as ``serve_args`` says)."""
    averager = [] if launch.averager is None else ["--averager", launch.averager]
    return [
        "--server",
        server,
        "--job-id",
        job_id,
        "--task",
        launch.task,
        "--steps",
        str(launch.steps),
        "--period",
        str(launch.period),
        *averager,
        "--step-delay",
        str(launch.step_delay),
    ]


def serve_env(control_token: str, worker_token: str) -> dict[str, str]:
    """The demo server's environment: this one, with the demo's own tokens (and no token files or
    read token from the caller's environment, which would clash with or add to them)."""
    env_prefix = Settings.model_config["env_prefix"]
    env = {
        k: v
        for k, v in os.environ.items()
        if not (k.startswith(env_prefix) and k.removeprefix(env_prefix).lower().endswith(("_token", "_token_file")))
    }
    env[f"{env_prefix}CONTROL_TOKEN"] = control_token
    env[f"{env_prefix}WORKER_TOKEN"] = worker_token
    return env


def _spawn(argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(argv, start_new_session=True, **kwargs)


def _stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """SIGINT the child's whole process group (torchrun forwards it), then SIGKILL stragglers."""
    if proc is None or proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGINT, grace), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


# What stops the demo besides Ctrl-C's SIGINT: a stop request (``kill``, a service manager) and the
# hangup its terminal sends when closed. Python's default for both kills the launcher on the spot,
# leaving the server, its writer process and the workers (each in a session of its own) running.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def _handling(signals: tuple[signal.Signals, ...], handler):
    """``handler`` for ``signals`` while inside, the previous handlers after (in the main thread
    only: Python takes signal handlers there alone)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _say(text: str, stream=None) -> None:
    """Print a line; a terminal that is gone (SIGHUP: writes fail with EIO) must not stop the cleanup."""
    with contextlib.suppress(OSError):
        print(text, file=stream or sys.stdout, flush=True)


def _wait_healthy(client: Client, server: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} (is port in use? try --port)")
        if client.try_get("/api/health") is not None:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer on {client.server} within {timeout:.0f}s")


def _final_job(client: Client, path: str, timeout: float = 5.0) -> dict | None:
    """The job once the server has stored the ranks' last records (they flush as the workers exit)."""
    deadline = time.monotonic() + timeout
    job = client.try_get(path)
    while job is not None and job.get("status") == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = client.try_get(path)
    return job


class ProgressBar:
    """One line redrawn in place on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, total: int, stream=sys.stdout):
        self.total, self.stream = total, stream
        self.tty = stream.isatty()
        self.last_plain = 0.0

    def show(self, job: dict | None, *, final: bool = False) -> None:
        """Redraw the bar; off a terminal print at most every few seconds, and always the final line."""
        if job is None:
            return
        step, control = job.get("step", 0) + 1, job.get("control", {})  # the server keeps the last step index
        width = 30
        filled = int(width * min(step, self.total) / self.total)
        state = (
            "paused" if control.get("training_paused") else ("no averaging" if control.get("averaging_paused") else "")
        )
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] step {step}/{self.total} "
            f"period {control.get('period', '?')} {state}".rstrip()
        )
        if self.tty:
            self.stream.write("\r" + line.ljust(79))
            self.stream.flush()
        elif final or time.monotonic() - self.last_plain > 5.0:
            self.last_plain = time.monotonic()
            print(line, file=self.stream, flush=True)

    def end(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def run_demo(launch: DemoLaunch) -> int:
    """Run the demo to the end of its steps (or Ctrl-C, SIGTERM, SIGHUP); returns the exit code."""
    with _handling(STOP_SIGNALS, _interrupt):  # SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C
        return _run_demo(launch)


def _run_demo(launch: DemoLaunch) -> int:
    control_token, worker_token = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    base = f"http://{browsable_host(launch.host)}:{launch.port}"
    client = Client(base, control_token, timeout=2.0)
    job_id = "demo-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_path = launch.log or Path(tempfile.gettempdir()) / f"avgctl-{job_id}.log"
    torchrun = shutil.which("torchrun") or None
    server = workers = None
    code = 0
    try:
        server = _spawn(
            [sys.executable, "-m", "avgctl.server.cli", *serve_args(launch)], env=serve_env(control_token, worker_token)
        )
        _wait_healthy(client, server)
        print(f"avgctl demo: dashboard  {base}/?token={control_token}", flush=True)
        print(
            f"avgctl demo: job {job_id}, {launch.nproc} CPU ranks, {launch.steps} steps of task {launch.task}; worker log {log_path}",
            flush=True,
        )
        print("avgctl demo: Ctrl-C stops everything", flush=True)
        launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        with open(log_path, "w") as log:
            workers = _spawn(
                [
                    *launcher,
                    "--standalone",
                    "--nproc-per-node",
                    str(launch.nproc),
                    "-m",
                    "avgctl.worker.demo",
                    *worker_args(launch, base, job_id),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "AVGCTL_TOKEN": worker_token, "OMP_NUM_THREADS": "1"},
            )
        bar = ProgressBar(launch.steps)
        while workers.poll() is None:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.returncode}")
            bar.show(client.try_get(job_path(job_id)))
            time.sleep(0.5)
        bar.show(_final_job(client, job_path(job_id)), final=True)
        bar.end()
        code = workers.returncode
        if code == 0:
            print(f"avgctl demo: training finished; history kept in {launch.db}", flush=True)
            if launch.keep_serving:
                print(f"avgctl demo: dashboard still at {base}/?token={control_token} (Ctrl-C to stop)", flush=True)
                server.wait()
        else:
            print(f"avgctl demo: workers failed with code {code}; see {log_path}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM or SIGHUP
        _say("\navgctl demo: stopping")
        code = 0
    except RuntimeError as err:
        _say(f"avgctl demo: {err}", sys.stderr)
        code = 1
    finally:
        # A second Ctrl-C (or SIGTERM, SIGHUP) must not cut the children's stop short (at most ~20 s
        # each) and leave them running.
        with _handling((signal.SIGINT, *STOP_SIGNALS), signal.SIG_IGN):
            _stop(workers)
            _stop(server)
    return code
