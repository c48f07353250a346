"""The ``avgctl`` commands that act on a running server: ``jobs``, ``status``, ``commands``, and one
subcommand per command the REST API takes (``set-period``, ``set-hierarchy``, ``set-outer-lr``,
``pause``, ``resume``, ``average-now``, ``autotune``). Each is one small ``add_*_parser(subparsers)`` function; a handler
takes the parsed arguments and returns the exit code. With ``--json`` each prints the server's JSON
(the job, the list, or the command as it ended) on stdout instead of text."""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable

from avgctl.protocol import env
from avgctl.server.cli.client import Client, job_path
from avgctl.server.cli.exits import EXIT_FAILED, EXIT_OK, EXIT_TIMEOUT, EXIT_USAGE, CliError

# ------------------------------------------------------------------ argument types
# argparse prints an ArgumentTypeError's text after "argument NAME:"; any other error as
# "invalid <function name> value", which says nothing to a person.


def _positive(text: str) -> int:
    """A whole number >= 1 (a period, a group size)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_number(text: str) -> float:
    """A finite number > 0 (a target divergence, seconds, an outer learning rate)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number above 0, got {text!r}")
    return value


def _level(text: str) -> tuple[int, int]:
    """``GROUP_SIZE=PERIOD`` (``8=4``: groups of 8 ranks average every 4 steps)."""
    size, sep, period = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected GROUP_SIZE=PERIOD (e.g. 8=4), got {text!r}")
    try:
        return _positive(size.strip()), _positive(period.strip())
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"expected GROUP_SIZE=PERIOD with two positive integers (e.g. 8=4), got {text!r}"
        ) from None


class _Levels(argparse.Action):
    """The levels of ``set-hierarchy``, each group size once, as ``{"size": period}`` in size order."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        periods: dict[str, int] = {}
        for size, period in sorted(values):
            if str(size) in periods:
                raise argparse.ArgumentError(self, f"group size {size} is given twice")
            periods[str(size)] = period
        setattr(namespace, self.dest, periods)


# ------------------------------------------------------------------ shared options and output


def _add_client_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get(env.SERVER, "http://127.0.0.1:8000"),
        help=f"server URL (default env {env.SERVER} or http://127.0.0.1:8000)",
    )
    p.add_argument("--token", default=os.environ.get(env.TOKEN), help=f"token (default env {env.TOKEN})")
    # SUPPRESS: unless given here, the value of ``avgctl --json`` (before the subcommand) stands.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print the server's JSON")
    p.set_defaults(accepts_json=True)


def _client(args: argparse.Namespace) -> Client:
    return Client(args.server, args.token)


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2))


def _table(headers: list[str], rows: list[list[str]]) -> None:
    """Columns padded to their widest cell; the last one left as it is (free text)."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]
    for row in (headers, *rows):
        cells = [f"{cell!s:<{w}}" for cell, w in zip(row[:-1], widths)]
        print("  ".join([*cells, str(row[-1])]).rstrip())


def _levels_text(hierarchy: dict[str, int]) -> str:
    """``{"2": 2, "8": 4}`` as ``2=2 8=4``, the form ``set-hierarchy`` takes."""
    return " ".join(f"{size}={hierarchy[size]}" for size in sorted(hierarchy, key=int))


# ------------------------------------------------------------------ reading


def add_jobs_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("jobs", help="list jobs", description="List the jobs the server knows.")
    _add_client_options(p)
    p.set_defaults(func=run_jobs)


def run_jobs(args: argparse.Namespace) -> int:
    jobs = _client(args).request("GET", "/api/jobs")
    if args.json:
        _print_json(jobs)
        return EXIT_OK
    rows = []
    for job in jobs:
        c = job["control"]
        paused = ",".join(k for k in ("averaging", "training") if c.get(f"{k}_paused")) or "-"
        period = _levels_text(c["hierarchy"]) if c.get("hierarchy") else c["period"]
        rows.append([job["id"], job["status"], job["world_size"], job["step"], period, paused])
    _table(["JOB", "STATUS", "WORLD", "STEP", "PERIOD", "PAUSED"], rows)
    return EXIT_OK


def _job_parser(
    subparsers: argparse._SubParsersAction, name: str, help: str, description: str
) -> argparse.ArgumentParser:
    """A subcommand about one job: ``avgctl NAME JOB`` with the client options."""
    p = subparsers.add_parser(name, help=help, description=description)
    p.add_argument("job", metavar="JOB", help="job id")
    _add_client_options(p)
    return p


def add_status_parser(subparsers: argparse._SubParsersAction) -> None:
    description = "Show a job's control state and its ranks (its command log: avgctl commands JOB)."
    _job_parser(subparsers, "status", "show one job", description).set_defaults(func=run_status)


