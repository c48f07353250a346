"""The ``avgctl`` command: ``serve`` the server, or act on a running one as a thin REST client.

Each subcommand is one small ``add_*_parser(subparsers)`` function in ``PARSERS``; registering
another (``avgctl demo``) is one more entry. A subcommand's handler takes the parsed arguments and
returns the exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

EXIT_OK = 0
EXIT_FAILED = 1  # the server answered no (rejected command, unknown job, bad token) or is unreachable
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_TIMEOUT = 3  # the command is still pending after --timeout


class CliError(Exception):
    """A failure to report in one line and exit non-zero."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


# ------------------------------------------------------------------------------ serve


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    # Flags map one to one onto Settings fields; unset flags leave the AVGCTL_* environment in charge.
    p = subparsers.add_parser("serve", help="run the server", description="Run the avgctl server.")
    p.add_argument("--host", help="interface to listen on (default 127.0.0.1, env AVGCTL_HOST)")
    p.add_argument("--port", type=int, help="TCP port (default 8000, env AVGCTL_PORT)")
    p.add_argument("--db", help="SQLite file (default ./avgctl.db, env AVGCTL_DB)")
    p.add_argument("--control-token", help="token with every right (env AVGCTL_CONTROL_TOKEN)")
    p.add_argument("--read-token", help="token that may only read (env AVGCTL_READ_TOKEN)")
    p.add_argument("--worker-token", help="token that may only send metrics (env AVGCTL_WORKER_TOKEN)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=run_serve)


def serve_settings(args: argparse.Namespace):
    """Settings from the flags that were given, the environment for the rest."""
    from avgctl.server.settings import Settings

    given = {k: getattr(args, k) for k in ("host", "port", "db", "control_token", "read_token", "worker_token")}
    return Settings(**{k: v for k, v in given.items() if v is not None})


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from avgctl.server.app import create_app
    from avgctl.server.process import tune_garbage_collector

    try:
        settings = serve_settings(args)
    except ValidationError as err:
        raise CliError(f"bad setting: {err.errors(include_url=False)[0]['msg']}", EXIT_USAGE) from None
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        ws_max_size=settings.max_frame_bytes,
        # No permessage-deflate: compression contexts are per connection, so every dashboard would
        # compress the same frame again and the server would inflate every rank's frames; on
        # loopback or a LAN that costs the one core ingest runs on more than it saves.
        ws_per_message_deflate=False,
        log_level=args.log_level,
    )
    tune_garbage_collector()  # last: what was built so far lives as long as the process
    uvicorn.Server(config).run()
    return EXIT_OK


# ------------------------------------------------------------------------------ REST client


class Client:
    """Just enough of the REST API for the CLI (stdlib only)."""

    def __init__(self, server: str, token: str | None, timeout: float = 10.0):
        self.server = server.rstrip("/")
        self.token = token
        self.timeout = timeout

    def request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        req.add_header("X-Avgctl-Author", "cli")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as err:
            raise CliError(f"{method} {path}: {err.code} {_detail(err)}") from None
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise CliError(f"cannot reach the server at {self.server}: {reason}") from None


def _detail(err: urllib.error.HTTPError) -> str:
    try:
        detail = json.loads(err.read()).get("detail")
    except Exception:
        return err.reason
    if isinstance(detail, list) and detail:  # FastAPI's validation errors
        return "; ".join(str(d.get("msg", d)) for d in detail)
    return str(detail)


def _job_path(job_id: str) -> str:
    return f"/api/jobs/{urllib.parse.quote(job_id, safe='')}"


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("AVGCTL_SERVER", "http://127.0.0.1:8000"),
        help="server URL (default env AVGCTL_SERVER or http://127.0.0.1:8000)",
    )
    p.add_argument("--token", default=os.environ.get("AVGCTL_TOKEN"), help="token (default env AVGCTL_TOKEN)")


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, args.token)


def add_jobs_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("jobs", help="list jobs", description="List the jobs the server knows.")
    _add_client_options(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=run_jobs)


