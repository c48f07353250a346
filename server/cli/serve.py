"""``avgctl serve``: the server under uvicorn, its flags mapped one to one onto ``Settings`` fields."""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import signal
import threading

from avgctl.protocol.flags import argument_options, flag_name
from avgctl.server.cli.exits import EXIT_OK, EXIT_USAGE, CliError
from avgctl.server.settings import Settings

# The Settings fields that are flags, and what --help says about each; the default and the
# environment variable in the help come from Settings.
SETTINGS_FLAGS = {
    "host": "interface to listen on",
    "port": "TCP port",
    "db": "SQLite file",
    "token": "the one token (the control token unless --control-token is given; workers and the CLI read it as AVGCTL_TOKEN)",
    "control_token": "token with every right",
    "read_token": "token that may only read",
    "worker_token": "token that may only send metrics",
    "control_token_file": "file holding the control token (keeps it out of ps)",
    "read_token_file": "file holding the read token",
    "worker_token_file": "file holding the worker token",
    "control_token_on_worker_socket": "accept the control token on /ws/worker when a worker token is set",
    "allowed_origins": "comma-separated browser origins besides the server's own that may use the dashboard",
    "header_timeout": "seconds a client has to send a request head",
    "body_timeout": "seconds a request body may stall",
    "forwarded_allow_ips": "comma-separated addresses of TLS proxies whose X-Forwarded-* headers are trusted",
}
# Flags whose field type argparse cannot take as such: Settings parses the text.
FLAG_OPTIONS = {"allowed_origins": {"type": str, "metavar": "ORIGINS"}}
LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the server", description="Run the avgctl server.")
    env_prefix = Settings.model_config["env_prefix"]
    for name, text in SETTINGS_FLAGS.items():
        field = Settings.model_fields[name]
        env = f"env {env_prefix}{name.upper()}"
        unset = field.default is None or field.default is False or field.default == []
        shown = env if unset else f"default {field.default}, {env}"
        # No argparse default: a flag not given leaves the environment, then Settings, in charge.
        options = FLAG_OPTIONS.get(name) or argument_options(field.annotation)
        p.add_argument(flag_name(name), help=f"{text} ({shown})", default=None, **options)
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS, help="uvicorn's log level (default info)")
    p.set_defaults(func=run_serve)


def serve_settings(args: argparse.Namespace) -> Settings:
    """Settings from the flags that were given, the environment for the rest."""
    given = {name: getattr(args, name) for name in SETTINGS_FLAGS}
    return Settings(**{name: value for name, value in given.items() if value is not None})


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from avgctl.server.app import create_app
    from avgctl.server.process import tune_garbage_collector

    try:
        settings = serve_settings(args)
    except ValidationError as err:
        raise CliError(f"bad setting: {err.errors(include_url=False)[0]['msg']}", EXIT_USAGE) from None
    from avgctl.server.timeouts import head_deadline_protocol

    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # uvicorn's own protocol with a deadline on each request head (it has none).
        http=head_deadline_protocol(settings.header_timeout),
        ws_max_size=settings.max_frame_bytes,
        # No permessage-deflate: compression contexts are per connection, so every dashboard would
        # compress the same frame again and the server would inflate every rank's frames; on
        # loopback or a LAN that costs the one core ingest runs on more than it saves.
        ws_per_message_deflate=False,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        log_level=args.log_level,
    )
    install_token_redaction()  # after Config: it configures uvicorn's loggers
    tune_garbage_collector()  # last: what was built so far lives as long as the process
    _server_class(uvicorn)(config).run()
    return EXIT_OK


def _server_class(uvicorn):
    """uvicorn's ``Server``, stopping on SIGHUP as it does on SIGINT and SIGTERM."""

    class Server(uvicorn.Server):
        """Closing the terminal of ``avgctl serve`` sends SIGHUP, whose default kills the process on the
        spot: no lifespan shutdown, so the store's last writes were lost. Here it stops the server
        as SIGTERM does (the lifespan's shutdown runs, the SQLite writer process, which ignores the
        signal, finishes and exits), and uvicorn raises it again at the end, so the exit status
        says SIGHUP, as SIGTERM's says SIGTERM (Ctrl-C's SIGINT exits with 130)."""

        @contextlib.contextmanager
        def capture_signals(self):
            with super().capture_signals():
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                previous = signal.signal(signal.SIGHUP, self.handle_exit)
                try:
                    yield
                finally:  # restored before uvicorn raises the captured signals again
                    signal.signal(signal.SIGHUP, previous)

    return Server


_TOKEN_IN_QUERY = re.compile(r"([?&]token=)[^&\s\"]*")


def redact_tokens(text: str) -> str:
    """``text`` with the value of every ``token=`` query parameter replaced by ``REDACTED``."""
    return _TOKEN_IN_QUERY.sub(r"\1REDACTED", text)


class TokenRedaction(logging.Filter):
    """Redact ``?token=`` values from uvicorn's log lines: the access log prints each request's
    query (``GET /?token=...``, ``WebSocket /ws/jobs/x?token=...``), and a log file is read by more
    people than the tokens are meant for. The record keeps its arguments' shape, which uvicorn's
    access formatter unpacks."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_tokens(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact_tokens(a) if isinstance(a, str) else a for a in record.args)
        return True


def install_token_redaction() -> None:
    """Add ``TokenRedaction`` to the loggers uvicorn logs requests on (a filter on a logger sees the
    records logged to that logger itself)."""
    for name in ("uvicorn.access", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, TokenRedaction) for f in logger.filters):
            logger.addFilter(TokenRedaction())