def _autotune_text(a: dict) -> str:
    state = a.get("state") or ("on" if a.get("enabled") else "off")
    target = a.get("target_divergence")
    if target is not None:
        return f"{state} (target {target:g})"
    if a.get("calibrated_target") is not None:
        return f"{state} (target {a['calibrated_target']:g}, calibrated)"
    return state


def _outer_lr_text(client: Client, job: dict) -> str:
    """A DiLoCo job's outer lr: the one a ``set_outer_lr`` set, else what rank 0's latest round
    reported (its optimizer's own lr), looked for over the last two periods' records."""
    lr = job["control"].get("outer_lr")
    if lr is not None:
        return f"{lr:g} (set_outer_lr)"
    since = max(0, job["step"] - 2 * job["control"]["period"] - 1)
    rounds = client.request("GET", f"{job_path(job['id'])}/metrics?ranks=0&names=outer_lr&since_step={since}")["rounds"]
    reported = [r for r in rounds if isinstance(r.get("outer_lr"), (int, float))]
    if not reported:
        return "not reported yet (the optimizer's own until a set_outer_lr applies)"
    return f"{reported[-1]['outer_lr']:g} (the optimizer's, at the round of step {reported[-1]['step']})"


def run_status(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.request("GET", job_path(args.job))
    if args.json:
        _print_json(job)
        return EXIT_OK
    c = job["control"]
    hierarchy = c.get("hierarchy")
    print(f"job {job['id']}: {job['status']}, step {job['step']}, world size {job['world_size']}")
    print(
        ("" if hierarchy else f"period {c['period']}, ")
        + f"warm-up {c['warmup_steps']}, averaging {'paused' if c['averaging_paused'] else 'on'}, "
        f"training {'paused' if c['training_paused'] else 'on'}, autotune {_autotune_text(c['autotune'])}, "
        f"version {c['version']}"
    )
    if hierarchy:
        levels = ", ".join(f"groups of {g} every {hierarchy[g]} steps" for g in sorted(hierarchy, key=int))
        print(f"hierarchy (group size -> period): {levels}")
    if (job.get("config") or {}).get("kind") == "diloco":
        print(f"DiLoCo: outer lr {_outer_lr_text(client, job)}")
    for r in job["ranks"]:
        state = "connected" if r["connected"] else "gone"
        print(f"  rank {r['rank']:>4}  {r['host']}:{r['pid']}  step {r['step']}  {state}  dropped {r['dropped']}")
    return EXIT_OK


def add_commands_parser(subparsers: argparse._SubParsersAction) -> None:
    description = "Show a job's command log, oldest first: who sent what, and what became of it."
    _job_parser(subparsers, "commands", "show a job's command log", description).set_defaults(func=run_commands)


def _args_text(body: dict) -> str:
    if body.get("type") == "set_hierarchy":
        return _levels_text(body.get("periods") or {})
    args = [f"{k}={json.dumps(v)}" for k, v in body.items() if k != "type"]
    return " ".join(args) or "-"


def _rolled_back_text(step: int) -> str:
    """Why an applied command no longer holds: the job went back to a state without it."""
    why = "the job restarted from step 0" if step == 0 else "the job resumed from a checkpoint taken before it"
    return f"rolled back at step {step} ({why})"


def _why(c: dict) -> str:
    """The log's last column: why it was rejected, or why its author sent it; first, why it no
    longer holds when a restore rolled it back."""
    why = c.get("reason") or c.get("note")
    if c.get("rolled_back_at_step") is not None:
        return _rolled_back_text(c["rolled_back_at_step"]) + (f"; {why}" if why else "")
    return why or "-"


def run_commands(args: argparse.Namespace) -> int:
    log = _client(args).request("GET", job_path(args.job) + "/commands")
    if args.json:
        _print_json(log)
        return EXIT_OK
    rows = [
        [
            c["id"],
            c["type"],
            _args_text(c.get("command") or {}),
            c["author"],
            "rolled back" if c.get("rolled_back_at_step") is not None else c["status"],  # still "applied" in JSON
            "-" if c.get("applied_step") is None else c["applied_step"],
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["created_at"])),
            _why(c),
        ]
        for c in log
    ]
    _table(["ID", "TYPE", "ARGS", "AUTHOR", "STATUS", "APPLIED", "CREATED", "REASON"], rows)
    return EXIT_OK


# ------------------------------------------------------------------ sending commands


