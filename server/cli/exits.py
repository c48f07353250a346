"""The ``avgctl`` command's exit codes, and the error that ends a subcommand with one."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # the server answered no (rejected command, unknown job, bad token) or is unreachable
EXIT_USAGE = 2  # argparse's own code for bad arguments
EXIT_TIMEOUT = 3  # the command is still pending after --timeout


class CliError(Exception):
    """A failure to report in one line and exit non-zero."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code
