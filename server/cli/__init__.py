"""The ``avgctl`` command line: ``serve`` the server, run the ``demo``, or act on a running server.

``main`` (the console script) and ``build_parser`` are in ``main.py``; each subcommand has a module
of its own (``serve``, ``demo``, ``commands``), and the commands share ``client.Client``.
"""

from avgctl.server.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
