"""``avgctl demo``: the server on SQLite, CPU torchrun workers on the demo task, and a progress bar.

Both children run in their own process groups so Ctrl-C, the end of ``--steps`` or a failure stops
all of them: no orphans. Exit code 0 on success (Ctrl-C counts as a clean stop), otherwise the
workers' (or the server's) failure code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True, slots=True)
class DemoLaunch:
    """What ``avgctl demo`` starts."""

    nproc: int = 2
    """Worker processes (CPU ranks)."""
    steps: int = 3000
    """Training steps per rank."""
    period: int = 8
    """Initial averaging period."""
    step_delay: float = 0.02
    """Seconds per step added so the dashboard moves at a watchable pace."""
    host: str = "127.0.0.1"
    port: int = 8000
    db: Path = Path("avgctl-demo.db")
    log: Path | None = None
    """Where the workers' output goes (default: a file in the temp folder)."""
    keep_serving: bool = False
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
    p.add_argument("--nproc", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--steps", type=int, default=3000, help="training steps per rank (default 3000)")
    p.add_argument("--period", type=int, default=8, help="initial averaging period (default 8)")
    p.add_argument("--step-delay", type=float, default=0.02, help="seconds added per step (default 0.02)")
    p.add_argument("--host", default="127.0.0.1", help="server interface (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="server port (default 8000)")
    p.add_argument("--db", type=Path, default=Path("avgctl-demo.db"), help="SQLite file (default ./avgctl-demo.db)")
    p.add_argument("--log", type=Path, help="file for the workers' output (default: in the temp folder)")
    p.add_argument("--keep-serving", action="store_true", help="keep the dashboard up after training ends")
    p.set_defaults(func=run_demo_command)


def run_demo_command(args: argparse.Namespace) -> int:
    from avgctl.server.cli import EXIT_USAGE, CliError

    try:
        launch = DemoLaunch(
            nproc=args.nproc,
            steps=args.steps,
            period=args.period,
            step_delay=args.step_delay,
            host=args.host,
            port=args.port,
            db=args.db,
            log=args.log,
            keep_serving=args.keep_serving,
        )
    except ValueError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    return run_demo(launch)


def serve_args(launch: DemoLaunch, control_token: str, worker_token: str) -> list[str]:
    """``avgctl serve`` arguments for the demo's server. Tokens go as ``--flag=value``: a generated
    token may start with ``-``, which argparse would take for an option."""
    return [
        "serve", "--host", launch.host, "--port", str(launch.port), "--db", str(launch.db),
        f"--control-token={control_token}", f"--worker-token={worker_token}", "--log-level", "warning",
    ]


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


def _get(url: str, token: str) -> dict | None:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _wait_healthy(base: str, server: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} (is port in use? try --port)")
        if _get(base + "/api/health", "") is not None:
            return
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer on {base} within {timeout:.0f}s")


def _final_job(url: str, token: str, timeout: float = 5.0) -> dict | None:
    """The job once the server has stored the ranks' last records (they flush as the workers exit)."""
    deadline = time.monotonic() + timeout
    job = _get(url, token)
    while job is not None and job.get("status") == "running" and time.monotonic() < deadline:
        time.sleep(0.1)
        job = _get(url, token)
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
        state = "paused" if control.get("training_paused") else ("no averaging" if control.get("averaging_paused") else "")
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
    """Run the demo to the end of its steps (or Ctrl-C); returns the exit code."""
    control_token, worker_token = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    base = f"http://{'127.0.0.1' if launch.host in ('0.0.0.0', '::') else launch.host}:{launch.port}"
    job_id = "demo-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    log_path = launch.log or Path(tempfile.gettempdir()) / f"avgctl-{job_id}.log"
    torchrun = shutil.which("torchrun") or None
    server = workers = None
    code = 0
    try:
        server = _spawn([sys.executable, "-m", "avgctl.server.cli", *serve_args(launch, control_token, worker_token)])
        _wait_healthy(base, server)
        print(f"avgctl demo: dashboard  {base}/?token={control_token}", flush=True)
        print(f"avgctl demo: job {job_id}, {launch.nproc} CPU ranks, {launch.steps} steps; worker log {log_path}", flush=True)
        print("avgctl demo: Ctrl-C stops everything", flush=True)
        launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        with open(log_path, "w") as log:
            workers = _spawn(
                [*launcher, "--standalone", "--nproc-per-node", str(launch.nproc), "-m", "avgctl.worker.demo",
                 "--server", base, "--job-id", job_id, "--steps", str(launch.steps), "--period", str(launch.period),
                 "--step-delay", str(launch.step_delay)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, "AVGCTL_TOKEN": worker_token, "OMP_NUM_THREADS": "1"},
            )
        bar = ProgressBar(launch.steps)
        while workers.poll() is None:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited with code {server.returncode}")
            bar.show(_get(f"{base}/api/jobs/{job_id}", control_token))
            time.sleep(0.5)
        bar.show(_final_job(f"{base}/api/jobs/{job_id}", control_token), final=True)
        bar.end()
        code = workers.returncode
        if code == 0:
            print(f"avgctl demo: training finished; history kept in {launch.db}", flush=True)
            if launch.keep_serving:
                print(f"avgctl demo: dashboard still at {base}/?token={control_token} (Ctrl-C to stop)", flush=True)
                server.wait()
        else:
            print(f"avgctl demo: workers failed with code {code}; see {log_path}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("\navgctl demo: stopping", flush=True)
        code = 0
    except RuntimeError as err:
        print(f"avgctl demo: {err}", file=sys.stderr, flush=True)
        code = 1
    finally:
        _stop(workers)
        _stop(server)
    return code