def _add_command_parser(
    subparsers: argparse._SubParsersAction,
    name: str,
    help: str,
    body: Callable[[argparse.Namespace], dict],
    extra: Callable[[argparse.ArgumentParser], None] | None = None,
    description: str | None = None,
) -> None:
    p = _job_parser(subparsers, name, help, description or help)
    if extra is not None:
        extra(p)
    p.add_argument("--no-wait", action="store_true", help="return once queued, not when applied")
    p.add_argument(
        "--timeout",
        type=_positive_number,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for applied/rejected (default 60)",
    )
    p.set_defaults(func=lambda args: run_command(args, body(args)))


def run_command(args: argparse.Namespace, body: dict) -> int:
    """Post a command; unless ``--no-wait``, wait until it is applied or rejected. With ``--json``
    the command as it ended (queued, applied, rejected or still pending) goes to stdout whatever
    the outcome; the exit code says which, and a failure's reason goes to stderr."""
    client = _client(args)
    path = job_path(args.job) + "/commands"
    cmd = client.request("POST", path, body)
    name = f"command {cmd['id']} ({cmd['type']})"
    if not args.no_wait:
        deadline = time.monotonic() + args.timeout
        while cmd["status"] == "pending" and time.monotonic() < deadline:
            time.sleep(0.2)
            cmd = client.request("GET", f"{path}/{cmd['id']}")
    if args.json:
        _print_json(cmd)
    if cmd["status"] == "rejected":
        raise CliError(f"{name} rejected: {cmd.get('reason')}", EXIT_FAILED)
    if cmd["status"] == "pending" and not args.no_wait:
        raise CliError(f"{name} still pending after {args.timeout:g}s", EXIT_TIMEOUT)
    if not args.json:
        done = "queued" if cmd["status"] == "pending" else "applied"
        step = cmd.get("applied_step")
        print(f"{name} {done}" + (f" at step {step}" if done == "applied" and step is not None else ""))
    return EXIT_OK


def add_set_period_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_command_parser(
        subparsers,
        "set-period",
        "average every PERIOD steps from the step the command is applied at",
        lambda a: {"type": "set_period", "period": a.period},
        lambda p: p.add_argument("period", metavar="PERIOD", type=_positive, help="steps between averaging rounds"),
    )


def add_set_hierarchy_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_command_parser(
        subparsers,
        "set-hierarchy",
        "set each group level's period: GROUP_SIZE=PERIOD ... (hierarchical averagers)",
        lambda a: {"type": "set_hierarchy", "periods": a.periods},
        lambda p: p.add_argument(
            "periods",
            metavar="GROUP_SIZE=PERIOD",
            nargs="+",
            type=_level,
            action=_Levels,
            help="groups of GROUP_SIZE ranks average every PERIOD steps, e.g. 2=2 8=4",
        ),
        description=(
            "Set the period of each group level of a hierarchical averager: avgctl set-hierarchy JOB 2=2 8=4 "
            "makes groups of 2 ranks average every 2 steps and groups of 8 every 4. Each level is "
            'GROUP_SIZE=PERIOD, group size first as in the REST API ({"2": 2, "8": 4}); torch\'s '
            "HierarchicalModelAverager writes the same levels the other way round, {period: group_size}. "
            "The group sizes are the averager's own; only their periods change."
        ),
    )


def add_set_outer_lr_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_command_parser(
        subparsers,
        "set-outer-lr",
        "set the outer optimizer's learning rate from the applied step on (DiLoCo averagers)",
        lambda a: {"type": "set_outer_lr", "lr": a.lr},
        lambda p: p.add_argument(
            "lr", metavar="LR", type=_positive_number, help="the new lr of every param group of the outer optimizer"
        ),
        description=(
            "Set the learning rate of a DiLoCo job's outer optimizer: every param group takes LR at one "
            "applied step on every rank. LR must be finite and above 0; a job whose averager is not "
            "DiLoCo refuses it."
        ),
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


def _autotune_body(args: argparse.Namespace) -> dict:
    if args.state == "off" and args.target is not None:
        raise CliError("argument --target: only with 'on' (the autopilot keeps no target when off)", EXIT_USAGE)
    return {"type": "set_autotune", "enabled": args.state == "on", "target_divergence": args.target}


def _autotune_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("state", metavar="on|off", choices=("on", "off"), help="switch the autopilot on or off")
    p.add_argument(
        "--target",
        type=_positive_number,
        metavar="X",
        help="with on: the target divergence to hold (default: calibrated from the first rounds)",
    )


def add_autotune_parser(subparsers: argparse._SubParsersAction) -> None:
    _add_command_parser(
        subparsers,
        "autotune",
        "switch the server's autopilot (it tunes the period) on or off",
        _autotune_body,
        _autotune_options,
    )
