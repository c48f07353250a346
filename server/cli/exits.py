"""The ``avgctl`` command's exit codes, and the error that ends a subcommand with one."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the server answered no (rejected command, unknown or finished job, bad token) or is unreachable
# argparse's own code for bad arguments; also a 422, the server judging them bad (a period above its limit)
EXIT_USAGE = 2
EXIT_TIMEOUT = 3  # the command is still pending after --timeout


def for_status(status: int) -> int:
    """The exit code of a request the server refused with HTTP ``status``."""
    return EXIT_USAGE if status == 422 else EXIT_FAILED


class CliError(Exception):
    """A failure to report in one line and exit non-zero."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code
