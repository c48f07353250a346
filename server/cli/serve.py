"""``avgctl serve``: the server under uvicorn, its flags mapped one to one onto ``Settings`` fields."""

from __future__ import annotations

import argparse

from avgctl.protocol.flags import argument_options, flag_name
from avgctl.server.cli.exits import EXIT_OK, EXIT_USAGE, CliError
from avgctl.server.settings import Settings

# The Settings fields that are flags, and what --help says about each; the default and the
# environment variable in the help come from Settings.
SETTINGS_FLAGS = {
    "host": "interface to listen on",
    "port": "TCP port",
    "db": "SQLite file",
    "control_token": "token with every right",
    "read_token": "token that may only read",
    "worker_token": "token that may only send metrics",
}
LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]


def add_serve_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the server", description="Run the avgctl server.")
    env_prefix = Settings.model_config["env_prefix"]
    for name, text in SETTINGS_FLAGS.items():
        field = Settings.model_fields[name]
        env = f"env {env_prefix}{name.upper()}"
        shown = env if field.default is None else f"default {field.default}, {env}"
        # No argparse default: a flag not given leaves the environment, then Settings, in charge.
        p.add_argument(flag_name(name), help=f"{text} ({shown})", **argument_options(field.annotation))
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
