"""Server settings: every field is an ``AVGCTL_*`` environment variable and a ``serve`` flag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Settings(BaseSettings):
    """What ``avgctl serve`` needs; ``AVGCTL_PORT=9000`` and ``--port 9000`` set the same field."""

    model_config = SettingsConfigDict(env_prefix="AVGCTL_", extra="ignore")

    host: str = "127.0.0.1"
    """Interface to listen on; loopback unless you mean to expose the server."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port (0 picks a free one)."""
    db: str = "./avgctl.db"
    """SQLite file (WAL mode); ``:memory:`` is not supported because two connections share it."""
    token: str | None = None
    """The one-token setup (``AVGCTL_TOKEN``, the variable workers and the CLI read too): the control
    token when ``control_token`` is not set, so one variable serves the server, its workers and the CLI."""
    control_token: str | None = None
    """May do everything. If no token at all is set, one is generated at the first start, kept in
    ``<db>.token`` beside the SQLite file (mode 0600) and read back at every later start, so a
    restart does not lock out the links and dashboards holding it; the dashboard URL with it is
    printed. Delete that file for a new token."""
    read_token: str | None = None
    """May read: GET endpoints, /metrics, the dashboard and its websocket."""
    worker_token: str | None = None
    """May only send metrics on /ws/worker."""
    control_token_file: Path | None = None
    """File holding the control token (one line), so the token shows in neither ``ps`` nor the
    environment; set it or ``control_token``, not both."""
    read_token_file: Path | None = None
    """File holding the read token (as ``control_token_file``)."""
    worker_token_file: Path | None = None
    """File holding the worker token (as ``control_token_file``)."""
    control_token_on_worker_socket: bool = False
    """Accept the control token on /ws/worker although a worker token is set. Without a worker token
    the control token always serves workers too (the one-token setup)."""
    allowed_origins: Annotated[list[str], NoDecode] = []
    """Browser origins besides the server's own (``https://dash.example.org``) whose pages may use
    the login cookie and the dashboard's websocket: comma-separated, or a JSON list."""
    header_timeout: float = Field(default=10.0, gt=0, le=3600)
    """Seconds a connection has to send a whole request head (from its start, and again after each
    response on a kept-alive connection); then it is answered 408 and closed."""
    body_timeout: float = Field(default=30.0, gt=0, le=3600)
    """Seconds a request body may stall between two of its chunks; then it is answered 408."""
    forwarded_allow_ips: str | None = None
    """Comma-separated addresses of the TLS proxies whose ``X-Forwarded-Proto``/``-For`` are
    believed (uvicorn's setting; ``*`` for any). Unset: uvicorn's ``FORWARDED_ALLOW_IPS``, else
    loopback. Through them the server knows a browser came over https (Secure cookie, own origin)."""
    max_body_bytes: int = Field(default=64 * 1024, ge=1024)
    """Largest REST request body accepted (413 above)."""
    max_frame_bytes: int = Field(default=1024 * 1024, ge=1024)
    """Largest websocket frame accepted from a worker (closed with 1009 above)."""
    metrics_queue: int = Field(default=10_000, ge=10)
    """Metric batches waiting for the SQLite writer; more are dropped (and counted)."""
    dashboard_interval: float = Field(default=0.05, gt=0, le=5)
    """Seconds between coalesced dashboard sends."""
    dashboard_queue: int = Field(default=100, ge=8)
    """Messages waiting per dashboard client; a client that falls further behind skips messages
    (oldest metrics first). Live metrics are one message per job per ``dashboard_interval``, so the
    default holds about 5 s of them."""
    live_steps: int = Field(default=200, ge=1)
    """Step records per rank per second a dashboard gets live; a faster rank's are thinned evenly
    (the store keeps every one, and snapshots and the REST API read from it)."""
    retention_steps: int | None = Field(default=20_000, ge=1)
    """Each rank's latest steps kept at full resolution; older step and round records are thinned to
    at most ``history_records`` per rank, so the SQLite file stays bounded. None keeps everything."""
    history_records: int = Field(default=5_000, ge=10)
    """Thinned records kept per rank older than ``retention_steps`` (evenly spaced steps)."""
    snapshot_records: int = Field(default=20_000, ge=100)
    """Step (and round) records in a dashboard snapshot, over all ranks: the recent half at full
    resolution, older history downsampled."""

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part for part in (p.strip() for p in text.split(",")) if part]
        return value

    @field_validator("allowed_origins")
    @classmethod
    def _origins_are_origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            scheme, sep, rest = origin.partition("://")
            if scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/"):
                raise ValueError(f"allowed origin {origin!r} is not scheme://host[:port]")
        return value

    @model_validator(mode="after")
    def _tokens_from_files(self) -> Settings:
        for role in ("control", "read", "worker"):
            path = getattr(self, f"{role}_token_file")
            if path is None:
                continue
            if getattr(self, f"{role}_token"):
                raise ValueError(f"give {role}_token or {role}_token_file, not both")
            try:
                token = Path(path).read_text().strip()
            except OSError as err:
                raise ValueError(f"cannot read {role}_token_file {path}: {err.strerror}") from None
            if not token:
                raise ValueError(f"{role}_token_file {path} is empty")
            setattr(self, f"{role}_token", token)
        if self.token and not self.control_token:
            self.control_token = self.token
        return self


def browsable_host(host: str) -> str:
    """The address at which a browser on this machine reaches a server listening on ``host``:
    loopback for the any-address (``0.0.0.0``, ``::`` or empty), ``host`` itself otherwise."""
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
