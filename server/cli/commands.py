"""The ``avgctl`` commands that act on a running server: ``jobs``, ``status``, ``set-period``, ``pause``,
``resume``, ``average-now``. Each is one small ``add_*_parser(subparsers)`` function; a handler takes
the parsed arguments and returns the exit code."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable

from avgctl.protocol import env
from avgctl.server.cli.client import Client, job_path
from avgctl.server.cli.exits import EXIT_OK, EXIT_TIMEOUT, CliError


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get(env.SERVER, "http://127.0.0.1:8000"),
        help=f"server URL (default env {env.SERVER} or http://127.0.0.1:8000)",
    )
    p.add_argument("--token", default=os.environ.get(env.TOKEN), help=f"token (default env {env.TOKEN})")


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
    job = _client(args).request("GET", job_path(args.job))
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
    path = job_path(args.job) + "/commands"
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
    _add_command_parser(
        subparsers, "average-now", "one averaging round over all ranks now", lambda a: {"type": "average_now"}
    )