def run_jobs(args: argparse.Namespace) -> int:
    jobs = _client(args).request("GET", "/api/jobs")
    if args.json:
        print(json.dumps(jobs, indent=2))
        return EXIT_OK
    print(f"{'JOB':<32} {'STATUS':<13} {'WORLD':>5} {'STEP':>8} {'PERIOD':>6}  PAUSED")
    for job in jobs:
        c = job["control"]
        paused = ",".join(k for k in ("averaging", "training") if c.get(f"{k}_paused")) or "-"
        print(f"{job['id']:<32} {job['status']:<13} {job['world_size']:>5} {job['step']:>8} {c['period']:>6}  {paused}")
    return EXIT_OK


def add_status_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("status", help="show one job", description="Show a job, its ranks and commands.")
    p.add_argument("job", help="job id")
    _add_client_options(p)
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=run_status)


def run_status(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.request("GET", _job_path(args.job))
    if args.json:
        print(json.dumps(job, indent=2))
        return EXIT_OK
    c = job["control"]
    print(f"job {job['id']}: {job['status']}, step {job['step']}, world size {job['world_size']}")
    print(
        f"period {c['period']}, warm-up {c['warmup_steps']}, averaging {'paused' if c['averaging_paused'] else 'on'}, "
        f"training {'paused' if c['training_paused'] else 'on'}, autotune {'on' if c['autotune']['enabled'] else 'off'}"
        f", version {c['version']}"
    )
    for r in job["ranks"]:
        state = "connected" if r["connected"] else "gone"
        print(f"  rank {r['rank']:>4}  {r['host']}:{r['pid']}  step {r['step']}  {state}  dropped {r['dropped']}")
    return EXIT_OK


def _add_command_parser(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    body: Callable[[argparse.Namespace], dict],
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
) -> None:
    p = subparsers.add_parser(name, help=help, description=help)
    p.add_argument("job", help="job id")
    if extra is not None:
        extra(p)
    _add_client_options(p)
    p.add_argument("--no-wait", action="store_true", help="return once queued, not when applied")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for applied/rejected (default 60)")
    p.set_defaults(func=lambda args: run_command(args, body(args)))


def run_command(args: argparse.Namespace, body: dict) -> int:
    """Post a command; unless ``--no-wait``, wait until rank 0 applied or rejected it."""
    client = _client(args)
    path = _job_path(args.job) + "/commands"
    cmd = client.request("POST", path, body)
    if args.no_wait:
        print(f"command {cmd['id']} ({cmd['type']}) queued")
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while cmd["status"] == "pending":
        if time.monotonic() >= deadline:
            raise CliError(f"command {cmd['id']} ({cmd['type']}) still pending after {args.timeout:g}s", EXIT_TIMEOUT)
        time.sleep(0.2)
        cmd = client.request("GET", f"{path}/{cmd['id']}")
    if cmd["status"] == "rejected":
        raise CliError(f"command {cmd['id']} ({cmd['type']}) rejected: {cmd.get('reason')}")
    print(f"command {cmd['id']} ({cmd['type']}) applied at step {cmd['applied_step']}")
    return EXIT_OK


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def add_set_period_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_command_parser(
        subparsers,
        "set-period",
        "average every N steps from the step the command is applied at",
        lambda a: {"type": "set_period", "period": a.period},
        lambda p: p.add_argument("period", type=_positive, help="steps between averaging rounds"),
    )


def _training_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--training", action="store_true", help="pause/resume training itself, not averaging")


def add_pause_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_command_parser(
        subparsers,
        "pause",
        "pause averaging (or, with --training, hold every rank)",
        lambda a: {"type": "pause_training" if a.training else "pause_averaging"},
        _training_flag,
    )


def add_resume_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_command_parser(
        subparsers,
        "resume",
        "resume averaging (or, with --training, release held ranks)",
        lambda a: {"type": "resume_training" if a.training else "resume_averaging"},
        _training_flag,
    )


def add_average_now_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_command_parser(subparsers, "average-now", "one averaging round over all ranks now", lambda a: {"type": "average_now"})


from avgctl.server.launcher import add_demo_parser  # noqa: E402  (the launcher imports this module lazily)

PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_serve_parser,
    add_demo_parser,
    add_jobs_parser,
    add_status_parser,
    add_set_period_parser,
    add_pause_parser,
    add_resume_parser,
    add_average_now_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="avgctl", description="Live control plane for model averaging.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``avgctl`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as err:
        print(f"avgctl: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    # Run the package's module, not this __main__ copy, so CliError is one class for every subcommand.
    from avgctl.server.cli import main as package_main

    sys.exit(package_main())
