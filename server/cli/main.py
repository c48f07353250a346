"""The ``avgctl`` command: its parser, one ``add_*_parser`` per subcommand, and ``main``."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable

from avgctl.server.cli import commands
from avgctl.server.cli.demo import add_demo_parser
from avgctl.server.cli.exits import CliError
from avgctl.server.cli.serve import add_serve_parser

PARSERS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_serve_parser,
    add_demo_parser,
    commands.add_jobs_parser,
    commands.add_status_parser,
    commands.add_commands_parser,
    commands.add_set_period_parser,
    commands.add_set_hierarchy_parser,
    commands.add_set_outer_lr_parser,
    commands.add_pause_parser,
    commands.add_resume_parser,
    commands.add_average_now_parser,
    commands.add_autotune_parser,
]

EPILOG = """\
Commands sent to a job wait until it applied or rejected them (--no-wait: until queued).
exit codes: 0 done; 1 the server said no (a rejected command, an unknown job, a finished job,
a bad token) or cannot be reached; 2 bad arguments (also when the server judges them: 422);
3 still pending after --timeout."""


def version() -> str:
    """The installed distribution's version."""
    try:
        return importlib.metadata.version("avgctl")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; a parsed subcommand's ``func`` runs it."""
    parser = argparse.ArgumentParser(
        prog="avgctl",
        description="Live control plane for model averaging.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"avgctl {version()}")
    parser.add_argument(
        "--json",
        action="store_true",
        help="machine-readable JSON on stdout: the jobs, the job, the command log, or the command sent "
        "as it ended (also accepted after the subcommand)",
    )
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``avgctl`` console script: parse, run the subcommand, return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.json and not getattr(args, "accepts_json", False):
        parser.error(f"argument --json: {args.command} has no result to print as JSON")
    try:
        return args.func(args)
    except CliError as err:
        print(f"avgctl: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130
