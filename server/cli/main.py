"""The ``avgctl`` command: its parser, one ``add_*_parser`` per subcommand, and ``main``."""

from __future__ import annotations

import argparse
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
    commands.add_set_period_parser,
    commands.add_pause_parser,
    commands.add_resume_parser,
    commands.add_average_now_parser,
]


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand; a parsed subcommand's ``func`` runs it."""
    parser = argparse.ArgumentParser(prog="avgctl", description="Live control plane for model averaging.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in PARSERS:
        add(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``avgctl`` console script: parse, run the subcommand, return its exit code."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CliError as err:
        print(f"avgctl: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130
